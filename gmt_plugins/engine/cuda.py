"""The CUDA backend: the ``gmt`` mask without host synchronisation, one readback per step.

The reference ranking and apply (:mod:`gmt_plugins.engine.reference`) decide on the host: every tensor's non-finite count, every located bin and every tie count is read back with
``.item()``, and on CUDA ``torch.bincount`` and ``nonzero`` synchronise too, so a step costs hundreds
of host synchronisations. Here the same radix selection runs with operations whose output shapes
never depend on data, and every decision stays on the device:

* histograms of 16-bit key digits are ``index_add_`` into preallocated bins (one row of 65,536 bins
  per tensor in the tensor scope, in groups of :data:`GROUP_ROWS` tensors of one key space ranked
  together; one row for all tensors in the global scope);
* ``k = floor(ratio * rankable)`` is computed on the device in float64, which is what Python's
  ``int(ratio * rankable)`` computes (one IEEE double product, truncated; ``rankable < 2**53``);
* the bin holding the k-th key is found by ``cumsum`` + ``searchsorted``, batched over the rows of a
  group, and the next digit's pass counts only the keys whose upper digits are the prefix found so
  far; the keys outside that bucket go to bins that are sliced off: on CUDA 65,536 of them, spread
  by position, so that the GPU's atomics are not serialised on one counter; on CPU two spill bins,
  whose counters stay in cache (:data:`SPREAD_SPILLS`);
* ties at the threshold are taken in flat order (tensors in selection order in the global scope) by a
  running ``cumsum`` of ``keys == T`` against a tie budget kept on the device from chunk to chunk;
* the counts (``masked`` and the nonzero keys of each chunk, ``nonfinite`` of each tensor) stay in
  device tensors, and :func:`apply_on_device` reads them back, with the thresholds, in one
  ``tolist()``; ``masked_nonzero`` follows on the host (a cut above key 0 masks every ±0).

On the 135M tensor set (272 tensors, bf16) an apply dispatches about 17 torch operations per tensor
(``track_energy`` adds 5 per chunk: the float64 values, NaN/inf zeroed, the kept ones, two dot products), none of them synchronising; small tensors are not yet packed together, so the launches still grow
with the number of tensors (``benchmarks/device_path.py`` compares both paths).

The masks, statistics and thresholds are exactly those of the host path (the tests compare both, and
both against :mod:`tests.reference`). :mod:`gmt_plugins.engine.dispatch` decides when this path
serves a step (see its ``DEVICE_MODE``): whole gradients that all sit on one CUDA device, ranked by
exact magnitude keys with a ratio (``gmt``); the rankings it returns are :class:`DeviceRanking`, and
their apply masks the whole step here.

Scratch memory: each pass reads chunks of ``max(config.chunk_numel, CHUNK_NUMEL)`` entries on a GPU
(``config.chunk_numel`` on CPU), with about 12 bytes of temporaries per entry at the apply pass; a
group of the tensor scope holds a ``GROUP_ROWS x 131,072`` int64 table (64 MiB) and its cumulative
sums on CUDA, half that on CPU.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gmt_plugins.engine.keys import MagnitudeKeys
from gmt_plugins.engine.types import CUDA, DIGIT_BITS, NUM_BINS, Cut, Energy, Ranking, iter_chunks

CHUNK_NUMEL = 1 << 24
"""Entries per launch on a GPU (at least ``config.chunk_numel``): large, since every chunk costs launches.
CPU tensors (``MODE="always"``) take ``config.chunk_numel``, whose chunks stay in cache from pass to pass."""

GROUP_ROWS = 64
"""Tensors of the tensor scope ranked together (one 65,536-bin row each)."""

SPREAD_SPILLS: bool | None = None
"""How a later digit's pass counts the keys outside its bucket. ``True``: in 65,536 bins spread by
position (GPU atomics on one counter would serialise); ``False``: in two spill bins, below and above
(on a CPU the same counters stay in cache); ``None``: ``True`` on CUDA. Both give the same histogram."""

_LOW = NUM_BINS - 1
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}



def exact_magnitude_keys(source: object) -> bool:
    """Only the exact magnitude keys are what this module ranks (it reads ``key_bits`` and ``cap`` and
    converts thresholds to values itself)."""
    return type(source) is MagnitudeKeys


@dataclass
class PendingCuts:
    """The cuts of one step, still on the device.

    Row ``row_of[i]`` of ``threshold``/``ties``/``has_cut`` is tensor ``i``'s cut, in the keys of
    ``sources[i]`` (one row per tensor in the tensor scope, one shared row and source in the global
    scope). A row without a cut (``k == 0``) masks nothing. The cut is that of
    :class:`~gmt_plugins.engine.types.Cut`: every key below ``threshold``, then the first ``ties`` keys
    equal to it.
    """

    sources: list[MagnitudeKeys]
    flats: list[torch.Tensor]
    shared: bool
    row_of: list[int]
    threshold: torch.Tensor
    ties: torch.Tensor
    has_cut: torch.Tensor
    nonfinite: torch.Tensor
    """Per tensor (global scope) or per row (tensor scope): :meth:`nonfinite_at` says where."""
    chunk_numel: int

    _host: tuple[list[Cut], list[int]] | None = None

    def nonfinite_at(self, index: int) -> int:
        return index if self.shared else self.row_of[index]

    def host(self) -> tuple[list[Cut], list[int]]:
        """Every tensor's cut and non-finite count, read back once (one synchronisation) and kept."""
        if self._host is None:
            values = torch.cat([self.threshold, self.ties, self.has_cut.to(torch.int64), self.nonfinite]).tolist()
            rows = self.threshold.numel()
            threshold, ties, has_cut = values[:rows], values[rows : 2 * rows], values[2 * rows : 3 * rows]
            nonfinite = values[3 * rows :]
            cuts = [Cut(threshold[r], ties[r]) if has_cut[r] else Cut(None) for r in self.row_of]
            self._host = (cuts, [nonfinite[self.nonfinite_at(i)] for i in range(len(self.flats))])
        return self._host


