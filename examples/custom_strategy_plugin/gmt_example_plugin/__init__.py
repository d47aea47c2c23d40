"""An example strategy plugin: mask the gradient entries of *largest* magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmt_plugins.strategy_api import GradEntry, KeyedStrategy, MagnitudeKeys, StrategyRegistry, hookimpl


class LargestKeys(MagnitudeKeys):
    """``|grad|`` keys reversed: the largest finite magnitude gets the smallest key, so the engine,
    which masks the smallest keys, masks the largest gradients. Non-finite entries keep keys
    ``>= cap`` and are never masked."""

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        keys = super().keys(index, chunk, start)
        return torch.where(keys < self.cap, self.cap - 1 - keys, keys)

    def key_to_value(self, index: int, key: int) -> float:
        return super().key_to_value(index, self.cap - 1 - key)


class LargestMagnitudeStrategy(KeyedStrategy):
    """Masks the ``floor(mask_ratio * n)`` largest-magnitude gradient entries (per tensor or global)."""

    name = "example_largest"

    def key_source(self, entries: Sequence[GradEntry], *, step: int) -> LargestKeys:
        return LargestKeys([e.flat.dtype for e in entries])


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(LargestMagnitudeStrategy)
