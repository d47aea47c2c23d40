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
from test_strategies_common import grads_for, make_model, masker_for, run_steps, same_masks, step_once

SPARSE = ["sara", "dsee", "spiel"]
OPTIONS = {
    "sara": {"fraction": 0.2, "interval": 2},
    "dsee": {"rank": 2, "density": 0.2},
    "spiel": {"density": 0.3, "update_interval": 2, "drop_fraction": 0.5},
}
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


@pytest.mark.parametrize("strategy", SPARSE)
def test_load_rejects_unknown_state(strategy):
    masker = masker_for(make_model(), strategy, OPTIONS[strategy], **CONFIG)
    with pytest.raises(ValueError, match="unknown"):
        masker.strategy.load_state_dict({"bogus": 1})


BAD_OPTIONS = [
    ("sara", {"fraction": 0.0}, "fraction"),
    ("sara", {"fraction": 1.5}, "fraction"),
    ("sara", {"interval": 0}, "interval"),
    ("dsee", {"rank": 0}, "rank"),
    ("dsee", {"density": -0.1}, "density"),
    ("dsee", {"num_sparse": 0}, "num_sparse"),
    ("dsee", {"dense": "lora_"}, "dense"),
    ("dsee", {"vectors": "magnitude"}, "vectors"),
    ("spiel", {"density": 0}, "density"),
    ("spiel", {"update_interval": 0}, "update_interval"),
    ("spiel", {"drop_fraction": 1.1}, "drop_fraction"),
    ("spiel", {"regrow": "momentum"}, "regrow"),
]


@pytest.mark.parametrize("strategy,options,option", BAD_OPTIONS)
def test_invalid_options_name_the_option(strategy, options, option):
    with pytest.raises(ValueError, match=option):
        masker_for(make_model(), strategy, options)


@pytest.mark.parametrize("strategy", SPARSE)
def test_unknown_option_is_rejected(strategy):
    with pytest.raises(ValueError, match="not options"):
        masker_for(make_model(), strategy, {"no_such_option": 1})


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
