"""LIFT: update only the principal weights, the largest entries of a low-rank approximation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.strategies._masks import lowest_fraction, stored_mask
from gmt_plugins.strategy_api import (
    GMTConfig,
    GradEntry,
    MaskPlan,
    MaskStrategy,
    StrategyRegistry,
    check_choice,
    check_int,
    hookimpl,
    load_bool_masks,
    mask_plan,
    stable_salt,
)

VECTOR_CHOICES = ("update", "freeze", "magnitude")
OVERSAMPLE = 10  # extra columns of the randomized range finder, as in Halko et al.
POWER_ITERATIONS = 2  # sharpens the subspace when the spectrum decays slowly


@dataclass
class LIFTOptions:
    rank: int = 8
    """Rank ``r`` of the approximation whose largest entries are updated."""
    interval: int = 100
    """Steps between refreshes of the principal weights (from the current weights)."""
    vectors: str = "update"
    """1-D parameters (biases, norms): ``update`` fully, ``freeze``, or ``magnitude`` (rank by |theta|)."""

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_int("interval", self.interval, 1)
        check_choice("vectors", self.vectors, VECTOR_CHOICES)


def low_rank(weight: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A rank-``rank`` approximation of the matrix ``weight`` (float32), by randomized SVD.

    The random test matrix comes from ``generator`` on the CPU, so the result does not depend on
    the global RNG; ``torch.svd_lowrank`` would draw from it.
    """
    m, n = weight.shape
    if rank >= min(m, n):
        return weight
    q = min(rank + OVERSAMPLE, m, n)
    omega = torch.randn(n, q, generator=generator).to(weight.device)
    basis = torch.linalg.qr(weight @ omega).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(weight @ torch.linalg.qr(weight.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ weight, full_matrices=False)
    return (basis @ u[:, :rank]) * s[:rank] @ vh[:rank]


class LIFTStrategy(MaskStrategy):
    """Low-rank Informed Sparse Fine-Tuning ("LIFT the Veil for the Truth: Principal Weights Emerge
    after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning", Liu et al.,
    https://arxiv.org/abs/2506.00772).

    For every weight matrix ``W`` (parameters with 2 or more dimensions, seen as
    ``shape[0] x rest``), the principal weights are the entries of largest magnitude in its
    rank-``rank`` approximation ``W_r``. Only those are updated: the ``floor(mask_ratio * n)``
    entries with smallest ``|W_r|`` are masked (per matrix, or over all matrices with
    ``scope="global"``). The choice is refreshed from the current weights every ``interval`` steps
    (and whenever a parameter without a stored choice shows up). ``W_r`` comes from a randomized SVD
    seeded from ``mask_seed``, the step and the name.

    1-D parameters have no low-rank structure: by default (``vectors="update"``) they are updated
    fully, as with a LoRA-style method; ``"freeze"`` never updates them; ``"magnitude"`` ranks them
    by ``|theta|`` (their own best rank-1 "approximation") with the matrices.

    State: ``updatable`` (bool tensors keyed by parameter name) and ``refreshed_at`` (the step).
    """

    name = "lift"
    options_class = LIFTOptions

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.updatable: dict[str, torch.Tensor] = {}
        self.refreshed_at: int | None = None

    def principal_scores(self, entry: GradEntry, step: int) -> torch.Tensor:
        """``|W_r|`` (flat float32) of a weight matrix, or ``|theta|`` of a vector."""
        weight = entry.param.detach().to(torch.float32)
        if weight.dim() < 2:
            return weight.reshape(-1).abs()
        generator = torch.Generator().manual_seed(stable_salt(self.config.mask_seed, "lift", step, entry.name))
        return low_rank(weight.reshape(weight.shape[0], -1), self.options.rank, generator).reshape(-1).abs()

    def refresh(self, entries: Sequence[GradEntry], step: int) -> None:
        vectors = self.options.vectors
        ranked = [i for i, e in enumerate(entries) if e.param.dim() >= 2 or vectors == "magnitude"]
        scores = [self.principal_scores(entries[i], step) for i in ranked]
        masked = lowest_fraction(scores, self.config.mask_ratio, self.config.scope, self.config.chunk_numel)
        self.updatable = {}
        for e in entries:
            self.updatable[e.name] = torch.full(e.param.shape, vectors == "update", dtype=torch.bool, device=e.flat.device)
        for i, m in zip(ranked, masked):
            self.updatable[entries[i].name] = (~m).view(entries[i].param.shape)
        self.refreshed_at = step

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        due = self.refreshed_at is None or not self.refreshed_at <= step < self.refreshed_at + self.options.interval
        if due or any(e.name not in self.updatable for e in entries):
            self.refresh(entries, step)
        masks = []
        for e in entries:
            kept = self.updatable[e.name]
            if kept.device != e.flat.device:
                kept = self.updatable[e.name] = kept.to(e.flat.device)
            masks.append(stored_mask(kept))
        return mask_plan(entries, masks, self.config.chunk_numel)

    def state_dict(self) -> dict[str, Any]:
        return {"updatable": dict(self.updatable), "refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"updatable", "refreshed_at"}
        if unknown:
            raise ValueError(f"unknown lift state keys {sorted(unknown)}")
        self.updatable = load_bool_masks(state.get("updatable", {}), "updatable")
        at = state.get("refreshed_at")
        self.refreshed_at = None if at is None else int(at)


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(LIFTStrategy)
