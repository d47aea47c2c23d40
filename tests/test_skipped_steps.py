"""A step that an AMP GradScaler skips (inf/NaN gradients) moves no strategy state."""

from __future__ import annotations

import pytest
import torch

from gmt_plugins import GradientMasker
from test_resume import assert_same_state
from tiny_trainer import OPTIONS, TinyNet

STATEFUL = ["gmt_momentum", "id3", "lift", "sift", "spt", "ist"]


def batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 8, generator=g)
    return x, x.sum(-1).sin()


@pytest.mark.parametrize("strategy", STATEFUL)
def test_grad_scaler_skipped_step_moves_no_strategy_state(strategy):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masker = GradientMasker(model, mask_ratio=0.3, strategy=strategy, strategy_options=OPTIONS.get(strategy))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch()

    def step(poison: bool):
        optimizer.zero_grad()
        loss = model(x, y)["loss"]
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.unscale_(optimizer)
        masker.apply()
        scaler.step(optimizer)
        scaler.update()

    step(poison=False)
    step(poison=False)
    before = masker.state_dict()
    before = {**before, "strategy_state": _clone(before["strategy_state"])}
    weights = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    step(poison=True)
    assert scaler.get_scale() < scale and all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))  # skipped
    assert_same_state(before["strategy_state"], masker.state_dict()["strategy_state"])
    step(poison=False)  # and the next finite step moves it again, from where it was
    assert masker.step == 4


def test_finite_steps_still_move_the_state():
    torch.manual_seed(0)
    model = TinyNet()
    masker = GradientMasker(model, mask_ratio=0.3, strategy="gmt_momentum")
    x, y = batch()
    model(x, y)["loss"].backward()
    masker.apply()
    first = {k: v.clone() for k, v in masker.strategy.state_dict()["ema"].items()}
    model.zero_grad()
    (2 * model(x, y)["loss"]).backward()
    masker.apply()
    assert any(not torch.equal(first[k], v) for k, v in masker.strategy.state_dict()["ema"].items())


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value
