"""GMTCallback inside transformers Trainer and TRL trainers, on CPU with tiny models.

Masks are checked the direct way: a recorder callback runs *before* GMTCallback and copies the
accumulated (clipped) gradients and the parameters; another runs after the optimizer step. With
plain SGD an entry stays bit-identical exactly when it was masked (or its gradient was zero), and
the reference twin says which entries must be masked.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gmt_plugins import GMTCallback, GMTConfig  # noqa: E402
from gmt_plugins.integrations.transformers import place_before_reporters  # noqa: E402
from reference import reference_masks  # noqa: E402
from tiny import cpu_args, preference_dataset, text_dataset, tiny_llama, tiny_tokenizer  # noqa: E402

LR = 0.5


class Recorder(TrainerCallback):
    """Copies gradients and parameters around every optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.named = [(n, p) for n, p in model.named_parameters()]
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({
            "grads": {n: p.grad.clone() for n, p in self.named if p.grad is not None},
            "before": {n: p.detach().clone() for n, p in self.named},
        })

    def after_step(self):
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in self.named}


class AfterStep(TrainerCallback):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.recorder.after_step()


def attach_recorder(trainer) -> Recorder:
    recorder = Recorder(trainer.model)
    trainer.callback_handler.callbacks.insert(0, recorder)  # before GMTCallback: sees unmasked gradients
    trainer.callback_handler.callbacks.append(AfterStep(recorder))  # after GMTCallback's restore
    return recorder


def insert_after_gmt(trainer, callback: TrainerCallback) -> None:
    """Put ``callback`` right after the GMTCallback, wherever the Trainer placed that."""
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(next(i for i, cb in enumerate(callbacks) if isinstance(cb, GMTCallback)) + 1, callback)


def trainable(recorder: Recorder) -> list[str]:
    return [n for n, p in recorder.named if p.requires_grad]


def assert_sgd_steps_masked(recorder: Recorder, ratio: float, scope: str = "tensor") -> None:
    """With SGD: unchanged == masked or zero-gradient; moved entries moved by -lr * grad."""
    names = trainable(recorder)
    assert recorder.steps, "no optimizer step was recorded"
    for step in recorder.steps:
        grads = [step["grads"][n] for n in names]
        masks = reference_masks(grads, ratio, scope)
        for name, grad, mask in zip(names, grads, masks):
            before, after = step["before"][name], step["after"][name]
            unchanged = after == before
            assert torch.equal(unchanged, mask | (grad == 0)), name
            moved = ~unchanged
            torch.testing.assert_close(after[moved], before[moved] - LR * grad[moved])


def assert_frozen_never_moved(recorder: Recorder) -> None:
    frozen = [n for n, p in recorder.named if not p.requires_grad]
    assert frozen, "expected a frozen base"
    first, last = recorder.steps[0]["before"], recorder.steps[-1]["after"]
    for name in frozen:
        assert torch.equal(first[name], last[name]), name


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0, task_type="CAUSAL_LM", **kw)


def sft_trainer(tmp_path, callback, *, optimizers=(None, None), peft_config=None, model=None, **args):
    from trl import SFTConfig, SFTTrainer

    base = dict(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=32, learning_rate=LR, lr_scheduler_type="constant")
    base.update(args)
    config = SFTConfig(output_dir=str(tmp_path), **cpu_args(**base))
    return SFTTrainer(
        model=model or tiny_llama(), args=config, train_dataset=text_dataset(), processing_class=tiny_tokenizer(),
        callbacks=[callback], optimizers=optimizers, peft_config=peft_config,
    )


