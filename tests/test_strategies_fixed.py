"""Masks chosen once or grown step by step: sift, spt (fixed after warm-up) and id3 (monotonic growth)."""

from __future__ import annotations

import math

import pytest
import torch

from reference import reference_masks
from test_strategies_common import grads_for, make_model, masker_for, step_once


def flat_masks(zeroed, params):
    return [zeroed[n] for n, _ in params]


# --- sift ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sift_mask_is_chosen_at_first_step_then_fixed(scope):
    params = make_model()
    masker = masker_for(params, "sift", None, mask_ratio=0.9, scope=scope)
    g0 = grads_for(params, 0)
    first = step_once(masker, params, g0)
    assert [bool(torch.equal(first[n], m)) for (n, _), m in zip(params, reference_masks(g0, 0.9, scope))] == [True] * len(params)
    for step in range(1, 4):  # later gradients do not move the mask
        assert all(torch.equal(z, first[n]) for n, z in step_once(masker, params, grads_for(params, step)).items())
    state = masker.strategy.state_dict()["updatable"]
    assert all(torch.equal(state[n], ~first[n]) and state[n].dtype == torch.bool for n, _ in params)


def test_sift_warmup_updates_nothing_then_ranks_the_summed_gradient():
    params = make_model()
    masker = masker_for(params, "sift", {"warmup_steps": 2}, mask_ratio=0.75)
    g0, g1 = grads_for(params, 0), grads_for(params, 1)
    assert all(bool(z.all()) for z in step_once(masker, params, g0).values())
    second = step_once(masker, params, g1)
    summed = [(a + b).abs() for a, b in zip(g0, g1)]
    expected = reference_masks(g1, 0.75, "tensor", scores=summed)
    assert all(torch.equal(second[n], m) for (n, _), m in zip(params, expected))
    assert not all(torch.equal(second[n], m) for (n, _), m in zip(params, reference_masks(g1, 0.75, "tensor")))


# --- spt ----------------------------------------------------------------------------------------


def test_spt_updates_the_globally_most_sensitive_entries_even_with_tensor_scope():
    params = make_model()
    loud = {"lm_head.weight": 5.0}
    masker = masker_for(params, "spt", {"warmup_steps": 3}, mask_ratio=0.8, scope="tensor")
    grads = [grads_for(params, s, scale=loud) for s in range(3)]
    step_once(masker, params, grads[0])
    step_once(masker, params, grads[1])
    chosen = step_once(masker, params, grads[2])
    sensitivity = [sum(g[i].square() for g in grads) for i in range(len(params))]
    expected = reference_masks(grads[2], 0.8, "global", scores=sensitivity)
    assert all(torch.equal(chosen[n], m) for (n, _), m in zip(params, expected))
    n_total = sum(p.numel() for _, p in params)
    assert sum(int(m.sum()) for m in chosen.values()) == math.floor(0.8 * n_total)
    # the loud tensor keeps far more of its entries than the global 20 %
    assert (~chosen["lm_head.weight"]).float().mean() > 0.5
    assert all(torch.equal(z, chosen[n]) for n, z in step_once(masker, params, grads_for(params, 9)).items())


# --- id3 ----------------------------------------------------------------------------------------


def heuristic(g, p, eps, exponent):
    return g.abs() / (eps + p.detach().abs()) ** exponent


def test_id3_grows_monotonically_to_the_budget_by_the_heuristic():
    params = make_model()
    eps, exponent, steps_to_budget, ratio = 1e-2, 2.0, 4, 0.7
    masker = masker_for(params, "id3", {"eps": eps, "exponent": exponent, "steps_to_budget": steps_to_budget}, mask_ratio=ratio)
    n = sum(p.numel() for _, p in params)
    budget = n - math.floor(ratio * n)
    updatable = [torch.zeros(p.shape, dtype=torch.bool) for _, p in params]
    for step in range(7):
        grads = grads_for(params, step)
        scores = torch.cat([heuristic(g, p, eps, exponent).view(-1) for g, (_, p) in zip(grads, params)])
        zeroed = step_once(masker, params, grads, lr=0.05)
        now = [~zeroed[name] for name, _ in params]
        assert all(bool((new | ~old).all()) for new, old in zip(now, updatable))  # never shrinks
        count = sum(int(u.sum()) for u in now)
        assert count == min(budget, math.ceil(budget * (step + 1) / steps_to_budget))
        # the entries added at this step are the highest-scoring of those still masked (global)
        old_flat = torch.cat([u.view(-1) for u in updatable])
        added = torch.cat([u.view(-1) for u in now]) & ~old_flat
        if added.any():
            candidates = scores.masked_fill(old_flat, -1.0)
            top = torch.topk(candidates, int(added.sum())).indices
            assert torch.equal(added.nonzero().view(-1).sort().values, top.sort().values)
        updatable = now
    assert sum(int(u.sum()) for u in updatable) == budget


def test_id3_is_global_and_respects_exponent():
    params = make_model()
    with torch.no_grad():
        params[0][1].mul_(100.0)  # huge weights: the heuristic divides them away
    grads = [torch.ones(p.shape) for _, p in params]
    ranked = step_once(masker_for(params, "id3", {"steps_to_budget": 1, "exponent": 1.0}, mask_ratio=0.5), params, grads)
    assert bool(ranked["model.embed_tokens.weight"].all())  # all of it masked
    plain = step_once(masker_for(params, "id3", {"steps_to_budget": 1, "exponent": 0.0}, mask_ratio=0.5), params, grads)
    # with exponent 0 every score ties at |g| = 1: ties go in order, so the first tensor is kept
    assert not bool(plain["model.embed_tokens.weight"].any())
