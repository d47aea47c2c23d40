"""The sparse fine-tuning strategies sara, dsee, spiel and lt_sft: common contract and each one's
defining behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.plugins import strategy_registry
from gmt_plugins.state_io import load_state, save_state
from reference import reference_masks
from test_strategies_common import SPARSE, grads_for, make_model, masker_for, run_steps, same_masks, step_once
from test_strategies_common import SPARSE_OPTIONS as OPTIONS

CONFIG = {"mask_seed": 3}


def clone(params):
    return [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]


# --- the common contract --------------------------------------------------------------------


def test_registered_and_refused_under_sharded_gradients(pm):
    registry = strategy_registry(pm)
    for name in SPARSE:
        assert name in registry
        # their decisions need whole tensors (ranks within a tensor, SVDs, resets): refused by name
        assert registry.get(name).supports_sharded_gradients is False


@pytest.mark.parametrize("strategy", SPARSE)
def test_reproducible_and_masks_something(strategy):
    runs = []
    for _ in range(2):
        params = make_model()
        runs.append(run_steps(masker_for(params, strategy, OPTIONS[strategy], **CONFIG), params, 6))
    assert same_masks(*runs)
    assert sum(int(m.sum()) for m in runs[0][-1].values()) > 0


@pytest.mark.parametrize("strategy", SPARSE)
def test_nonfinite_gradients_are_never_zeroed(strategy):
    params = make_model()
    masker = masker_for(params, strategy, OPTIONS[strategy], **CONFIG)
    masked_any = False
    for step in range(6):
        grads = grads_for(params, step)
        for g in grads:  # a NaN and an inf in every tensor, every step
            g.view(-1)[0], g.view(-1)[-1] = float("nan"), float("inf")
        for (_, p), g in zip(params, grads):
            p.grad = g.clone()
        stats = masker.apply()
        assert stats.nonfinite == 2 * len(params)
        masked_any |= stats.masked > 0
        for _, p in params:
            assert torch.isnan(p.grad.view(-1)[0]) and p.grad.view(-1)[-1] == float("inf")
            p.grad = None
    assert masked_any


@pytest.mark.parametrize("strategy", SPARSE)
def test_state_round_trip_mid_run_gives_identical_masks_and_weights(strategy, tmp_path):
    params = make_model()
    masker = masker_for(params, strategy, OPTIONS[strategy], **CONFIG)
    run_steps(masker, params, 3)
    save_state(masker.state_dict(), str(tmp_path))
    resumed_params = clone(params)
    resumed = masker_for(resumed_params, strategy, OPTIONS[strategy], **CONFIG)
    resumed.load_state_dict(load_state(str(tmp_path)))
    expected = run_steps(masker, params, 5, start=3)
    assert same_masks(run_steps(resumed, resumed_params, 5, start=3), expected)
    for (_, a), (_, b) in zip(params, resumed_params):
        assert torch.equal(a, b)


# --- sara -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sara_trains_exactly_the_smallest_weights(scope):
    params = make_model()
    weights = [p.detach().clone() for _, p in params]
    zeroed = step_once(masker_for(params, "sara", {"fraction": 0.15}, scope=scope), params, grads_for(params, 0))
    # the slow twin: sort |w| and take the floor(0.15 * n) smallest, per tensor or over all tensors
    trainable = reference_masks(weights, 0.15, scope, scores=[w.abs() for w in weights])
    for (name, _), t in zip(params, trainable):
        assert torch.equal(zeroed[name], ~t), name
    if scope == "tensor":
        for (name, p), t in zip(params, trainable):
            assert int(t.sum()) == math.floor(0.15 * p.numel())


def test_sara_reselects_from_the_current_weights_every_interval():
    params = [("w", torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0))))]
    masker = masker_for(params, "sara", {"fraction": 0.25, "interval": 3})
    masks = []
    for step in range(4):
        masks.append(step_once(masker, params, grads_for(params, step))["w"])
        params[0][1].data = torch.randn(8, 8, generator=torch.Generator().manual_seed(step + 10))
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[2], masks[3]) and masker.strategy.selected_at == 3


def test_sara_without_interval_keeps_its_first_choice():
    params = make_model()
    masker = masker_for(params, "sara", {"fraction": 0.2})
    masks = run_steps(masker, params, 4, lr=1.0)  # large steps: |w| order changes a lot
    assert all(torch.equal(masks[0][n], m[n]) for m in masks for n in m)


# --- dsee -----------------------------------------------------------------------------------


def low_rank_plus_spikes(m: int, n: int, spikes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-2 matrix whose entries are larger than ``spikes`` sparse outliers added to it: ``|W|``
    alone ranks the low-rank part first, ``|W - W_2|`` finds the outliers."""
    gen = torch.Generator().manual_seed(seed)
    w = 5.0 * torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
    where = torch.zeros(m * n, dtype=torch.bool)
    where[torch.randperm(m * n, generator=gen)[:spikes]] = True
    w.view(-1)[where] += 3.0 * torch.where(torch.rand(spikes, generator=gen) < 0.5, -1.0, 1.0)
    return w, where.view(m, n)