class MaskSpy(TrainerCallback):
    """Runs right after GMTCallback's mask: a masked entry is one GMT zeroed (gradient was nonzero)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = self.recorder.steps[-1]
        step["masked"] = {n: (p.grad == 0) & (step["grads"][n] != 0) for n, p in self.recorder.named if p.grad is not None}
        step["masked_grads"] = {n: p.grad.clone() for n, p in self.recorder.named if p.grad is not None}


# --- masks are right ---------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sft_full_model_masks_the_right_entries(tmp_path, scope):
    model = tiny_llama()
    trainer = sft_trainer(tmp_path, GMTCallback(mask_ratio=0.3, scope=scope), model=model, optimizers=(sgd(model), None))
    recorder = attach_recorder(trainer)
    trainer.train()
    assert len(recorder.steps) == 3  # once per optimizer step, not per micro-batch (GA=2)
    assert_sgd_steps_masked(recorder, 0.3, scope)


def test_gradient_accumulation_masks_the_accumulated_gradient(tmp_path):
    model = tiny_llama()
    callback = GMTCallback(mask_ratio=0.5)
    trainer = sft_trainer(tmp_path, callback, model=model, optimizers=(sgd(model), None), gradient_accumulation_steps=4, max_steps=2)
    recorder = attach_recorder(trainer)
    trainer.train()
    assert len(recorder.steps) == 2 and callback.masker.step == 2
    assert_sgd_steps_masked(recorder, 0.5)


def test_sft_lora_masks_adapters_and_never_touches_base(tmp_path):
    from peft import PeftModel

    callback = GMTCallback(mask_ratio=0.4)
    trainer = sft_trainer(tmp_path, callback, peft_config=lora_config())
    assert isinstance(trainer.model, PeftModel)
    trainer.create_optimizer()
    trainer.optimizer = sgd(trainer.model)
    recorder = attach_recorder(trainer)
    trainer.train()
    assert all("lora_" in name for name in callback.masker.names)
    assert_frozen_never_moved(recorder)
    assert_sgd_steps_masked(recorder, 0.4)


def test_lora_modules_to_save_and_dora_are_selected(tmp_path):
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), lora_config(use_dora=True, modules_to_save=["lm_head"]))
    callback = GMTCallback(mask_ratio=0.2)
    trainer = sft_trainer(tmp_path, callback, model=model, optimizers=(sgd(model), None), max_steps=2)
    recorder = attach_recorder(trainer)
    trainer.train()
    names = callback.masker.names
    assert any("lora_magnitude_vector" in n for n in names)
    assert any("modules_to_save" in n for n in names)
    assert not any("original_module" in n or "base_layer" in n for n in names)
    assert_frozen_never_moved(recorder)
    assert_sgd_steps_masked(recorder, 0.2)


def test_dpo_lora(tmp_path):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), **cpu_args(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=LR, max_length=32, lr_scheduler_type="constant"))
    callback = GMTCallback(config=GMTConfig(mask_ratio=0.3))
    trainer = DPOTrainer(model=tiny_llama(), args=args, train_dataset=preference_dataset(), processing_class=tiny_tokenizer(), peft_config=lora_config(), callbacks=[callback])
    trainer.create_optimizer()
    trainer.optimizer = sgd(trainer.model)
    recorder = attach_recorder(trainer)
    trainer.train()
    assert_frozen_never_moved(recorder)
    assert_sgd_steps_masked(recorder, 0.3)
    assert any("gmt/masked_fraction" in e for e in trainer.state.log_history)


def test_dpo_full_model_with_ref_model(tmp_path):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), **cpu_args(max_steps=2, per_device_train_batch_size=4, learning_rate=LR, max_length=32, lr_scheduler_type="constant"))
    model = tiny_llama()
    trainer = DPOTrainer(model=model, ref_model=tiny_llama(), args=args, train_dataset=preference_dataset(), processing_class=tiny_tokenizer(), callbacks=[GMTCallback(mask_ratio=0.3)], optimizers=(sgd(model), None))
    recorder = attach_recorder(trainer)
    trainer.train()
    assert_sgd_steps_masked(recorder, 0.3)


def test_reward_trainer(tmp_path):
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from tiny import sentences, tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    data = Dataset.from_dict({"chosen": sentences(16, 1), "rejected": sentences(16, 2)})
    args = RewardConfig(output_dir=str(tmp_path), **cpu_args(max_steps=2, per_device_train_batch_size=4, learning_rate=LR, max_length=32, lr_scheduler_type="constant"))
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(), callbacks=[GMTCallback(mask_ratio=0.25)], optimizers=(sgd(model), None))
    recorder = attach_recorder(trainer)
    trainer.train()
    assert_sgd_steps_masked(recorder, 0.25)


def test_plain_transformers_trainer(tmp_path):
    from transformers import DataCollatorForLanguageModeling

    tok = tiny_tokenizer()
    data = text_dataset().map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), **cpu_args(max_steps=2, per_device_train_batch_size=4, learning_rate=LR, lr_scheduler_type="constant"))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[GMTCallback(mask_ratio=0.3, strategy="random")], optimizers=(sgd(model), None))
    recorder = attach_recorder(trainer)
    spy = MaskSpy(recorder)
    insert_after_gmt(trainer, spy)
    trainer.train()
    from gmt_plugins.engine.keys import RandomKeys, stable_salt

    for step_index, step in enumerate(recorder.steps):
        for name in trainable(recorder):
            grad = step["grads"][name]
            keys = RandomKeys([stable_salt(0, step_index, name)]).keys(0, grad.view(-1), 0).double().view_as(grad)
            mask = reference_masks([grad], 0.3, "tensor", scores=[keys])[0]
            assert int(mask.sum()) == math.floor(0.3 * grad.numel())
            assert torch.equal(step["masked_grads"][name], torch.where(mask, torch.zeros_like(grad), grad)), name


# --- strict mode and optimizers that move masked entries -----------------------------------


def run_with_masks(tmp_path, callback, **args):
    trainer = sft_trainer(tmp_path, callback, **args)
    recorder = attach_recorder(trainer)
    insert_after_gmt(trainer, MaskSpy(recorder))
    trainer.train()
    return recorder


def masked_entries_moved(recorder: Recorder) -> list[int]:
    moved = []
    for step in recorder.steps:
        moved.append(sum(int(((step["after"][n] != step["before"][n]) & m).sum()) for n, m in step["masked"].items()))
    return moved


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit"])
def test_strict_holds_masked_entries_bit_identical(tmp_path, optim):
    recorder = run_with_masks(tmp_path / "strict", GMTCallback(mask_ratio=0.3, strict=True), optim=optim, weight_decay=0.1, learning_rate=1e-2, max_steps=3)
    assert masked_entries_moved(recorder) == [0, 0, 0]
    assert all(sum(int(m.sum()) for m in s["masked"].values()) > 0 for s in recorder.steps)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit"])
def test_without_strict_masked_entries_move(tmp_path, optim):
    recorder = run_with_masks(tmp_path / "loose", GMTCallback(mask_ratio=0.3), optim=optim, weight_decay=0.1, learning_rate=1e-2, max_steps=3)
    moved = masked_entries_moved(recorder)
    assert moved[1] > 0 and moved[2] > 0  # momentum / weight decay / 8-bit state move them from step 2 on


def test_bnb_optimizer_instance_is_recognised(tmp_path):
    import bitsandbytes as bnb

    model = tiny_llama()
    callback = GMTCallback(mask_ratio=0.3, strict=True)
    recorder = run_with_masks(tmp_path, callback, model=model, optimizers=(bnb.optim.AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1), None), max_steps=2)
    assert callback.optimizer_info.family == "bitsandbytes.AdamW8bit" and callback.optimizer_info.quantized_state
    assert masked_entries_moved(recorder) == [0, 0]


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"deepspeed": "ds_config.json"}, "DeepSpeed"),
        ({"optim": "lomo"}, "LOMO"),
        ({"optim": "adalomo"}, "LOMO"),
        ({"optim": "galore_adamw_layerwise"}, "layerwise"),
        ({"optim": "apollo_adamw_layerwise"}, "layerwise"),
    ],
)
def test_refuses_setups_that_step_inside_backward(fields, needle):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(**{"deepspeed": None, "optim": "adamw_torch", **fields})
    with pytest.raises(ValueError, match=needle):
        GMTCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=tiny_llama(), optimizer=None)


def test_unknown_strategy_lists_registered_names():
    with pytest.raises(ValueError, match=r"strategy must be one of \[.*'gmt'.*'random'.*\], got 'gmtt'"):
        GMTCallback(strategy="gmtt")


def test_unknown_override_is_a_type_error():
    with pytest.raises(TypeError, match="mask_ratoi"):
        GMTCallback(mask_ratoi=0.3)


# --- logs --------------------------------------------------------------------------------


def test_stats_reach_log_history_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "runs"  # TensorBoardCallback's default: <output_dir>/runs/<run name>
    trainer = sft_trainer(tmp_path, GMTCallback(mask_ratio=0.3, log_per_tensor=True), report_to=["tensorboard"], logging_steps=2, max_steps=4)
    place_before_reporters(trainer)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [2, 4]
    for entry in logged:
        assert entry["gmt/steps"] == 2  # two optimizer steps per logging interval
        assert abs(entry["gmt/masked_fraction"] - 0.3) < 1e-3
        assert entry["gmt/nonfinite"] == 0
        assert "gmt/masked_fraction/model.layers.0.self_attn.q_proj.weight" in entry
    events = EventAccumulator(str(next(logdir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/gmt/masked_fraction" in tags and "train/gmt/threshold_mean" in tags
    values = [e.value for e in events.Scalars("train/gmt/masked_fraction")]
    assert len(values) == 2 and all(abs(v - 0.3) < 1e-3 for v in values)


def test_nonfinite_gradients_are_reported_and_left_for_the_optimizer(tmp_path):
    class Poison(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.model.layers[0].mlp.up_proj.weight.grad[0, :3] = float("nan")

    model = tiny_llama()
    trainer = sft_trainer(tmp_path, GMTCallback(mask_ratio=0.3), model=model, optimizers=(sgd(model), None), max_steps=1, max_grad_norm=0.0)
    trainer.callback_handler.callbacks.insert(0, Poison())
    seen = {}

    class Check(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["grad"] = model.model.layers[0].mlp.up_proj.weight.grad[0, :3].clone()

    insert_after_gmt(trainer, Check())
    trainer.train()
    assert torch.isnan(seen["grad"]).all()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["gmt/nonfinite"] == 3
    assert torch.isnan(model.model.layers[0].mlp.up_proj.weight[0, :3]).all()  # the optimizer saw them


# --- checkpoint and resume ---------------------------------------------------------------


def final_params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("strategy", ["random", "gmt", "gmt_momentum", "sift"])
def test_resume_is_identical_to_uninterrupted(tmp_path, strategy):
    common = dict(optim="adamw_torch", weight_decay=0.1, learning_rate=1e-2, max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
    full = sft_trainer(tmp_path / "full", GMTCallback(mask_ratio=0.3, strategy=strategy, mask_seed=5, strict=True), **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    # the JSON state is the callback's entry in trainer_state.json (TrainerState.stateful_callbacks) ...
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GMTCallback"]
    assert saved["args"]["strategy"] == strategy and saved["attributes"]["resume_state"]["step"] == 3
    # ... and strategies that keep tensors (an EMA, a chosen mask) save them beside it with safetensors, never pickled
    assert (checkpoint / "gmt_state.safetensors").is_file() == (strategy in ("gmt_momentum", "sift"))
    assert not (checkpoint / "gmt_state.json").exists()

    resumed_callback = GMTCallback(mask_ratio=0.3, strategy=strategy, mask_seed=5, strict=True)
    resumed = sft_trainer(tmp_path / "resumed", resumed_callback, resume_from_checkpoint=str(checkpoint), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_callback.masker.step == 6
    expected, got = final_params(full), final_params(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_qlora_4bit_base_never_touched(tmp_path):
    """QLoRA on CPU: bitsandbytes 0.50 runs 4-bit (NF4) Linear4bit layers on CPU, so this runs for real."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map={"": "cpu"}, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    callback = GMTCallback(mask_ratio=0.3)
    trainer = sft_trainer(tmp_path / "out", callback, model=model, peft_config=lora_config(), max_steps=2)
    trainer.create_optimizer()
    trainer.optimizer = sgd(trainer.model)
    recorder = attach_recorder(trainer)
    insert_after_gmt(trainer, MaskSpy(recorder))
    trainer.train()
    assert all("lora_" in name for name in callback.masker.names)
    assert_frozen_never_moved(recorder)  # includes the packed 4-bit weights
    # adapters may be bf16 here, where lr * grad can round away: check the masked gradients themselves
    names = trainable(recorder)
    for step in recorder.steps:
        grads = [step["grads"][n] for n in names]
        for name, grad, mask in zip(names, grads, reference_masks(grads, 0.3, "tensor")):
            assert torch.equal(step["masked_grads"][name], torch.where(mask, torch.zeros_like(grad), grad)), name


