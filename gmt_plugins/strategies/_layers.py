"""Grouping parameters into layers by the numeric index in their names (``model.layers.3.mlp...``),
and the base of the strategies that freeze whole tensors before the forward pass."""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from gmt_plugins.engine.types import Cut
from gmt_plugins.engine.keys import MaskKeys
from gmt_plugins.strategies.base import count_nonfinite
from gmt_plugins.strategies.base import GradEntry, MaskPlan, MaskStrategy, TensorPlan


def layer_key(name: str) -> str | None:
    """The name up to and including its first all-digit component (``model.layers.3``), or ``None``.

    The prefix is kept, so ``encoder.layers.0`` and ``decoder.layers.0`` are different layers, and
    only the first index counts, so ``layers.3.mlp.experts.7.w1`` belongs to layer 3.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _order(key: str) -> tuple[str, int]:
    prefix, _, index = key.rpartition(".")
    return prefix, int(index)


def name_groups(names: Sequence[str]) -> tuple[list[str], dict[str, list[int]], list[int]]:
    """``(layers, members, others)``: the layer keys in natural order, the indices (into ``names``)
    of each layer's members, and the indices of names with no layer index."""
    members: dict[str, list[int]] = {}
    others: list[int] = []
    for i, name in enumerate(names):
        key = layer_key(name)
        if key is None:
            others.append(i)
        else:
            members.setdefault(key, []).append(i)
    return sorted(members, key=_order), members, others


def layer_groups(entries: Sequence[GradEntry]) -> tuple[list[str], dict[str, list[int]], list[int]]:
    """:func:`name_groups` of the entries' names (indices into ``entries``)."""
    return name_groups([e.name for e in entries])


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def nonfinite(flat: torch.Tensor, chunk_numel: int) -> int:
    """NaN/inf entries of ``flat``: one reduction when there are none (a finite float32 sum means
    every entry is finite), the exact chunked count otherwise (or when the sum overflowed)."""
    if bool(torch.isfinite(flat.sum(dtype=torch.float32))):
        return 0
    return count_nonfinite(flat, chunk_numel)


def _nonfinite_of(entry: GradEntry, chunk_numel: int) -> int:
    known = entry.known_nonfinite()  # counted by the masker's skipped-step check this step
    return nonfinite(entry.flat, chunk_numel) if known is None else known


def whole_tensor_plan(entries: Sequence[GradEntry], frozen: Sequence[bool], chunk_numel: int) -> MaskPlan:
    """A plan zeroing every finite entry of the frozen tensors and nothing of the others; as
    ``mask_plan`` with whole-tensor masks, with a one-pass NaN/inf count for the common all-finite case."""
    source = MaskKeys(list(frozen))
    return MaskPlan([
        TensorPlan(source, i, Cut(1) if f else Cut(None), _nonfinite_of(e, chunk_numel)) for i, (e, f) in enumerate(zip(entries, frozen))
    ])


class FreezingStrategy(MaskStrategy):
    """A strategy whose decision at a step is a set of whole tensors known from the names alone.

    :meth:`frozen_before_forward` (called by :meth:`GradientMasker.begin_step` before the step's
    first forward pass) records the decision, so :meth:`plan` masks by that very set even though
    the frozen tensors then have no gradient. Without ``begin_step`` (the masking-only loop),
    :meth:`plan` decides from the names of the gradients it is given, as before.
    """

    freezes_before_forward: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._decided: tuple[int, frozenset[str]] | None = None

    @abstractmethod
    def frozen_names(self, names: Sequence[str], *, step: int) -> set[str]:
        """The names among ``names`` whose tensors are frozen at ``step``."""

    def frozen_before_forward(self, names: Sequence[str], *, step: int) -> set[str]:
        frozen = self.frozen_names(names, step=step)
        self._decided = (step, frozenset(frozen))
        return frozen

    def decided_at(self, step: int) -> frozenset[str] | None:
        """The set :meth:`frozen_before_forward` chose for ``step``, or ``None`` when it was not asked."""
        return self._decided[1] if self._decided is not None and self._decided[0] == step else None

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        frozen = self.decided_at(step)
        if frozen is None:
            frozen = self.frozen_names([e.name for e in entries], step=step)
        return whole_tensor_plan(entries, [e.name in frozen for e in entries], self.config.chunk_numel)
