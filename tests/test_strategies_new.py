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

SPARSE = ["sara"]
OPTIONS = {
    "sara": {"fraction": 0.2, "interval": 2},
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
