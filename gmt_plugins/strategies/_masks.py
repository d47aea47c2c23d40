"""Building blocks shared by the selective-update strategies.

Strategies never touch gradients: they describe what to zero as a :class:`MaskPlan` whose key
sources the engine reads (:mod:`gmt_plugins.engine.dispatch`). This module provides

* :func:`mask_plan`: a plan zeroing stored boolean masks or whole tensors
  (:class:`~gmt_plugins.engine.keys.MaskKeys`, read through :func:`stored_mask`);
* :func:`accumulate_finite`: a running sum of the finite gradient entries (SIFT, SPT, SpIEL);
* :func:`cut_for_count`, :func:`mark` and :func:`lowest_fraction`: the engine's exact selection of
  the ``k`` smallest keys, turned into boolean masks a strategy can keep as state;
* :class:`WarmupMaskStrategy`: a mask chosen from scores accumulated over warm-up steps, then
  fixed (SIFT, SPT);
* option validation helpers.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gmt_plugins.config import GMTConfig
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.keys import MaskKeys, ScoreKeys, StoredMask
from gmt_plugins.engine.types import Cut, KeySource
from gmt_plugins.strategies.base import GradEntry, MaskPlan, MaskStrategy, TensorPlan

stored_mask = dispatch.stored_mask


# --- option validation ------------------------------------------------------------------------


def check_int(option: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"option {option!r} must be an integer >= {minimum}, got {value!r}")


def check_float(option: str, value: Any, low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"option {option!r} must be a number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def check_choice(option: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"option {option!r} must be one of {list(allowed)}, got {value!r}")


def check_patterns(option: str, value: Any) -> list[str]:
    import re

    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"option {option!r} must be a list of regular expressions, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"option {option!r}: {pattern!r} is not a valid regular expression: {err}") from None
    return list(value)


# --- plans of stored masks --------------------------------------------------------------------


def mask_plan(entries: Sequence[GradEntry], masked: Sequence[torch.Tensor | StoredMask | bool], chunk_numel: int) -> MaskPlan:
    """A plan zeroing, per entry, the finite entries of a flat bool mask, or those a
    :class:`StoredMask` does not keep (or of the whole tensor when ``True``; nothing when ``False``)."""
    source = MaskKeys(masked)
    plans = []
    for i, (entry, m) in enumerate(zip(entries, masked)):
        if isinstance(m, (torch.Tensor, StoredMask)) and m.numel() != entry.flat.numel():
            raise ValueError(f"stored mask of {entry.name!r} has {m.numel()} entries, its gradient {entry.flat.numel()}")
        # an all-False mask gets Cut(1) too: it zeroes nothing, and testing it first costs a pass
        plans.append(TensorPlan(source, i, Cut(None) if m is False else Cut(1), entry.nonfinite_count(chunk_numel)))
    return MaskPlan(plans)


# --- selection into masks ---------------------------------------------------------------------


def cut_for_count(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]], k: int, chunk_numel: int) -> Cut:
    """The cut selecting exactly ``min(k, rankable)`` smallest keys over ``flats`` (ties in order): a
    count rather than a ratio (a ratio cannot express every count exactly in floating point)."""
    if not flats or k <= 0:
        return Cut(None)
    return dispatch.rank(source, flats, k=k, chunk_numel=chunk_numel).cut


def mark(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]], cut: Cut, chunk_numel: int) -> list[torch.Tensor]:
    """Flat bool masks of the entries ``cut`` selects (the ``ties`` budget spent over ``flats`` in
    order, as the global scope does). Nothing is modified."""
    return dispatch.mark(source, flats, cut, chunk_numel)


def groups(n: int, scope: str) -> list[list[int]]:
    """Entry indices ranked together: all of them for the global scope, one by one otherwise."""
    return [list(range(n))] if scope == "global" else [[i] for i in range(n)]


def lowest_fraction(scores: Sequence[torch.Tensor], ratio: float, scope: str, chunk_numel: int) -> list[torch.Tensor]:
    """Flat bool masks of the ``floor(ratio * n)`` lowest ``scores`` (per tensor or over all of them)."""
    source = ScoreKeys.from_tensors(scores)
    out: list[torch.Tensor] = [torch.empty(0)] * len(scores)
    for group in groups(len(scores), scope):
        # The scores themselves stand in for the gradient chunks: every finite score is ranked.
        flats = [(i, scores[i]) for i in group]
        cut = dispatch.rank(source, flats, ratio, chunk_numel=chunk_numel).cut
        for i, m in zip(group, mark(source, flats, cut, chunk_numel)):
            out[i] = m
    return out


def load_bool_masks(state: Any, key: str) -> dict[str, torch.Tensor]:
    """Validate a ``{name: bool tensor}`` dict from a loaded state."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in state.values()):
        raise ValueError(f"state {key!r} must map parameter names to bool tensors")
    return dict(state)