@pytest.mark.parametrize("shape", [(24, 30), (64, 80)], ids=["small", "randomized"])
def test_dsee_trains_the_entries_the_low_rank_approximation_misses(shape):
    w, spikes = low_rank_plus_spikes(*shape, spikes=12, seed=1)
    params = [("layers.0.w", torch.nn.Parameter(w.clone())), ("layers.0.b", torch.nn.Parameter(torch.randn(shape[0])))]
    zeroed = step_once(masker_for(params, "dsee", {"rank": 2, "num_sparse": 12}), params, grads_for(params, 0))
    assert torch.equal(~zeroed["layers.0.w"], spikes)
    assert bool(zeroed["layers.0.b"].all())  # vectors="freeze" by default
    largest_w = reference_masks([w], 1 - 12 / w.numel(), "tensor")[0]  # plain |W| would choose others
    assert not torch.equal(~largest_w, spikes)


def test_dsee_matches_its_slow_twin_exact_svd_and_sorting():
    from gmt_plugins.strategies._sparse import reference_top_count

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(10, 12, generator=gen)
    params = [("w", torch.nn.Parameter(w.clone()))]
    zeroed = step_once(masker_for(params, "dsee", {"rank": 3, "density": 0.25}), params, grads_for(params, 0))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    residual = (w.double() - (u[:, :3] * s[:3]) @ vh[:3]).abs().view(-1)
    expected = reference_top_count(residual, 30, largest=True).view(10, 12)
    # the randomized SVD is exact to float32 rounding here, so only near-ties could differ
    assert int((~zeroed["w"] != expected).sum()) <= 2 and int((~zeroed["w"]).sum()) == 30


def test_top_count_matches_its_twin_with_ties_nonfinite_and_exclusions():
    from gmt_plugins.strategies._sparse import reference_top_count, top_count

    gen = torch.Generator().manual_seed(0)
    score = torch.randint(-4, 5, (300,), generator=gen).float()  # many ties
    score[[3, 50]] = float("nan")
    score[7] = float("inf")
    excluded = torch.rand(300, generator=gen) < 0.3
    for largest in (True, False):
        for k in (0, 1, 17, 150, 400):
            for ex in (None, excluded):
                got = top_count(score, k, 64, largest=largest, excluded=ex)
                assert torch.equal(got, reference_top_count(score, k, largest=largest, excluded=ex)), (largest, k, ex is None)


def test_dsee_mask_is_fixed_and_dense_patterns_are_trained_fully():
    w, _ = low_rank_plus_spikes(16, 16, spikes=5, seed=2)
    params = [("q.weight", torch.nn.Parameter(w.clone())), ("q.lora_A.weight", torch.nn.Parameter(torch.randn(2, 16))), ("norm", torch.nn.Parameter(torch.ones(16)))]
    masker = masker_for(params, "dsee", {"rank": 2, "num_sparse": 5, "vectors": "update"})
    masks = run_steps(masker, params, 3, lr=1.0)
    for step in masks[1:]:
        assert all(torch.equal(step[n], masks[0][n]) for n in step)
    assert int((~masks[0]["q.weight"]).sum()) == 5
    assert not masks[0]["q.lora_A.weight"].any() and not masks[0]["norm"].any()


def lora_model(unfreeze_base: bool):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from tiny import tiny_llama

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if unfreeze_base:
        for name, p in model.named_parameters():
            if "base_layer.weight" in name:
                p.requires_grad_(True)
    return model


def test_dsee_with_a_lora_adapter_trains_lora_fully_and_the_base_sparsely():
    model = lora_model(unfreeze_base=True)
    masker = GradientMasker(model, GMTConfig(strategy="dsee", strategy_options={"rank": 2, "num_sparse": 10}))
    names = masker.names
    assert any("lora_A" in n for n in names) and any("base_layer.weight" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        masker.apply()
        optimizer.step()
    trainable = masker.strategy.trainable
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        if "base_layer.weight" in name:
            assert int(trainable[name].sum()) == 10 and not bool(moved[~trainable[name]].any()), name
            assert bool(moved.any()), name
        elif "lora_" in name:
            assert bool(trainable[name].all()), name
        else:
            assert not bool(moved.any()), name  # the frozen rest of the base
    assert any(bool((model.get_parameter(n) != before[n]).any()) for n in names if "lora_B" in n)


def test_dsee_on_a_lora_adapter_alone_is_refused_with_the_fix_named():
    model = lora_model(unfreeze_base=False)
    masker = GradientMasker(model, GMTConfig(strategy="dsee"))
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="base_layer.weight"):
        masker.apply()


