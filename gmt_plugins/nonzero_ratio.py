"""``ratio_of="nonzero"``: how many entries to mask when ``mask_ratio`` counts only nonzero gradients.

With ``ratio_of="all"`` (the default) a group of ``n`` entries, ``f`` of them finite, masks the
``floor(r * f)`` smallest keys. With ``"nonzero"`` it masks the ``floor(r * (f - z))`` smallest
*nonzero* entries, ``z`` being the group's zero entries (+0 and -0), and the zeros in addition: for
magnitude keys every zero has key 0 and ranks first, so that is the ``z + floor(r * (f - z))``
smallest keys, which is what :func:`masked_count` returns for :func:`gmt_plugins.engine.dispatch.rank`'s
``k``. Zeros are masked either way (zeroing them changes nothing); only the count of the nonzero
ones differs. One extra read of the gradients per step; under FSDP2/DeepSpeed the counts of the
shards are summed over the ranks (one all-reduce), so ``k`` is that of the full tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gmt_plugins.distributed import active_reducer
from gmt_plugins.engine import dispatch

if TYPE_CHECKING:
    from gmt_plugins.strategies.base import GradEntry


def zeros_and_nonfinite(flat: torch.Tensor, chunk_numel: int) -> tuple[int, int]:
    """Entries of ``flat`` that are ±0, and that are NaN or inf."""
    return dispatch.count_zeros(flat, chunk_numel), dispatch.count_nonfinite(flat, chunk_numel)


def masked_count(entries: Sequence[GradEntry], ratio: float, chunk_numel: int) -> int:
    """``k`` for one group (one tensor, or all of them in the global scope): its zeros plus
    ``floor(ratio * finite nonzero entries)``, over the full tensors (the shards' counts are summed over
    the ranks when the entries are shards)."""
    flats = [e.flat for e in entries]
    full_numels = [e.flat.numel() if e.shard is None else e.shard.full_numel for e in entries]
    zeros = nonfinite = 0
    for flat in flats:
        z, f = zeros_and_nonfinite(flat, chunk_numel)
        zeros, nonfinite = zeros + z, nonfinite + f
    reducer = active_reducer()
    if reducer is not None:
        device = flats[0].device if flats else torch.device("cpu")
        zeros, nonfinite = reducer.sum_counts([zeros, nonfinite], device)
    nonzero_finite = sum(full_numels) - nonfinite - zeros
    return zeros + int(ratio * nonzero_finite)
