"""GMT: mask the gradient entries of smallest magnitude (Li et al., arXiv 2406.15330)."""

from __future__ import annotations

from collections.abc import Sequence

from gmt_plugins import device_rank
from gmt_plugins.strategy_api import GradEntry, KeyedStrategy, MagnitudeKeys, MaskPlan, StrategyRegistry, hookimpl


class GMTStrategy(KeyedStrategy):
    """Gradient-Mask Tuning (https://arxiv.org/abs/2406.15330).

    With Γ the gradient accumulated over the micro-batches of one optimizer step, the entries with
    ``|Γ|`` below the threshold ``T_k`` are zeroed, where ``T_k`` leaves exactly
    ``floor(mask_ratio * n)`` entries below it (per tensor, or over the model for
    ``scope="global"``). Ties at the threshold go in flat index order.

    Whole gradients on one CUDA device are ranked without host synchronisation
    (:mod:`gmt_plugins.device_rank`: the plan stays on the device and the masker reads the step's
    counts back once); other gradients, and ``ratio_of="nonzero"``, take the engine of
    :mod:`gmt_plugins.selection`. Both give the same masks.
    """

    name = "gmt"
    supports_sharded_gradients = True
    supported_ratio_of = ("all", "nonzero")

    def key_source(self, entries: Sequence[GradEntry], *, step: int) -> MagnitudeKeys:
        return MagnitudeKeys([e.flat.dtype for e in entries])

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        if device_rank.takes(entries, ratio_of=self.config.ratio_of):
            shared = self.config.scope == "global"
            if shared:
                sources = [self._key_source(entries, step)] * len(entries)
            else:
                sources = [self._key_source([e], step) for e in entries]
            if all(map(device_rank.exact_magnitude_keys, sources)):
                cuts = device_rank.rank_on_device(
                    sources, [e.flat for e in entries], self.config.mask_ratio,
                    shared=shared, chunk_numel=self.config.chunk_numel,
                )
                return device_rank.DevicePlan(cuts)
        return super().plan(entries, step=step)


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(GMTStrategy)