# --- spiel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("regrow", ["gradient", "random"])
def test_spiel_keeps_density_constant_through_drop_and_regrow(regrow):
    params = make_model()
    pretrained = {n: p.detach().clone() for n, p in params}
    masker = masker_for(params, "spiel", {"density": 0.25, "update_interval": 3, "drop_fraction": 0.5, "regrow": regrow})
    history = run_steps(masker, params, 10, lr=0.1)
    for step in history:
        for name, p in params:
            assert int((~step[name]).sum()) == math.floor(0.25 * p.numel()), name
    changed = sum(int((history[2][n] != history[3][n]).sum()) for n in history[0])
    assert changed > 0 and all(torch.equal(history[3][n], history[5][n]) for n in history[0])
    # the model is the pretrained one plus a delta on the active entries only: dropped entries were reset
    for name, p in params:
        active = masker.strategy.active[name].view(p.shape)
        assert torch.equal(p.detach()[~active], pretrained[name][~active]), name


def test_spiel_drops_the_smallest_deltas_and_regrows_by_accumulated_gradient():
    from gmt_plugins.strategies._sparse import reference_top_count

    gen = torch.Generator().manual_seed(0)
    params = [("w", torch.nn.Parameter(torch.randn(20, 10, generator=gen)))]
    options = {"density": 0.2, "update_interval": 4, "drop_fraction": 0.25}
    masker = masker_for(params, "spiel", options)
    grads = [grads_for(params, s)[0] for s in range(5)]
    for s in range(4):
        step_once(masker, params, [grads[s]], lr=0.05 * (s + 1))
    strategy = masker.strategy
    active_before = strategy.active["w"].clone()
    weights_before = params[0][1].detach().clone().view(-1)
    delta = weights_before - strategy.pretrained["w"]
    accumulated = sum(g.view(-1) for g in grads[:4])  # summed over the steps since the start
    # the slow twin of one update: sort the active |delta|s, then the non-remaining |sum of grad|s
    dropped = reference_top_count(delta, 10, largest=False, excluded=~active_before)
    remaining = active_before & ~dropped
    grown = reference_top_count(accumulated, 10, largest=True, excluded=remaining)
    step_once(masker, params, [grads[4]])
    assert torch.equal(strategy.active["w"], remaining | grown)
    reset = dropped & ~grown
    assert int(reset.sum()) > 0 and torch.equal(params[0][1].detach().view(-1)[reset], strategy.pretrained["w"][reset])


# --- lt_sft ---------------------------------------------------------------------------------


def lt_sft_run(seed: int, steps: int, options: dict, grad_seed: int = 100):
    params = make_model(seed)
    pretrained = {n: p.detach().clone() for n, p in params}
    masker = masker_for(params, "lt_sft", options)
    history = run_steps(masker, params, steps, lr=0.1, seed=grad_seed)
    return params, pretrained, masker, history


def test_lt_sft_full_phase_then_reset_then_only_the_entries_that_moved_most():
    from gmt_plugins.strategies._sparse import reference_top_count

    options = {"full_steps": 3, "num_entries": 40}
    params, pretrained, masker, history = lt_sft_run(0, 3, options)
    assert all(not m.any() for step in history for m in step.values())  # phase 1 masks nothing
    moved = torch.cat([(p.detach() - pretrained[n]).view(-1) for n, p in params])
    expected = reference_top_count(moved, 40, largest=True)  # the slow twin: a global sort
    run_steps(masker, params, 4, start=3, lr=0.1)
    chosen = torch.cat([masker.strategy.trainable[n].view(-1) for n, _ in params])
    assert torch.equal(chosen, expected) and int(chosen.sum()) == 40
    for name, p in params:  # reset at step 3, then only chosen entries moved (SGD)
        keep = masker.strategy.trainable[name]
        assert torch.equal(p.detach()[~keep], pretrained[name][~keep]), name
    assert any(not torch.equal(p.detach(), pretrained[n]) for n, p in params)


