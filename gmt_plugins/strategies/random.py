"""The random-mask baseline of the GMT paper."""

from __future__ import annotations

from collections.abc import Sequence

from gmt_plugins.strategy_api import GradEntry, KeyedStrategy, RandomKeys, StrategyRegistry, hookimpl, stable_salt


class RandomMaskStrategy(KeyedStrategy):
    """Random mask: the random-mask baseline of GMT (https://arxiv.org/abs/2406.15330).

    Zeroes a uniformly random ``floor(mask_ratio * n)`` entries per tensor (or over all tensors for
    ``scope="global"``). The draw depends only on ``mask_seed``, the step and the parameter name,
    through a counter-based hash: it is reproducible, independent of chunking and device, and
    identical on every process.
    """

    name = "random"
    supports_sharded_gradients = True
    positional_keys = True

    def key_source(self, entries: Sequence[GradEntry], *, step: int) -> RandomKeys:
        return RandomKeys([stable_salt(self.config.mask_seed, step, e.name) for e in entries])


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(RandomMaskStrategy)
