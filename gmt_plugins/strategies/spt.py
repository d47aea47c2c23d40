"""SPT: update the globally most sensitive entries, sensitivity = accumulated squared gradient."""

from __future__ import annotations

import torch

from gmt_plugins.strategies._masks import WarmupMaskStrategy, WarmupOptions, accumulate_finite
from gmt_plugins.strategy_api import StrategyRegistry, hookimpl


class SPTStrategy(WarmupMaskStrategy):
    """Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al.,
    https://arxiv.org/abs/2303.08566), its unstructured tuning part.

    The sensitivity of an entry is its first-order Taylor estimate of the loss change,
    ``sum over warm-up steps of g**2``, accumulated over ``warmup_steps`` optimizer steps (the
    paper's sensitivity batches). At the last warm-up step the top ``1 - mask_ratio`` fraction of
    entries over the whole model is chosen and kept fixed: the ``floor(mask_ratio * n)`` least
    sensitive entries are masked at every step. The ranking is always global, as in the paper, so
    ``scope`` plays no part. Warm-up steps before the last update nothing.

    Options: ``warmup_steps`` (default 1). State: the chosen mask, bool tensors keyed by parameter
    name (see :class:`~gmt_plugins.strategies._masks.WarmupMaskStrategy`).
    """

    name = "spt"
    ignored_settings = ("scope",)
    options_class = WarmupOptions
    global_only = True

    def accumulate(self, score: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        return accumulate_finite(score, grad, square=True)  # sum of g**2 over the finite entries


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(SPTStrategy)
