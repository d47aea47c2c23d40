"""Exact masks when each process holds only a shard of every gradient (FSDP2).

Under DDP every process holds the whole, already all-reduced gradient at
``on_pre_optimizer_step``: the engine runs unchanged and, strategies being deterministic given
(seed, step, gradients), every rank computes the same mask. Nothing here is used then.

Under FSDP2 the gradients are ``DTensor``s sharded on dimension 0 (``Shard(0)``): each process
holds a contiguous block of rows, i.e. a contiguous range ``[offset, offset + local_numel)`` of
the tensor's flat order. The engine's radix histograms are plain sums, so the exact threshold of
the full tensor (or of all tensors, for the global scope) is found by summing each rank's
histogram: a :class:`ShardReducer` is made active (:func:`active_reducer`) while a strategy plans,
and :func:`gmt_plugins.engine.dispatch.rank` all-reduces every 65,536-bin histogram together with the
per-tensor non-finite counts. The gradient itself never travels. The masker then breaks ties in
the full tensors' flat order from an exclusive prefix of the per-shard tie counts
(:meth:`ShardReducer.tie_budgets`, one ``all_gather`` of a few integers per tensor) and
all-reduces the masked counts so the statistics describe the full model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

_ACTIVE: ContextVar[ShardReducer | None] = ContextVar("gmt_shard_reducer", default=None)


@dataclass(frozen=True)
class ShardInfo:
    """Where a local gradient shard sits in its full tensor: flat entries ``[offset, offset + numel)``."""

    offset: int
    full_numel: int


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (cheap: no import when it is not)."""
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


def local_shard(name: str, tensor: Any) -> tuple[torch.Tensor, ShardInfo | None, Any]:
    """The local part of a DTensor, where it sits in the full flat tensor, and the process group
    that holds the other shards (``None`` when the tensor is replicated: no reduction is needed).

    Only placements made of ``Shard(0)`` (once) and ``Replicate`` are supported: they are what
    FSDP2 (``fully_shard``) and HSDP produce. Anything else (tensor parallelism, ``Partial``
    gradients) is a ``ValueError`` naming the parameter.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(tensor.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    others = [p for p in placements if not isinstance(p, (Shard, Replicate))]
    if others or len(shard_dims) > 1 or any(type(placements[i]) is not Shard or placements[i].dim != 0 for i in shard_dims):
        raise ValueError(
            f"gradient of {name!r} is a DTensor with placements {placements}; GMT masks gradients sharded on "
            "dimension 0 by FSDP2 (Shard(0), optionally with Replicate for HSDP) or whole gradients (DDP), not "
            "tensor-parallel or partial (unreduced) gradients"
        )
    local = tensor.to_local()
    if not shard_dims:
        return local, None, None
    mesh = tensor.device_mesh
    _, global_offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    row = 1
    for size in tensor.shape[1:]:
        row *= size
    info = ShardInfo(offset=int(global_offset[0]) * row if tensor.dim() else 0, full_numel=tensor.numel())
    if local.numel() and info.offset + local.numel() > info.full_numel:
        raise RuntimeError(f"shard of {name!r} at flat offset {info.offset} with {local.numel()} entries exceeds its {info.full_numel}")
    return local, info, mesh.get_group(shard_dims[0])


class ShardReducer:
    """Sums and exclusive prefixes over the processes that hold the shards of the gradients."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``tensor`` in place and return it."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def sum_histogram(self, hist: torch.Tensor, nonfinite: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The global histogram and per-tensor non-finite counts, in one all-reduce."""
        packed = torch.cat([hist, torch.tensor(nonfinite, dtype=hist.dtype, device=hist.device)])
        self.sum_(packed)
        n = hist.numel()
        return packed[:n], [int(c) for c in packed[n:].tolist()]

    def sum_counts(self, counts: Sequence[int], device: torch.device) -> list[int]:
        packed = torch.tensor(list(counts), dtype=torch.int64, device=device)
        return [int(c) for c in self.sum_(packed).tolist()] if len(counts) else []

    def tie_budgets(self, ties: Sequence[int], shared: bool, equal: Sequence[int], offsets: Sequence[int], device: torch.device) -> list[int]:
        """How many threshold-equal entries of each local shard must go.

        ``equal[i]`` is the number of entries of local shard ``i`` whose key equals the threshold
        and ``offsets[i]`` the shard's flat offset in its tensor. Ties go in the full tensors' flat
        order: a shard spends what the shards before it (lower offset, same tensor; or, when
        ``shared``, any shard of an earlier tensor) left of the budget ``ties[i]`` (with
        ``shared``, ``ties[0]`` is one budget over all tensors in order). One ``all_gather`` of
        ``2 * len(equal)`` integers.
        """
        import torch.distributed as dist

        mine = torch.tensor([list(equal), list(offsets)], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        stacked = torch.stack(gathered).cpu()  # [world, 2, n]
        counts, starts = stacked[:, 0, :], stacked[:, 1, :]
        me = torch.tensor(list(offsets), dtype=torch.int64)
        # Shards of the same tensor before mine: a lower offset (empty shards count nothing anyway).
        before_in_tensor = (counts * (starts < me.unsqueeze(0))).sum(0)
        if shared:
            totals = counts.sum(0)
            earlier_tensors = totals.cumsum(0) - totals
            before = (earlier_tensors + before_in_tensor).tolist()
            budgets = [ties[0]] * len(equal)
        else:
            before = before_in_tensor.tolist()
            budgets = list(ties)
        return [max(0, min(int(e), int(b) - int(p))) for e, b, p in zip(equal, budgets, before)]


def active_reducer() -> ShardReducer | None:
    """The reducer of the masking step in progress, or ``None`` (not sharded: no collectives)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def reducing(reducer: ShardReducer | None) -> Iterator[None]:
    """Make ``reducer`` the one :func:`gmt_plugins.engine.dispatch.rank` uses while strategies plan."""
    token = _ACTIVE.set(reducer)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
