"""GMT ranked by an exponential moving average of the gradient instead of the current gradient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.engine import dispatch
from gmt_plugins.engine.types import Ranking
from gmt_plugins.strategy_api import (
    DeferredTensorPlan,
    GMTConfig,
    GradEntry,
    KeyedStrategy,
    MaskPlan,
    ScoreKeys,
    StrategyRegistry,
    TensorPlan,
    check_float,
    hookimpl,
)


@dataclass
class GMTMomentumOptions:
    beta: float = 0.9
    """EMA factor in [0, 1): ``m = beta * m + (1 - beta) * g``; 0 is plain GMT."""

    def __post_init__(self) -> None:
        self.beta = check_float("beta", self.beta, 0.0, 1.0, high_open=True)


class GMTMomentumStrategy(KeyedStrategy):
    """GMT with momentum: a variant of Gradient-Mask Tuning (https://arxiv.org/abs/2406.15330).

    Every step the EMA ``m = beta * m + (1 - beta) * g`` is updated first, then the
    ``floor(mask_ratio * n)`` entries with the smallest ``|m|`` are masked (per tensor or globally,
    as ``scope`` says), so an entry whose gradient is consistently small stays masked even when one
    noisy step makes it large, and vice versa. The EMA of a parameter starts at its first gradient
    (no bias correction needed, and the first step is exactly GMT). Non-finite gradient entries
    leave their EMA unchanged (so one overflow step does not poison it) and are never masked.

    State: ``ema``, a float32 tensor per parameter name (one extra copy of the gradients).
    """

    name = "gmt_momentum"
    supports_sharded_gradients = True
    options_class = GMTMomentumOptions

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.ema: dict[str, torch.Tensor] = {}

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        first = [entry.name not in self.ema for entry in entries]
        for entry, new in zip(entries, first):
            ema = self.ema.get(entry.name)
            if new or ema.device != entry.flat.device:
                shape = entry.param.shape
                ema = torch.empty(shape, dtype=torch.float32, device=entry.flat.device) if new else ema.to(entry.flat.device)
                self.ema[entry.name] = ema
            elif ema.numel() != entry.flat.numel():
                raise ValueError(f"gmt_momentum state for {entry.name!r} has {ema.numel()} entries, the parameter {entry.flat.numel()}")
        scope_global = self.config.scope == "global"
        sizes = [len(entries)] if scope_global else [1] * len(entries)
        ranked = dispatch.ema_rank_step(
            [e.flat for e in entries], [self.ema[e.name].view(-1) for e in entries], first, sizes,
            beta=self.options.beta, ratio=self.config.mask_ratio, chunk_numel=self.config.chunk_numel,
            defer=not scope_global and self.deferrable,
        )
        if scope_global:
            ((source, ranking),) = ranked
            return MaskPlan([TensorPlan(source, i, ranking.cut, n, ranking) for i, n in enumerate(ranking.nonfinite)], shared_ties=True)
        return MaskPlan([DeferredTensorPlan(lambda r=r: _member(r)) if callable(r) else _member(r) for r in ranked])

    def key_source(self, entries: Sequence[GradEntry], *, step: int) -> ScoreKeys:
        return ScoreKeys.from_tensors([self.ema[e.name].view(-1) for e in entries])

    def state_dict(self) -> dict[str, Any]:
        # copies: the compiled update changes self.ema in place at the next step
        return {"ema": {k: v.clone() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"ema"}
        if unknown:
            raise ValueError(f"unknown gmt_momentum state keys {sorted(unknown)}")
        ema = state.get("ema", {})
        if not isinstance(ema, dict) or not all(isinstance(v, torch.Tensor) for v in ema.values()):
            raise ValueError("gmt_momentum state 'ema' must map parameter names to tensors")
        self.ema = {k: v.to(torch.float32, copy=True) for k, v in ema.items()}  # updated in place later


def _member(ranked: tuple[ScoreKeys, Ranking] | object) -> TensorPlan:
    """The plan of a one-tensor group (the tensor scope), ranking it first if it is still to rank."""
    source, ranking = ranked() if callable(ranked) else ranked
    return TensorPlan(source, 0, ranking.cut, ranking.nonfinite[0], ranking)


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(GMTMomentumStrategy)