def test_lt_sft_phase_two_masks_all_but_the_chosen_and_ends_after_sparse_steps():
    params, _, masker, history = lt_sft_run(0, 8, {"full_steps": 2, "sparse_steps": 3, "density": 0.1})
    total = sum(p.numel() for _, p in params)
    for step in history[2:5]:
        assert sum(int((~m).sum()) for m in step.values()) == math.floor(0.1 * total)
    for step in history[5:]:
        assert all(bool(m.all()) for m in step.values())  # after phase 2 every entry is frozen


def test_lt_sft_state_saved_in_phase_two_resumes_identically(tmp_path):
    options = {"full_steps": 2, "density": 0.2}
    params, _, masker, _ = lt_sft_run(0, 4, options)
    save_state(masker.state_dict(), str(tmp_path))
    assert sum(v.numel() for v in masker.strategy.pretrained.values()) == sum(int(m.sum()) for m in masker.strategy.trainable.values())
    resumed_params = clone(params)
    resumed = masker_for(resumed_params, "lt_sft", options)
    resumed.load_state_dict(load_state(str(tmp_path)))
    assert same_masks(run_steps(resumed, resumed_params, 3, start=4), run_steps(masker, params, 3, start=4))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(params, resumed_params))


def test_lt_sft_sparse_delta_export_reapplies_to_the_base(tmp_path):
    from gmt_plugins.sparse_delta import apply_sparse_delta, load_sparse_delta, save_sparse_delta, sparse_difference

    params, pretrained, masker, _ = lt_sft_run(0, 6, {"full_steps": 2, "num_entries": 30})
    delta = masker.strategy.sparse_delta(params)
    assert delta.nnz == 30
    save_sparse_delta(delta, str(tmp_path / "delta.safetensors"))
    loaded = load_sparse_delta(str(tmp_path / "delta.safetensors"))
    base = {n: t.clone() for n, t in pretrained.items()}
    apply_sparse_delta(base, loaded)
    for name, p in params:
        torch.testing.assert_close(base[name], p.detach(), rtol=0, atol=1e-6)
        keep = masker.strategy.trainable[name]
        assert torch.equal(base[name][~keep], pretrained[name][~keep])
    # the generic difference of two models finds the same support (the entries that really moved)
    generic = sparse_difference(dict(params), pretrained)
    for name, part in generic.tensors.items():
        assert set(part.indices.tolist()) <= set(delta.tensors[name].indices.tolist())


def test_sparse_differences_compose_by_addition():
    from gmt_plugins.sparse_delta import add_sparse_deltas, apply_sparse_delta, sparse_difference

    base = dict(make_model(0))
    base = {n: p.detach() for n, p in base.items()}
    deltas = []
    for grad_seed in (100, 200):  # two sparse fine-tunings of the same base ("language" and "task")
        params, pretrained, masker, _ = lt_sft_run(0, 5, {"full_steps": 2, "num_entries": 25}, grad_seed=grad_seed)
        deltas.append(masker.strategy.sparse_delta(params))
    both = add_sparse_deltas(*deltas)
    assert both.nnz <= deltas[0].nnz + deltas[1].nnz
    one_by_one = {n: t.clone() for n, t in base.items()}
    for d in deltas:
        apply_sparse_delta(one_by_one, d)
    at_once = {n: t.clone() for n, t in base.items()}
    apply_sparse_delta(at_once, deltas[0] + deltas[1])
    for name in base:
        # the slow twin: dense differences added to the base
        dense = base[name] + sum(d.tensors[name].to_dense() for d in deltas if name in d.tensors)
        torch.testing.assert_close(at_once[name], dense, rtol=0, atol=1e-6)
        torch.testing.assert_close(one_by_one[name], dense, rtol=0, atol=1e-6)
    removed = {n: t.clone() for n, t in at_once.items()}
    apply_sparse_delta(removed, both, scale=-1.0)
    assert all(torch.allclose(removed[n], base[n], atol=1e-6) for n in base)
    assert sparse_difference(base, base).nnz == 0


def test_sparse_delta_errors_name_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    from gmt_plugins.sparse_delta import SparseDelta, TensorDelta, apply_sparse_delta, load_sparse_delta

    delta = SparseDelta({"w": TensorDelta((2, 3), torch.tensor([0, 5]), torch.tensor([1.0, -1.0]))})
    with pytest.raises(KeyError, match="'w'"):
        apply_sparse_delta({"v": torch.zeros(2, 3)}, delta)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        apply_sparse_delta({"w": torch.zeros(3, 2)}, delta)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a sparse difference"):
        load_sparse_delta(str(tmp_path / "other.safetensors"))
    with pytest.raises(RuntimeError, match="phase 1"):
        masker_for(make_model(), "lt_sft", {"full_steps": 5}).strategy.sparse_delta([])


