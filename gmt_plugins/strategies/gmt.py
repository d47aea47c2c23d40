"""GMT: mask the gradient entries of smallest magnitude (Li et al., arXiv 2406.15330)."""

from __future__ import annotations

from collections.abc import Sequence

from gmt_plugins.strategy_api import GradEntry, KeyedStrategy, MagnitudeKeys, StrategyRegistry, hookimpl


class GMTStrategy(KeyedStrategy):
    """Gradient-Mask Tuning (https://arxiv.org/abs/2406.15330).

    With Γ the gradient accumulated over the micro-batches of one optimizer step, the entries with
    ``|Γ|`` below the threshold ``T_k`` are zeroed, where ``T_k`` leaves exactly
    ``floor(mask_ratio * n)`` entries below it (per tensor, or over the model for
    ``scope="global"``). Ties at the threshold go in flat index order.

    The engine picks the backend (:mod:`gmt_plugins.engine.dispatch`): whole gradients on one CUDA
    device are ranked without host synchronisation, CPU gradients by the compiled kernel, anything
    else by the torch reference; all give the same masks.
    """

    name = "gmt"
    supports_sharded_gradients = True
    supported_ratio_of = ("all", "nonzero")

    def key_source(self, entries: Sequence[GradEntry], *, step: int) -> MagnitudeKeys:
        return MagnitudeKeys([e.flat.dtype for e in entries])


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(GMTStrategy)
