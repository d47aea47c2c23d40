"""Layer-wise strategies (lisa, hft, ist) freeze before the forward pass: frozen tensors get no
gradient (``.grad is None``), never move through AdamW with weight decay, and the frozen set is
constant over the micro-batches of one optimizer step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from gmt_plugins import GMTCallback, GMTConfig, GradientMasker  # noqa: E402
from gmt_plugins.plugins import make_plugin_manager  # noqa: E402
from test_trainer_integration import lora_config, sft_trainer  # noqa: E402
from tiny import tiny_llama  # noqa: E402


class FreezeProbe(TrainerCallback):
    """Records, per optimizer step: the frozen set seen by every forward pass, which gradients exist
    before the optimizer step, and the parameters before and after it."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if n in set(names)]
        self.steps: list[dict] = []
        model.register_forward_pre_hook(self._forward)

    def _forward(self, module, inputs):
        if module.training and self.steps:
            self.steps[-1]["forwards"].append(frozenset(n for n, p in self.named if not p.requires_grad))

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append({"forwards": [], "before": {n: p.detach().clone() for n, p in self.named}})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps[-1]["no_grad"] = frozenset(n for n, p in self.named if p.grad is None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in self.named}


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def train_with_probe(tmp_path, callback, model, **args):
    trainer = sft_trainer(tmp_path, callback, model=model, optimizers=(adamw(model), None), **args)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    probe = FreezeProbe(model, names)
    trainer.callback_handler.callbacks.append(probe)  # after GMTCallback: sees what it froze
    trainer.train()
    return trainer, probe, names


def assert_frozen_exactly(probe: FreezeProbe, callback: GMTCallback, names: list[str]) -> list[frozenset]:
    frozen_per_step = []
    for step, record in enumerate(probe.steps):
        expected = frozenset(callback.masker.strategy.frozen_names(callback.masker.names, step=step))
        assert record["forwards"] and all(f == expected for f in record["forwards"]), step  # constant over micro-batches
        assert record["no_grad"] == expected, step  # frozen <=> no gradient
        for name in names:
            same = torch.equal(record["after"][name], record["before"][name])
            assert same == (name in expected), (step, name)  # frozen never move; active ones do (weight decay)
        frozen_per_step.append(expected)
    return frozen_per_step


@pytest.mark.parametrize("strategy,options", [("lisa", {"active_layers": 1, "interval": 1}), ("hft", {"interval": 1})])
def test_trainer_frozen_tensors_get_no_grad_and_never_move(tmp_path, strategy, options):
    model = tiny_llama(num_hidden_layers=4)
    callback = GMTCallback(strategy=strategy, strategy_options=options, mask_seed=3)
    trainer, probe, names = train_with_probe(tmp_path, callback, model, max_steps=4)
    frozen = assert_frozen_exactly(probe, callback, names)
    assert len(probe.steps) == 4 and all(frozen) and len(set(frozen)) > 1  # re-drawn across steps
    assert all(p.requires_grad for p in model.parameters())  # unfrozen at train end


@pytest.mark.parametrize("reentrant", [True, False])
def test_trainer_gradient_checkpointing_with_frozen_embeddings(tmp_path, reentrant):
    # hft freezes half of {embed, norm, head}: with seed 1 the embeddings are frozen, the
    # classic trap of reentrant checkpointing (no block input requires grad, so no block gets a gradient)
    model = tiny_llama(num_hidden_layers=2)
    callback = GMTCallback(strategy="hft", strategy_options={"interval": 1}, mask_seed=1)
    _, probe, names = train_with_probe(
        tmp_path, callback, model, max_steps=3, gradient_checkpointing=None, activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    frozen = assert_frozen_exactly(probe, callback, names)
    assert any("model.embed_tokens.weight" in f for f in frozen)


def test_plain_loop_reentrant_checkpointing_without_input_require_grads():
    # transformers makes the embeddings' output require grad when it enables checkpointing; a loop that
    # checkpoints without that hook still gets gradients for the active blocks: the masker adds it while
    # the frozen embeddings need it
    model = tiny_llama(num_hidden_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    model.train()
    masker = GradientMasker(model, strategy="hft", strategy_options={"interval": 1}, mask_seed=1)
    frozen = masker.begin_step()
    assert "model.embed_tokens.weight" in frozen
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is None} == frozen
    masker.unfreeze()
    assert masker._input_hook is None


def test_trainer_peft_adapters_of_frozen_layers_are_frozen(tmp_path):
    callback = GMTCallback(strategy="lisa", strategy_options={"active_layers": 1, "interval": 1})
    trainer = sft_trainer(tmp_path, callback, model=tiny_llama(num_hidden_layers=4), peft_config=lora_config(), max_steps=3, weight_decay=0.1)
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names)
    probe = FreezeProbe(model, names)
    trainer.callback_handler.callbacks.append(probe)
    trainer.train()
    frozen = assert_frozen_exactly(probe, callback, names)
    assert all(len({n.split(".self_attn")[0].split(".mlp")[0] for n in set(names) - f}) == 1 for f in frozen)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_plain_loop_begin_step():
    model = tiny_llama(num_hidden_layers=4)
    masker = GradientMasker(model, strategy="lisa", strategy_options={"active_layers": 2, "interval": 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 100, (2, 8))
    seen = []
    for step in range(4):
        frozen = masker.begin_step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(2):  # gradient accumulation
            model(input_ids=ids, labels=ids).loss.backward()
        stats = masker.apply()
        optimizer.step()
        optimizer.zero_grad()
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]) == (name in frozen), (step, name)
        assert stats.without_grad == [] and stats.masked == sum(p.numel() for n, p in model.named_parameters() if n in frozen)
        seen.append(frozen)
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[0] != seen[2]  # re-drawn every interval
    assert len({n.rsplit(".layers.", 1)[1].split(".")[0] for n in seen[0]}) == 2  # 2 of 4 layers frozen
    masker.unfreeze()
    assert all(p.requires_grad for p in model.parameters())


