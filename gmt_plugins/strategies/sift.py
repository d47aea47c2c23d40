"""SIFT: a fixed sparse set of entries, chosen by the largest gradients of the first step(s)."""

from __future__ import annotations

import torch

from gmt_plugins.strategies._masks import WarmupMaskStrategy, WarmupOptions, accumulate_finite
from gmt_plugins.strategy_api import StrategyRegistry, hookimpl


class SIFTStrategy(WarmupMaskStrategy):
    """Sparse Increment Fine-Tuning ("Sparse is Enough in Fine-tuning Pre-trained Large Language
    Models", Song et al., https://arxiv.org/abs/2312.11875).

    The gradients of the first ``warmup_steps`` optimizer steps are summed (as if they were one
    large batch); the entries with the largest ``|sum|`` are the only ones ever updated. The
    ``floor(mask_ratio * n)`` entries of smallest ``|sum|`` are masked at every step from the last
    warm-up step on, per tensor (as the authors' code does) or over all tensors with
    ``scope="global"``; SIFT's usual sparsity (about 1% updated) is ``mask_ratio=0.99``. Warm-up
    steps before the last update nothing, so the final weight increment is exactly sparse.

    Options: ``warmup_steps`` (default 1). State: the chosen mask, bool tensors keyed by parameter
    name (see :class:`~gmt_plugins.strategies._masks.WarmupMaskStrategy`).
    """

    name = "sift"
    options_class = WarmupOptions

    def accumulate(self, score: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        # A signed sum of the finite entries: the key is its magnitude, |g_1 + ... + g_w|.
        return accumulate_finite(score, grad)


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(SIFTStrategy)
