"""SpIEL: a fixed number of active entries per tensor, periodically dropped and regrown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.strategies._masks import accumulate_finite_each
from gmt_plugins.strategies._sparse import (
    check_state_keys,
    load_float_tensors,
    on_device,
    top_count,
    trainable_plan,
)
from gmt_plugins.strategy_api import (
    GMTConfig,
    GradEntry,
    MaskPlan,
    MaskStrategy,
    StrategyRegistry,
    check_choice,
    check_float,
    check_int,
    hookimpl,
    load_bool_masks,
    stable_salt,
)

REGROW_CHOICES = ("gradient", "random")


@dataclass
class SpIELOptions:
    density: float = 0.01
    """Share of each tensor that is active (trained), in (0, 1]; constant through drop and regrowth."""
    update_interval: int = 100
    """Steps between drop-and-regrow updates of the active entries (the paper's reselection steps)."""
    drop_fraction: float = 0.2
    """Share of the active entries dropped (and as many regrown) at each update, in [0, 1]."""
    regrow: str = "gradient"
    """``gradient``: regrow the inactive entries of largest ``|sum of grad|`` since the last update; ``random``: uniformly."""

    def __post_init__(self) -> None:
        self.density = check_float("density", self.density, 0.0, 1.0, low_open=True)
        check_int("update_interval", self.update_interval, 1)
        self.drop_fraction = check_float("drop_fraction", self.drop_fraction, 0.0, 1.0)
        check_choice("regrow", self.regrow, REGROW_CHOICES)


def uniform_scores(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    """Uniform random scores from a CPU generator: the same draw on every device and process."""
    return torch.rand(numel, generator=torch.Generator().manual_seed(seed)).to(device)


class SpIELStrategy(MaskStrategy):
    """SpIEL, "Scaling Sparse Fine-Tuning to Large Language Models" (Ansell et al.,
    https://arxiv.org/abs/2401.16405), with gradient-accumulation regrowth (SpIEL-AG).

    Each tensor keeps ``k = floor(density * n)`` active entries, the only ones trained; they start
    as a uniform random draw (seeded from ``mask_seed`` and the name). Every ``update_interval``
    steps, in :meth:`on_step_boundary`:

    1. drop ``floor(drop_fraction * k)`` active entries whose ``|theta - theta_pretrained|`` is
       smallest;
    2. regrow as many among the entries not still active (the dropped ones included, as in the
       authors' code) by largest ``|sum of grad|`` since the last update (``regrow="gradient"``)
       or uniformly (``"random"``);
    3. a dropped entry that was not regrown returns to its pretrained value (its delta is removed),
       so the model is always ``theta_pretrained`` plus a delta on exactly ``k`` entries per tensor.

    Non-finite gradient entries add nothing to the accumulated gradient; ``mask_ratio`` and
    ``scope`` are unused. State: ``active`` (bool), ``pretrained`` (a copy of each tensor, its
    dtype) and ``accumulated`` (float32 gradient sums, with ``regrow="gradient"``), per name.
    """

    name = "spiel"
    options_class = SpIELOptions

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.active: dict[str, torch.Tensor] = {}
        self.pretrained: dict[str, torch.Tensor] = {}
        self.accumulated: dict[str, torch.Tensor] = {}

    def k(self, numel: int) -> int:
        return math.floor(self.options.density * numel)

    def start(self, name: str, param: torch.Tensor) -> None:
        flat = param.detach().reshape(-1)
        self.pretrained[name] = flat.clone()
        scores = uniform_scores(stable_salt(self.config.mask_seed, "spiel", name), flat.numel(), flat.device)
        self.active[name] = top_count(scores, self.k(flat.numel()), self.config.chunk_numel, largest=True)

    def on_step_boundary(self, params: Sequence[tuple[str, torch.nn.Parameter]], *, step: int) -> None:
        for name, param in params:
            if name not in self.active:
                self.start(name, param)
        if step > 0 and step % self.options.update_interval == 0:
            for name, param in params:
                self.drop_and_regrow(name, param.data.view(-1), step)

    def drop_and_regrow(self, name: str, flat: torch.Tensor, step: int) -> None:
        chunk, device = self.config.chunk_numel, flat.device
        active = on_device(self.active, name, device)
        pretrained = on_device(self.pretrained, name, device)
        n_drop = math.floor(self.options.drop_fraction * int(torch.count_nonzero(active)))
        if n_drop == 0:
            return
        delta = flat.float() - pretrained.float()
        dropped = top_count(delta, n_drop, chunk, largest=False, excluded=~active)  # NaN deltas are never dropped
        remaining = active & ~dropped
        if self.options.regrow == "gradient" and name in self.accumulated:
            scores = on_device(self.accumulated, name, device)
        else:
            scores = uniform_scores(stable_salt(self.config.mask_seed, "spiel", step, name), flat.numel(), device)
        grown = top_count(scores, int(torch.count_nonzero(dropped)), chunk, largest=True, excluded=remaining)
        reset = dropped & ~grown
        flat[reset] = pretrained[reset]
        self.active[name] = remaining | grown
        self.accumulated.pop(name, None)

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        if self.options.regrow == "gradient":
            held = [on_device(self.accumulated, e.name, e.flat.device) if e.name in self.accumulated else None for e in entries]
            for e, total in zip(entries, accumulate_finite_each(held, [e.flat for e in entries])):
                self.accumulated[e.name] = total
        return trainable_plan(entries, self.active, self.config.chunk_numel)

    def state_dict(self) -> dict[str, Any]:
        return {"active": dict(self.active), "pretrained": dict(self.pretrained), "accumulated": dict(self.accumulated)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"active", "pretrained", "accumulated"})
        self.active = load_bool_masks(state.get("active", {}), "active")
        self.pretrained = load_float_tensors(state.get("pretrained", {}), "pretrained")
        self.accumulated = load_float_tensors(state.get("accumulated", {}), "accumulated")


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(SpIELStrategy)
