"""SaRA: train only the smallest-magnitude ("ineffective") weights, re-chosen progressively."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.strategies._masks import lowest_fraction
from gmt_plugins.strategies._sparse import check_state_keys, trainable_plan
from gmt_plugins.strategy_api import (
    GMTConfig,
    GradEntry,
    MaskPlan,
    MaskStrategy,
    StrategyRegistry,
    check_float,
    check_int,
    hookimpl,
    load_bool_masks,
)


@dataclass
class SaRAOptions:
    fraction: float = 0.1
    """Fraction of each tensor (or of all tensors with ``scope="global"``) that is trained, in (0, 1]."""
    interval: int | None = None
    """Steps between re-selections from the current weights; ``None`` chooses once, at the first step."""

    def __post_init__(self) -> None:
        self.fraction = check_float("fraction", self.fraction, 0.0, 1.0, low_open=True)
        if self.interval is not None:
            check_int("interval", self.interval, 1)


class SaRAStrategy(MaskStrategy):
    """SaRA, "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank
    Adaptation" (Hu et al., https://arxiv.org/abs/2409.06633), its sparse selection.

    The weights of smallest magnitude are the "ineffective" ones of the pretrained model; only they
    are trained. At the first step (from the pretrained weights) and then every ``interval`` steps
    (from the current weights: the paper's progressive re-selection), the ``floor(fraction * n)``
    entries of smallest ``|theta|`` of each tensor (or over all tensors with ``scope="global"``) are
    chosen; every other entry is masked. The gradient plays no part; ``mask_ratio`` is unused.

    The paper's nuclear-norm low-rank constraint on the update is a loss term: it cannot be
    expressed as a gradient mask and is left out.

    State: ``trainable`` (bool tensor per parameter name) and ``selected_at`` (the step of the last
    selection).
    """

    name = "sara"
    options_class = SaRAOptions

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.trainable: dict[str, torch.Tensor] = {}
        self.selected_at: int | None = None

    def due(self, entries: Sequence[GradEntry], step: int) -> bool:
        if self.selected_at is None or any(e.name not in self.trainable for e in entries):
            return True
        interval = self.options.interval
        return interval is not None and not self.selected_at <= step < self.selected_at + interval

    def select(self, entries: Sequence[GradEntry], step: int) -> None:
        magnitudes = [e.param_flat().float().abs() for e in entries]
        chosen = lowest_fraction(magnitudes, self.options.fraction, self.config.scope, self.config.chunk_numel)
        self.trainable = {e.name: m.view(e.param.shape) for e, m in zip(entries, chosen)}
        self.selected_at = step

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        if self.due(entries, step):
            self.select(entries, step)
        return trainable_plan(entries, self.trainable, self.config.chunk_numel)

    def state_dict(self) -> dict[str, Any]:
        return {"trainable": dict(self.trainable), "selected_at": self.selected_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"trainable", "selected_at"})
        self.trainable = load_bool_masks(state.get("trainable", {}), "trainable")
        at = state.get("selected_at")
        self.selected_at = None if at is None else int(at)


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(SaRAStrategy)