class DeviceRanking(Ranking):
    """The ranking of tensor ``position`` of a step ranked on the device: its cut and counts stay there
    until read (one readback for the whole step), and the apply masks every tensor of the step at once
    (:func:`apply_on_device`)."""

    def __init__(self, pending: PendingCuts, position: int) -> None:  # not Ranking's fields: they are read back
        self.pending, self.position = pending, position
        self.backend, self.state, self.boundary = CUDA, pending, None

    @property  # type: ignore[override]
    def cut(self) -> Cut:
        return self.pending.host()[0][self.position]

    @property  # type: ignore[override]
    def nonfinite(self) -> list[int]:
        counts = self.pending.host()[1]
        return counts if self.pending.shared else [counts[self.position]]

    @property  # type: ignore[override]
    def rankable(self) -> int:
        raise AttributeError("a device ranking does not read back its rankable count")



def rank_on_device(
    sources: Sequence[MagnitudeKeys], flats: Sequence[torch.Tensor], ratio: float, *, shared: bool, chunk_numel: int,
) -> PendingCuts:
    """The cuts masking ``floor(ratio * rankable)`` entries per tensor (``shared=False``, ``sources[i]``
    the keys of ``flats[i]`` alone) or over all ``flats`` (``shared=True``, one source for all),
    without reading anything back."""
    flats, sources = list(flats), list(sources)
    device = flats[0].device
    if device.type != "cpu":  # launches cost on a GPU; on a CPU, chunks that stay in cache do
        chunk_numel = max(chunk_numel, CHUNK_NUMEL)
    if shared:
        if any(s is not sources[0] for s in sources):
            raise ValueError("the global scope ranks every tensor in the keys of one source")
        groups, n_rows = [list(range(len(flats)))], 1
    else:
        # tensors with the same key space are ranked together, one row each, rows contiguous per group
        kinds: dict[tuple[int, int, object], list[int]] = {}
        for i, source in enumerate(sources):
            space = (source.key_bits, source.cap, source._dtype16)  # noqa: SLF001 - the 16-bit dtype, if any
            kinds.setdefault(space, []).append(i)
        groups = [kind[s : s + GROUP_ROWS] for kind in kinds.values() for s in range(0, len(kind), GROUP_ROWS)]
        n_rows = len(flats)
    row_of = [0] * len(flats)
    if not shared:
        for row, i in enumerate(i for group in groups for i in group):
            row_of[i] = row
    cuts = PendingCuts(
        sources, flats, shared, row_of,
        threshold=torch.zeros(n_rows, dtype=torch.int64, device=device),
        ties=torch.zeros(n_rows, dtype=torch.int64, device=device),
        has_cut=torch.zeros(n_rows, dtype=torch.bool, device=device),
        nonfinite=torch.zeros(len(flats), dtype=torch.int64, device=device),
        chunk_numel=chunk_numel,
    )
    for members in groups:
        _rank_group(cuts, members, ratio)
    return cuts