# --- every strategy in a plain loop ---------------------------------------------------------


@pytest.mark.parametrize("strategy", SPARSE)
def test_plain_loop_with_sgd_moves_only_unmasked_entries(strategy):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masker = GradientMasker(model, GMTConfig(strategy=strategy, strategy_options=OPTIONS[strategy], mask_seed=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(6):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        masker.apply()
        kept = {n: p.grad != 0 for n, p in model.named_parameters()}
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        for n, p in model.named_parameters():
            assert torch.equal(p[~kept[n]], start[n][~kept[n]]), n  # a masked entry does not move
        assert any(bool((grads[n] != 0).any()) for n in grads)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("strategy", SPARSE)
def test_bfloat16_parameters_keep_exact_pretrained_values_outside_the_update(strategy):
    params = [(n, torch.nn.Parameter(p.detach().to(torch.bfloat16))) for n, p in make_model()]
    pretrained = {n: p.detach().clone() for n, p in params}
    masker = masker_for(params, strategy, OPTIONS[strategy], **CONFIG)
    for step in range(6):
        for (_, p), g in zip(params, grads_for(params, step)):
            p.grad = g.to(torch.bfloat16)
        masker.apply()
        with torch.no_grad():
            for _, p in params:
                p -= 0.1 * p.grad
    kept = {"spiel": "active", "lt_sft": "trainable", "dsee": "trainable"}.get(strategy)
    for name, p in params:
        assert p.dtype == torch.bfloat16
        if kept is not None:
            outside = ~getattr(masker.strategy, kept)[name].view(p.shape)
            assert torch.equal(p.detach()[outside], pretrained[name][outside]), name


# --- every strategy in the Trainer ----------------------------------------------------------

TRAINER_OPTIONS = {
    "sara": {"fraction": 0.2, "interval": 2},
    "dsee": {"rank": 2, "density": 0.1, "vectors": "update"},
    "spiel": {"density": 0.2, "update_interval": 2},
    "lt_sft": {"full_steps": 2, "density": 0.05},
}


@pytest.mark.parametrize("strategy", SPARSE)
def test_trainer_runs_each_strategy_and_updates_only_its_entries(tmp_path, strategy):
    pytest.importorskip("transformers")
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from gmt_plugins import GMTCallback
    from tiny import cpu_args, text_dataset, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    data = text_dataset().map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    model = tiny_llama()
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = GMTCallback(strategy=strategy, strategy_options=TRAINER_OPTIONS[strategy], mask_seed=2)
    args = TrainingArguments(output_dir=str(tmp_path), **cpu_args(max_steps=4, per_device_train_batch_size=4, learning_rate=0.5, lr_scheduler_type="constant"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # a zero gradient never moves an entry
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[callback], optimizers=(optimizer, None))
    trainer.train()
    assert callback.masker.step == 4 and callback.last_stats.masked > 0
    strategy_obj = callback.masker.strategy
    kept = {"sara": None, "dsee": "trainable", "spiel": "active", "lt_sft": "trainable"}[strategy]
    moved_any = False
    for name, p in model.named_parameters():
        moved = p.detach() != pretrained[name]
        moved_any |= bool(moved.any())
        if kept is not None:  # fixed (or, for spiel, current) sets: nothing outside them differs from pretrained
            assert not bool(moved[~getattr(strategy_obj, kept)[name].view(p.shape)].any()), name
    assert moved_any


@pytest.mark.parametrize("strategy", ["spiel", "lt_sft"])
def test_trainer_resume_is_identical_to_uninterrupted(tmp_path, strategy):
    pytest.importorskip("trl")
    from test_trainer_integration import final_params, sft_trainer

    from gmt_plugins import GMTCallback

    options = {"spiel": {"density": 0.2, "update_interval": 2}, "lt_sft": {"full_steps": 3, "density": 0.05}}[strategy]
    common = dict(optim="adamw_torch", weight_decay=0.1, learning_rate=1e-2, max_steps=6, save_strategy="steps", save_steps=3)
    full = sft_trainer(tmp_path / "full", GMTCallback(strategy=strategy, strategy_options=options, mask_seed=5, strict=True), **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "gmt_state.safetensors").is_file()  # the pretrained copy and masks, never pickled
    resumed_callback = GMTCallback(strategy=strategy, strategy_options=options, mask_seed=5, strict=True)
    resumed = sft_trainer(tmp_path / "resumed", resumed_callback, resume_from_checkpoint=str(checkpoint), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = final_params(full), final_params(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
