"""ID3: unmask entries step by step, by |grad| / (eps + |theta|)^exponent, until a budget is reached."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.engine import dispatch
from gmt_plugins.engine.keys import MaskKeys
from gmt_plugins.strategy_api import (
    Cut,
    GMTConfig,
    GradEntry,
    MaskPlan,
    MaskStrategy,
    StrategyRegistry,
    TensorPlan,
    check_float,
    check_int,
    hookimpl,
    load_bool_masks,
    mask_plan,
)


@dataclass
class ID3Options:
    eps: float = 1e-3
    """Added to ``|theta|`` so that zero weights do not divide by zero (> 0)."""
    exponent: float = 1.0
    """Power of ``eps + |theta|`` in the heuristic (>= 0; 0 ranks by ``|grad|`` alone)."""
    steps_to_budget: int = 100
    """Growth steps until the budget is reached; the budget is spread evenly over them."""

    def __post_init__(self) -> None:
        self.eps = check_float("eps", self.eps, 0.0, math.inf, low_open=True, high_open=True)
        self.exponent = check_float("exponent", self.exponent, 0.0, math.inf, high_open=True)
        check_int("steps_to_budget", self.steps_to_budget, 1)


class ID3Strategy(MaskStrategy):
    """Incremental Dynamic unmasking ("Step-by-Step Unmasking for Parameter-Efficient
    Fine-tuning of Large Language Models", Agarwal et al., https://arxiv.org/abs/2408.14470).

    One global mask over all selected tensors, initially masking everything. The budget is
    ``B = n - floor(mask_ratio * n)`` updatable entries (``n`` = all entries); at growth step ``t``
    (0-based) the updatable set grows to ``ceil(B * (t + 1) / steps_to_budget)`` entries by adding
    the not-yet-updatable entries with the largest ``|grad| / (eps + |theta|) ** exponent``. An
    entry once unmasked stays unmasked, so the set grows monotonically and is fixed once it holds
    ``B`` entries (after ``steps_to_budget`` steps). The ranking is always global, as in the paper,
    so ``scope`` plays no part. Entries with a non-finite gradient are never chosen at that step
    (and, like every non-finite gradient entry, never zeroed).

    State: ``updatable`` (bool tensors keyed by parameter name) and ``growth_steps``.

    A growth step is one engine operation (:func:`gmt_plugins.engine.dispatch.id3_grow`: one kernel call
    for contiguous CPU float32 gradients and parameters and ``exponent`` 0, 1, 2 or 3, the torch
    reference otherwise; the same masks). The negation of
    ``updatable``, which the engine's stored-mask apply reads, and the count of updatable entries are
    kept between steps (one extra byte per entry), so a step after growth derives nothing.
    """

    name = "id3"
    ignored_settings = ("scope",)
    options_class = ID3Options

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.updatable: dict[str, torch.Tensor] = {}
        self.growth_steps = 0
        # Derived from ``updatable`` and rebuilt when a tensor there is replaced (a load, a move):
        # its negation, which the engine's stored-mask apply reads, and its count of True entries.
        self._derived: dict[str, _Derived] = {}
        self._boundaries: list[int] = []  # the kernel's last boundary digits: a speed hint only

    def _kept(self, entry: GradEntry) -> torch.Tensor:
        kept = self.updatable.get(entry.name)
        if kept is None:
            kept = torch.zeros(entry.param.shape, dtype=torch.bool, device=entry.flat.device)
        elif kept.numel() != entry.flat.numel():
            raise ValueError(f"id3 state for {entry.name!r} has {kept.numel()} entries, the parameter {entry.flat.numel()}")
        self.updatable[entry.name] = kept = kept.to(entry.flat.device)
        return kept.view(-1)

    def _derived_for(self, name: str) -> _Derived:
        """``updatable[name]``'s negation and count, computed once per tensor object."""
        kept = self.updatable[name]
        derived = self._derived.get(name)
        if derived is None or derived.source is not kept:
            flat = kept.view(-1)
            derived = self._derived[name] = _Derived(kept, ~flat, int(flat.sum().item()))
        return derived

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        chunk = self.config.chunk_numel
        kept = [self._kept(e) for e in entries]
        nonfinite: list[int] | None = None
        if self.growth_steps < self.options.steps_to_budget and entries:
            n = sum(e.flat.numel() for e in entries)
            budget = n - math.floor(self.config.mask_ratio * n)
            target = min(budget, math.ceil(budget * (self.growth_steps + 1) / self.options.steps_to_budget))
            nonfinite = self._grow(entries, kept, target)
            self.growth_steps += 1
        masked = [self._derived_for(e.name).masked for e in entries]
        if nonfinite is None:
            return mask_plan(entries, masked, chunk)
        # the growth read counted the non-finite gradients already: no second read for the plan
        source = MaskKeys(masked)
        return MaskPlan([TensorPlan(source, i, Cut(1), nf) for i, nf in enumerate(nonfinite)])

    def _grow(self, entries: Sequence[GradEntry], kept: Sequence[torch.Tensor], target: int) -> list[int] | None:
        """Grow ``updatable`` (and its negation) to ``target`` entries; returns the non-finite gradient
        counts the growth read, where it counted them (``None`` otherwise, or when nothing was to grow)."""
        derived = [self._derived_for(e.name) for e in entries]
        grow = target - sum(d.count for d in derived)
        if grow <= 0:
            return None
        grown = dispatch.id3_grow(
            [e.flat for e in entries], [e.param_flat() for e in entries], kept, [d.masked for d in derived],
            eps=self.options.eps, exponent=self.options.exponent, k=grow, boundaries=self._boundaries,
            chunk_numel=self.config.chunk_numel,
        )
        for d, added in zip(derived, grown.added):
            d.count += added
        if grown.boundary is not None:
            self._boundaries = [*self._boundaries[-1:], grown.boundary]
        return grown.nonfinite

    def state_dict(self) -> dict[str, Any]:
        return {"updatable": dict(self.updatable), "growth_steps": self.growth_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"updatable", "growth_steps"}
        if unknown:
            raise ValueError(f"unknown id3 state keys {sorted(unknown)}")
        self.updatable = load_bool_masks(state.get("updatable", {}), "updatable")
        self.growth_steps = int(state.get("growth_steps", 0))
        self._derived = {}


@dataclass
class _Derived:
    source: torch.Tensor
    masked: torch.Tensor
    count: int


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(ID3Strategy)