class _Scratch:
    """Per-call buffers reused by every chunk: ones (the histogram weights, one entry expanded) and,
    for the keys outside the bucket of a later digit when spreading, ``65,536 + position % 65,536``:
    bins past the digits' that are sliced off, spread by position so that no counter takes them all
    (a weight of 0 instead would cost a conversion of the bucket test per entry)."""

    def __init__(self, flats: Sequence[torch.Tensor], chunk_numel: int, key_dtype: torch.dtype, spread: bool) -> None:
        size = min(chunk_numel, max((f.numel() for f in flats), default=0))
        device = flats[0].device
        self.ones = torch.ones(1, dtype=torch.int64, device=device).expand(size)
        # in the keys' dtype, so that torch.where does not promote (one conversion pass less)
        self.spread = None
        if spread:
            self.spread = torch.arange(size, dtype=key_dtype, device=device).bitwise_and_(_LOW).add_(NUM_BINS)


def _rank_group(cuts: PendingCuts, members: list[int], ratio: float) -> None:
    source, flats = cuts.sources[members[0]], cuts.flats
    top = source.key_bits - DIGIT_BITS
    first_row = cuts.row_of[members[0]]
    n_rows = 1 if cuts.shared else len(members)
    device = flats[0].device
    spread = SPREAD_SPILLS if SPREAD_SPILLS is not None else device.type == "cuda"
    key_dtype = torch.int64 if source.key_bits == 64 else torch.int32
    scratch = _Scratch([flats[i] for i in members], cuts.chunk_numel, key_dtype, spread and top > 0)
    # one row per tensor: the digits' bins, and for later digits the outside keys' bins (spread: 65,536
    # after the digits; spilled: one before, one after)
    width, offset = (NUM_BINS, 0) if not top else (2 * NUM_BINS, 0) if spread else (NUM_BINS + 2, 1)
    table = torch.zeros(n_rows, width, dtype=torch.int64, device=device)
    hist = table[:, offset : offset + NUM_BINS]
    cap_digit = source.cap >> top  # cap is a multiple of 2**top
    for i in members:
        row = hist[cuts.row_of[i] - first_row]
        for start, chunk in iter_chunks(flats[i], cuts.chunk_numel):
            keys = source.keys(i, chunk, start)
            row.index_add_(0, keys >> top if top else keys, scratch.ones[: chunk.numel()])
        if cuts.shared:  # the excluded keys of every tensor so far; differences below
            torch.sum(row[cap_digit:], dim=0, out=cuts.nonfinite[i])
    if cuts.shared:
        cuts.nonfinite[1:] -= cuts.nonfinite[:-1].clone()
    else:  # one row per tensor: all rows at once
        cuts.nonfinite[first_row : first_row + n_rows] = hist[:, cap_digit:].sum(1)
    cumulative = hist.cumsum(1)
    rankable = cumulative[:, cap_digit - 1]
    # float64 product truncated: Python's int(ratio * rankable), bit for bit
    k = torch.minimum(rankable.double().mul_(ratio).floor_().to(torch.int64), rankable)
    digit, below, count = _locate(hist, cumulative, k)
    prefix, remaining = digit, k - below
    for shift in range(top - DIGIT_BITS, -1, -DIGIT_BITS):
        table.zero_()
        for i in members:
            r = cuts.row_of[i] - first_row
            row, wanted = table[r], prefix[r]
            base = wanted << (shift + DIGIT_BITS)
            for start, chunk in iter_chunks(flats[i], cuts.chunk_numel):
                keys = source.keys(i, chunk, start)
                if spread:
                    inside = (keys >> (shift + DIGIT_BITS)) == wanted
                    low = (keys >> shift if shift else keys) & _LOW
                    bins = torch.where(inside, low, scratch.spread[: chunk.numel()])
                else:  # the host path's clamp: below the bucket -> bin 0, above it -> bin 65,537
                    bins = keys - base
                    if shift:
                        bins >>= shift  # arithmetic: keys below the bucket stay negative
                    bins.clamp_(-1, NUM_BINS).add_(1)
                row.index_add_(0, bins, scratch.ones[: chunk.numel()])
        cumulative = hist.cumsum(1)
        digit, below, count = _locate(hist, cumulative, remaining)
        prefix, remaining = (prefix << DIGIT_BITS) | digit, remaining - below
    every_equal = remaining == count  # every entry at the threshold goes: cut just above it, no ties
    rows = slice(first_row, first_row + n_rows)
    cuts.threshold[rows] = torch.where(every_equal, prefix + 1, prefix)
    cuts.ties[rows] = torch.where(every_equal, 0, remaining)
    cuts.has_cut[rows] = k > 0


