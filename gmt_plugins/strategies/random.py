"""The random-mask baseline of the GMT paper."""

from __future__ import annotations

from collections.abc import Sequence

from gmt_plugins import native_rank
from gmt_plugins.distributed import active_reducer
from gmt_plugins.keys import HashedRandomKeys
from gmt_plugins.selection import rank
from gmt_plugins.strategy_api import (
    Cut,
    DeferredTensorPlan,
    GradEntry,
    KeyedStrategy,
    MaskPlan,
    RandomKeys,
    StrategyRegistry,
    TensorPlan,
    hookimpl,
    stable_salt,
)


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

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        """:meth:`KeyedStrategy.plan`, with every key hashed once where the compiled kernel serves the
        whole step (:func:`gmt_plugins.native_rank.random_rank_group`); the inherited plan is its twin."""
        hashed = self._plan_hashed_once(entries, step)
        return hashed if hashed is not None else super().plan(entries, step=step)

    def _plan_hashed_once(self, entries: Sequence[GradEntry], step: int) -> MaskPlan | None:
        lib = native_rank.library() if entries and active_reducer() is None else None
        if lib is None or type(self).key_source is not RandomMaskStrategy.key_source or any(e.offset for e in entries):
            return None
        flats = [e.flat for e in entries]
        salts = [stable_salt(self.config.mask_seed, step, e.name) for e in entries]
        if not native_rank.usable(flats) or any(RandomKeys([s]).native_source(0, f) is None for s, f in zip(salts, flats)):
            return None
        ratio, chunk = self.config.mask_ratio, self.config.chunk_numel
        scope_global = self.config.scope == "global"
        groups = [list(range(len(entries)))] if scope_global else [[i] for i in range(len(entries))]

        def plans_of(group: list[int]) -> list[TensorPlan]:
            plain = RandomKeys([salts[i] for i in group])
            group_flats = [flats[i] for i in group]
            keys = [plain.native_source(j, f) for j, f in enumerate(group_flats)]
            ranked = native_rank.random_rank_group(lib, group_flats, keys, ratio=ratio, k=None)
            if ranked is None:  # the k-th key fell outside the expected window: the histogram passes rank
                cut, counts = rank(plain, list(enumerate(group_flats)), ratio, chunk_numel=chunk)
                return [TensorPlan(plain, j, cut, n) for j, n in enumerate(counts.nonfinite)]
            result, selection = ranked
            cut = Cut(result.threshold, result.ties if result.threshold is not None else 0)
            source = HashedRandomKeys([salts[i] for i in group], selection)
            return [TensorPlan(source, j, cut, n) for j, n in enumerate(result.nonfinite)]

        if not scope_global and self.deferrable:  # each tensor hashed and ranked when the masker reaches it
            return MaskPlan([DeferredTensorPlan(lambda i=i: plans_of([i])[0]) for i in range(len(entries))])
        return MaskPlan([plan for group in groups for plan in plans_of(group)], shared_ties=scope_global)


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(RandomMaskStrategy)
