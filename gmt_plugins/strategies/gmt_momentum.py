"""GMT ranked by an exponential moving average of the gradient instead of the current gradient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins import native, native_rank
from gmt_plugins.distributed import active_reducer
from gmt_plugins.selection import rank
from gmt_plugins.strategies._masks import PreselectedScoreKeys
from gmt_plugins.strategy_api import (
    Cut,
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

    def _update(self, entry: GradEntry) -> None:
        ema = self.ema.get(entry.name)
        lib = native.library() if native_rank.ema_usable(entry.flat) else None
        if lib is not None and (ema is None or (native_rank.ema_usable(ema) and ema.numel() == entry.flat.numel())):
            # one C pass in place; the torch lines below are its twin
            first = ema is None
            if first:
                ema = self.ema[entry.name] = torch.empty(entry.param.shape, dtype=torch.float32)
            native_rank.ema_f32(lib, ema.view(-1), entry.flat, self.options.beta, first=first)
            return
        grad = entry.flat.to(torch.float32)
        finite = torch.isfinite(grad)
        ema = self.ema.get(entry.name)
        if ema is None:
            self.ema[entry.name] = torch.where(finite, grad, 0.0).view(entry.param.shape)
            return
        if ema.numel() != grad.numel():
            raise ValueError(f"gmt_momentum state for {entry.name!r} has {ema.numel()} entries, the parameter {grad.numel()}")
        ema = ema.to(grad.device).view(-1)
        beta = self.options.beta
        self.ema[entry.name] = torch.where(finite, beta * ema + (1 - beta) * grad, ema).view(entry.param.shape)

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        fused = self._plan_fused(entries)
        if fused is not None:
            return fused
        # the twin of the fused plan: every EMA updated, then ranked as any score
        for entry in entries:
            self._update(entry)
        return super().plan(entries, step=step)

    def _plan_fused(self, entries: Sequence[GradEntry]) -> MaskPlan | None:
        """Every group's EMAs updated and ranked by one kernel call for the step (one read of gradient and
        EMA and one write of the EMA per tensor, plus a sample read before it:
        :func:`gmt_plugins.native_rank.ema_rank_groups`), where it serves every entry of the step;
        ``None`` otherwise (the twin in :meth:`plan` then runs)."""
        lib = native.library() if entries and active_reducer() is None else None
        overridden = type(self).key_source is not GMTMomentumStrategy.key_source or type(self)._update is not GMTMomentumStrategy._update
        if lib is None or overridden:
            return None
        if not native_rank.usable([e.flat for e in entries]):
            return None
        for entry in entries:
            ema = self.ema.get(entry.name)
            if not native_rank.ema_usable(entry.flat) or (
                ema is not None and not (native_rank.ema_usable(ema) and ema.numel() == entry.flat.numel())
            ):
                return None
        first = [entry.name not in self.ema for entry in entries]
        for entry, new in zip(entries, first):
            if new:
                self.ema[entry.name] = torch.empty(entry.param.shape, dtype=torch.float32)
        emas = [self.ema[e.name].view(-1) for e in entries]
        ratio, beta, chunk = self.config.mask_ratio, self.options.beta, self.config.chunk_numel
        scope_global = self.config.scope == "global"
        groups = [list(range(len(entries)))] if scope_global else [[i] for i in range(len(entries))]

        def plans_of(group: list[int], result: native_rank.GroupResult | None, selection: native_rank.Preselection | None) -> list[TensorPlan]:
            scores = [emas[i] for i in group]
            if result is None or selection is None:  # outside the sampled window: the EMAs are updated, rank them
                plain = ScoreKeys.from_tensors(scores)
                cut, counts = rank(plain, [(j, entries[i].flat) for j, i in enumerate(group)], ratio, chunk_numel=chunk)
                return [TensorPlan(plain, j, cut, n) for j, n in enumerate(counts.nonfinite)]
            cut = Cut(result.threshold, result.ties if result.threshold is not None else 0)
            source = PreselectedScoreKeys(scores, selection)
            return [TensorPlan(source, j, cut, n) for j, n in enumerate(result.nonfinite)]

        if not scope_global and self.deferrable:
            # each tensor's EMA updated and ranked when the masker reaches it, so that the apply reads a
            # gradient the ranking has just left in cache (a selection's buffers serve one call at a time:
            # each tensor is masked before the next is ranked)
            def resolve(i: int) -> TensorPlan:
                ((result, selection),) = native_rank.ema_rank_groups(
                    lib, [entries[i].flat], [emas[i]], [first[i]], [1], beta=beta, ratio=ratio, k=None
                )
                return plans_of([i], result, selection)[0]

            return MaskPlan([DeferredTensorPlan(lambda i=i: resolve(i)) for i in range(len(entries))])
        ranked = native_rank.ema_rank_groups(
            lib, [e.flat for e in entries], emas, first, [len(g) for g in groups], beta=beta, ratio=ratio, k=None
        )
        plans: list[TensorPlan] = []
        for group, (result, selection) in zip(groups, ranked):
            plans += plans_of(group, result, selection)
        return MaskPlan(plans, shared_ties=scope_global)

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


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(GMTMomentumStrategy)