def _locate(
    hist: torch.Tensor, cumulative: torch.Tensor, wanted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the bin holding the ``wanted``-th smallest key (1-based), the count in lower bins, and
    the bin's count. A row with ``wanted == 0`` gets bin 0 (its cut is dropped by ``has_cut``)."""
    digit = torch.searchsorted(cumulative, wanted.unsqueeze(1)).clamp_(max=NUM_BINS - 1)
    below = torch.where(digit > 0, cumulative.gather(1, (digit - 1).clamp_(min=0)), 0)
    return digit.squeeze(1), below.squeeze(1), hist.gather(1, digit).squeeze(1)


@dataclass(frozen=True)
class DeviceApplied:
    """What :func:`apply_on_device` did to one tensor (the fields of a ``TensorStats``)."""

    masked: int
    masked_nonzero: int
    nonfinite: int
    threshold: float | None


def apply_on_device(
    cuts: PendingCuts, records: Sequence[torch.Tensor | None] | None = None, energies: Sequence[Energy] | None = None
) -> list[DeviceApplied]:
    """Zero, in place, what ``cuts`` selects in every flat; ``records[i]`` (a flat bool tensor, or
    ``None``) receives tensor ``i``'s mask, ``energies[i]`` the sums of ``g ** 2`` over its finite
    entries before and after masking (float64 dots per chunk, their bits read back as int64 with the
    counts, added up per tensor on the host in chunk order). Reads back once, at the end."""
    flats = cuts.flats
    threshold = torch.where(cuts.has_cut, cuts.threshold, 0)  # 0: no key is below it
    ties = torch.where(cuts.has_cut, cuts.ties, 0)
    # per chunk: masked entries and keys other than 0 (±0; NaN/inf included), summed per tensor on the host
    counts: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []  # with energies, per chunk: g ** 2 over the finite entries, before and after
    owners: list[int] = []
    left = ties.clone()  # per row: ties at the threshold still to take, spent in flat order (negative: spent)
    for i, flat in enumerate(flats):
        r, source = cuts.row_of[i], cuts.sources[i]
        at, budget = threshold[r], left[r]
        record = records[i] if records is not None else None
        for start, chunk in iter_chunks(flat, cuts.chunk_numel):
            keys = _apply_keys(source, i, chunk, start)
            equal = keys == at
            # int32 running count (a chunk holds < 2**31 entries) against the budget clamped into int32
            order = equal.cumsum(0, dtype=torch.int32)
            mask = (keys < at).logical_or_(equal.logical_and_(order <= budget.clamp(-1, 2**31 - 1)))
            budget.sub_(order[-1])
            counts += [torch.count_nonzero(mask), torch.count_nonzero(keys)]  # a bool sum would convert first
            owners.append(i)
            if record is not None:
                record[start : start + chunk.numel()].copy_(mask)
            if energies is not None:  # before zeroing: the finite values in float64, NaN and inf as 0
                values = torch.nan_to_num(chunk.to(torch.float64), 0.0, 0.0, 0.0)
            # the bits times 0 or 1: +0.0 where masked (as masked_fill_, which branches per entry on CPU)
            chunk.view(_INT_OF_SIZE[chunk.element_size()]).mul_(mask.logical_not_())
            if energies is not None:  # mask now flags the kept entries
                sums += [torch.dot(values, values), torch.dot(values, values * mask)]

    shown = torch.where(cuts.has_cut, cuts.threshold, -1)
    parts = ([torch.stack(counts)] if counts else []) + ([torch.stack(sums).view(torch.int64)] if sums else [])
    values = torch.cat(parts + [cuts.nonfinite, shown]).tolist()  # the one readback
    n_counts, n_sums, n = len(counts), len(sums), len(flats)
    masked, nonzero = [0] * n, [0] * n
    for owner, m, z in zip(owners, values[0:n_counts:2], values[1:n_counts:2]):
        masked[owner] += m
        nonzero[owner] += z
    if energies is not None and n_sums:
        squares = struct.unpack(f"<{n_sums}d", struct.pack(f"<{n_sums}q", *values[n_counts : n_counts + n_sums]))
        for owner, before, after in zip(owners, squares[0::2], squares[1::2]):
            energies[owner].add(before, after)
    values = values[n_counts + n_sums :]
    nonfinite, rows = values[:n], values[n:]
    done = []
    for i, flat in enumerate(flats):
        t = rows[cuts.row_of[i]]
        done.append(DeviceApplied(
            masked[i], _masked_nonzero(masked[i], flat.numel() - nonzero[i], t), nonfinite[cuts.nonfinite_at(i)],
            None if t < 0 else key_value(cuts.sources[i], t),
        ))
    return done


def _apply_keys(source: MagnitudeKeys, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
    """The keys the apply pass compares: 16-bit keys stay int16 (one launch, half the traffic; no
    histogram indexes them), the others are ``source.keys``."""
    if source.key_bits == 16:
        return chunk.view(torch.int16) & 0x7FFF
    return source.keys(index, chunk, start)


def _masked_nonzero(masked: int, zeros: int, threshold: int) -> int:
    """Masked entries that were not ±0 (key 0), from counts: a cut at a threshold key above 0 masks
    every zero (key 0 is below it); a cut at key 0 (or none) masks zeros only, as ties."""
    return masked - zeros if threshold > 0 else 0


_UNPACK = {16: ("<H", None), 32: ("<I", "<f"), 64: ("<Q", "<d")}


def key_value(source: MagnitudeKeys, key: int) -> float:
    """``source.key_to_value(index, key)`` computed on the host from the bits, without a tensor
    (so that no ``.item()`` is needed): the magnitude whose bit pattern is ``key``."""
    if source.key_bits == 16:
        dtype16 = source._dtype16  # noqa: SLF001 - the one 16-bit dtype of the group, set by MagnitudeKeys
        if dtype16 == torch.bfloat16:
            return struct.unpack("<f", struct.pack("<I", key << 16))[0]
        return struct.unpack("<e", struct.pack("<H", key))[0]
    pack, unpack = _UNPACK[source.key_bits]
    return struct.unpack(unpack, struct.pack(pack, key))[0]