def test_callback_added_after_init_is_placed_before_reporters_on_request(tmp_path):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), **cpu_args(max_steps=1, per_device_train_batch_size=4, max_length=32, report_to=["tensorboard"]))
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=text_dataset(), processing_class=tiny_tokenizer())
    callback = GMTCallback(mask_ratio=0.3)
    trainer.add_callback(callback)
    before = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert before.index("GMTCallback") > before.index("TensorBoardCallback")
    assert place_before_reporters(trainer) is callback
    after = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert after == ["GMTCallback"] + [n for n in before if n != "GMTCallback"]  # the others keep their order
    trainer.train()
    assert any("gmt/masked_fraction" in e for e in trainer.state.log_history)


def test_without_placement_the_order_is_kept_and_a_warning_names_the_fix(tmp_path, caplog):
    """GMTCallback no longer reorders the Trainer's callbacks by itself (it used to find the handler on the call stack)."""
    trainer = sft_trainer(tmp_path, GMTCallback(mask_ratio=0.3), report_to=["tensorboard"], max_steps=1)
    before = list(trainer.callback_handler.callbacks)
    with caplog.at_level(logging.WARNING, logger="gmt_plugins.integrations.transformers"):
        trainer.train()
    assert trainer.callback_handler.callbacks == before
    assert any("place_before_reporters" in r.getMessage() and "tensorboard" in r.getMessage() for r in caplog.records)
    assert any("gmt/masked_fraction" in e for e in trainer.state.log_history)  # log_history still gets them


def test_place_before_reporters_needs_one_gmt_callback(tmp_path):
    trainer = sft_trainer(tmp_path, TrainerCallback(), max_steps=1)
    with pytest.raises(ValueError, match="exactly one GMTCallback.*found 0"):
        place_before_reporters(trainer)
