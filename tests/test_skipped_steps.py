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


@pytest.mark.parametrize("strategy", ["sift", "lift", "ist"])
def test_each_gradient_is_counted_for_nonfinite_once_per_step(strategy, monkeypatch):
    """The skipped-step check of a stateful strategy counts every gradient's NaN/inf entries; the
    plan reuses those counts (one read, not two), and the statistics still carry the exact counts."""
    from gmt_plugins.engine.cpu import loader
    from gmt_plugins.engine.cpu import histogram as cpu_histogram
    from gmt_plugins.engine.cpu import moves as cpu_moves
    from gmt_plugins.engine import dispatch
    from gmt_plugins.engine.cpu import rank as cpu_rank

    if dispatch.kernel() is None:
        pytest.skip("the compiled kernel is unavailable: the count goes through the torch chunks")
    calls = []
    counter = cpu_rank.count_nonfinite_f32
    monkeypatch.setattr(cpu_rank, "count_nonfinite_f32", lambda lib, flat: calls.append(flat.data_ptr()) or counter(lib, flat))
    torch.manual_seed(0)
    model = TinyNet()
    masker = GradientMasker(model, mask_ratio=0.3, strategy=strategy, strategy_options=OPTIONS.get(strategy))
    x, y = batch()
    params = [p for p in model.parameters()]
    for step in range(3):
        model.zero_grad()
        model(x, y)["loss"].backward()
        poisoned = params[0].grad.view(-1)
        poisoned[: step + 1] = float("nan")  # step + 1 NaN entries in the first tensor
        calls.clear()
        stats = masker.apply()
        assert sorted(calls) == sorted(p.grad.data_ptr() for p in params), step  # each gradient once
        assert [t.nonfinite for t in stats.tensors] == [step + 1] + [0] * (len(params) - 1)
        assert poisoned[: step + 1].isnan().all()  # and never masked away
