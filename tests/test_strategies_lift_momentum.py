"""lift (principal weights of a low-rank approximation) and gmt_momentum (GMT ranked by an EMA)."""

from __future__ import annotations

import math

import pytest
import torch

from reference import reference_masks
from test_strategies_common import grads_for, masker_for, step_once


def low_rank_plus_noise(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    signal = 10.0 * torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
    return signal + 3.0 * torch.randn(m, n, generator=gen)  # noise entries rival the signal's


def exact_rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


@pytest.mark.parametrize("shape", [(12, 40), (40, 60)], ids=["exact", "randomized"])
def test_lift_masks_smallest_entries_of_the_low_rank_approximation(shape):
    w = low_rank_plus_noise(*shape, seed=1)
    params = [("layers.0.w", torch.nn.Parameter(w.clone())), ("layers.0.b", torch.nn.Parameter(torch.randn(shape[0])))]
    zeroed = step_once(masker_for(params, "lift", {"rank": 2}, mask_ratio=0.75), params, grads_for(params, 0))
    masked = zeroed["layers.0.w"]
    assert int(masked.sum()) == math.floor(0.75 * w.numel())
    principal = exact_rank_r(w, 2).abs()
    # every masked entry is (up to the randomized SVD's error) smaller in |W_r| than every kept one
    assert principal[masked].max() <= principal[~masked].min() + 1e-3 * principal.max()
    assert not torch.equal(masked, reference_masks([w], 0.75, "tensor")[0])  # not plain |W|
    assert not zeroed["layers.0.b"].any()  # vectors="update" by default


def test_lift_refreshes_every_interval_from_the_current_weights():
    params = [("w", torch.nn.Parameter(low_rank_plus_noise(16, 20, seed=0)))]
    masker = masker_for(params, "lift", {"rank": 1, "interval": 3}, mask_ratio=0.5)
    masks = []
    for step in range(4):
        masks.append(step_once(masker, params, grads_for(params, step))["w"])
        params[0][1].data = low_rank_plus_noise(16, 20, seed=step + 10)  # the weights change a lot
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[2], masks[3])  # step 3 refreshed from the new weights
    assert masker.strategy.refreshed_at == 3


def test_lift_vector_choices():
    w, b = low_rank_plus_noise(8, 8, seed=2), torch.tensor([0.1, -5.0, 0.2, 3.0])
    for vectors, expected in [("freeze", [True] * 4), ("update", [False] * 4), ("magnitude", [True, False, True, False])]:
        params = [("w", torch.nn.Parameter(w.clone())), ("b", torch.nn.Parameter(b.clone()))]
        zeroed = step_once(masker_for(params, "lift", {"rank": 2, "vectors": vectors}, mask_ratio=0.5), params, grads_for(params, 0))
        assert zeroed["b"].tolist() == expected, vectors


# --- gmt_momentum -------------------------------------------------------------------------------


def shapes_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(f"t{i}", torch.nn.Parameter(torch.randn(s, generator=gen))) for i, s in enumerate([(30, 20), (50,), (7, 3, 4)])]


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_gmt_momentum_with_beta_zero_is_gmt(scope):
    a, b = shapes_params(), shapes_params()
    ma = masker_for(a, "gmt_momentum", {"beta": 0.0}, mask_ratio=0.4, scope=scope)
    mb = masker_for(b, "gmt", None, mask_ratio=0.4, scope=scope)
    for step in range(3):
        grads = grads_for(a, step)
        za, zb = step_once(ma, a, grads), step_once(mb, b, grads)
        assert all(torch.equal(za[n], zb[n]) for n in za)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_gmt_momentum_ranks_by_the_ema(scope):
    params = shapes_params()
    masker = masker_for(params, "gmt_momentum", {"beta": 0.8}, mask_ratio=0.4, scope=scope)
    ema = None
    for step in range(4):
        grads = grads_for(params, step)
        ema = [g.clone() for g in grads] if ema is None else [0.8 * m + 0.2 * g for m, g in zip(ema, grads)]
        zeroed = step_once(masker, params, grads)
        expected = reference_masks(grads, 0.4, scope, scores=[m.abs() for m in ema])
        assert all(torch.equal(zeroed[n], m) for (n, _), m in zip(params, expected))
    assert not all(torch.equal(zeroed[n], m) for (n, _), m in zip(params, reference_masks(grads, 0.4, scope)))


def test_gmt_momentum_nonfinite_does_not_poison_the_ema():
    params = shapes_params()
    masker = masker_for(params, "gmt_momentum", {"beta": 0.5}, mask_ratio=0.4)
    step_once(masker, params, grads_for(params, 0))
    before = masker.strategy.ema["t0"].clone()
    grads = grads_for(params, 1)
    grads[0][0, 0] = float("nan")
    step_once(masker, params, grads)
    ema = masker.strategy.ema["t0"]
    assert ema[0, 0] == before[0, 0] and torch.isfinite(ema).all()
    assert torch.isnan(params[0][1].grad[0, 0])