# --- gradient sums (SIFT, SPT, SpIEL) ---------------------------------------------------------

def accumulate_finite(acc: torch.Tensor | None, grad: torch.Tensor, *, square: bool = False) -> torch.Tensor:
    """``acc`` plus the finite entries of the flat ``grad`` (squared with ``square``) as float32, NaN/inf
    counting as 0; a new sum when ``acc`` is ``None``, else ``acc`` updated in place."""
    return dispatch.accumulate_finite([acc], [grad], square=square)[0]


def accumulate_finite_each(
    sums: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor], *, square: bool = False
) -> list[torch.Tensor]:
    """:func:`accumulate_finite` of each sum with its gradient."""
    return dispatch.accumulate_finite(sums, grads, square=square)


# --- a mask fixed after warm-up (SIFT, SPT) ---------------------------------------------------


class WarmupMaskStrategy(MaskStrategy):
    """Accumulate a score over ``options.warmup_steps`` steps, then fix the mask for good.

    During warm-up nothing is updated (every finite gradient entry is masked): those steps only
    measure, so that every parameter outside the chosen set ends training exactly where it started
    (the sparse-increment property of SIFT and SPT). At the last warm-up step the
    ``floor(mask_ratio * n)`` lowest-scoring entries (per tensor, or over all tensors for a global
    ranking) are masked from that step on, that step included. Tensors that had no gradient at
    that step are not in the chosen set and stay frozen.

    State: ``seen`` (warm-up steps accumulated), ``scores`` (float32 per parameter name, only
    during warm-up) and ``updatable`` (bool per parameter name, shaped like it; ``None`` before).
    """

    global_only: ClassVar[bool] = False

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.seen = 0
        self.scores: dict[str, torch.Tensor] = {}
        self.updatable: dict[str, torch.Tensor] | None = None

    @abstractmethod
    def accumulate(self, score: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        """The score after one more step with the flat gradient ``grad`` (read only: learn from its finite
        entries, see :func:`accumulate_finite`); ``score`` is ``None`` at first."""

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        chunk = self.config.chunk_numel
        if self.updatable is None:
            for e in entries:
                self.scores[e.name] = self.accumulate(self.scores.get(e.name), e.flat)
            self.seen += 1
            if self.seen < self.options.warmup_steps:
                return mask_plan(entries, [True] * len(entries), chunk)
            scope = "global" if self.global_only else self.config.scope
            scores = [self.scores[e.name] for e in entries]
            masked = lowest_fraction(scores, self.config.mask_ratio, scope, chunk)
            self.updatable = {e.name: (~m).view(e.param.shape) for e, m in zip(entries, masked)}
            self.scores = {}
        masks: list[StoredMask | bool] = []
        for e in entries:
            kept = self.updatable.get(e.name)
            if kept is not None and kept.device != e.flat.device:
                kept = self.updatable[e.name] = kept.to(e.flat.device)
            masks.append(True if kept is None else stored_mask(kept))
        return mask_plan(entries, masks, chunk)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "scores": dict(self.scores), "updatable": None if self.updatable is None else dict(self.updatable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"seen", "scores", "updatable"}
        if unknown:
            raise ValueError(f"unknown {self.name} state keys {sorted(unknown)}")
        self.seen = int(state.get("seen", 0))
        scores = state.get("scores", {})
        if not isinstance(scores, dict) or not all(isinstance(v, torch.Tensor) for v in scores.values()):
            raise ValueError(f"{self.name} state 'scores' must map parameter names to tensors")
        self.scores = {k: v.float() for k, v in scores.items()}
        updatable = state.get("updatable")
        self.updatable = None if updatable is None else load_bool_masks(updatable, "updatable")


@dataclass
class WarmupOptions:
    warmup_steps: int = 1
    """Optimizer steps whose gradients choose the mask; nothing is updated before the last one."""

    def __post_init__(self) -> None:
        check_int("warmup_steps", self.warmup_steps, 1)