def test_ist_freezes_except_on_observation_steps():
    model = tiny_llama(num_hidden_layers=4)
    masker = GradientMasker(model, strategy="ist", strategy_options={"active_layers": 1, "interval": 3})
    ids = torch.randint(0, 100, (2, 8))
    frozen_sets, learned = [], []
    for _ in range(6):
        frozen_sets.append(masker.begin_step())
        scores = dict(masker.strategy.scores)
        model(input_ids=ids, labels=ids).loss.backward()
        stats = masker.apply()
        learned.append(masker.strategy.scores != scores)
        model.zero_grad()
        assert stats.masked > 0  # the inactive layers are frozen or masked at every step
    assert [bool(f) for f in frozen_sets] == [True, True, False, True, True, False]
    assert learned == [False, False, True, False, False, True]


def test_non_freezing_strategy_begin_step_is_a_no_op():
    model = tiny_llama()
    masker = GradientMasker(model, strategy="gmt")
    assert masker.begin_step() == frozenset() and all(p.requires_grad for p in model.parameters())


def check(args, strategy="lisa"):
    pm = make_plugin_manager(load_entrypoints=False)
    return [p for p in pm.hook.gmt_check_training_setup(args=args, model=None, optimizer=None, config=GMTConfig(strategy=strategy)) if p]


def test_setup_checks_refuse_ddp_without_find_unused_fsdp_and_deepspeed():
    ddp = dict(world_size=2, fsdp="", deepspeed=None, deepspeed_plugin=None)
    problems = check(SimpleNamespace(**ddp, ddp_find_unused_parameters=None))
    assert len(problems) == 1 and "ddp_find_unused_parameters=True" in problems[0]
    assert check(SimpleNamespace(**ddp, ddp_find_unused_parameters=True)) == []
    assert check(SimpleNamespace(**ddp, ddp_find_unused_parameters=None), strategy="gmt") == []
    fsdp = check(SimpleNamespace(**{**ddp, "fsdp": "full_shard"}, ddp_find_unused_parameters=True), strategy="hft")
    assert any("FSDP" in p and "'hft'" in p for p in fsdp)
    deepspeed = check(SimpleNamespace(**{**ddp, "deepspeed": "ds.json"}, ddp_find_unused_parameters=True), strategy="ist")
    assert any("DeepSpeed" in p and "'ist'" in p for p in deepspeed)


def test_callback_raises_under_ddp_without_the_flag(tmp_path):
    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(world_size=2, fsdp="", deepspeed=None, deepspeed_plugin=None, ddp_find_unused_parameters=False)
    callback = GMTCallback(strategy="hft")
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=tiny_llama(), optimizer=None)


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)
def test_ddp_with_find_unused_parameters_keeps_frozen_layers_without_grad(tmp_path):
    from test_distributed import load, torchrun

    torchrun("freezing_worker.py", tmp_path)
    ranks = [load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == 3
    for step, (a, b) in enumerate(zip(*ranks)):
        assert a["frozen"] == b["frozen"] and a["frozen"], step  # the same draw on every rank
        assert a["no_grad"] == a["frozen"] and b["no_grad"] == b["frozen"], step  # DDP leaves unused grads None
        for name in a["before"]:
            assert torch.equal(a["after"][name], b["after"][name]), (step, name)  # replicas stay in sync
            assert torch.equal(a["after"][name], a["before"][name]) == (name in a["frozen"]), (step, name)
