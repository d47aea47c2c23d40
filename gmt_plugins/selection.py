"""Exact selection of the k smallest keys, per tensor or over many tensors, without sorting.

A strategy turns every gradient entry into a non-negative integer *key* (for GMT the bit pattern
of ``|grad|``, which orders like the value). The engine finds, for a count ``k``, the threshold key
``T`` and the number of entries equal to ``T`` that must also go, so that exactly ``k`` entries are
masked: every key below ``T`` plus the first ``ties`` entries whose key equals ``T`` (first in flat
index order, tensors taken in selection order for the global scope).

The threshold is found by radix selection on 16-bit digits of the key, most significant first:
one histogram pass per digit (one pass for 16-bit keys, two for 32-bit ones). Each pass reads the
gradient chunk by chunk, so the extra memory is a few chunk-sized buffers and one 65,536-bin
histogram, never a copy of the gradient, never an index buffer over it, and never a concatenation
of tensors. Keys at or above the source's ``cap`` (non-finite gradients) are never ranked and never
masked, so NaN and inf neither move the threshold nor disappear before the optimizer sees them.

Histograms are plain sums, so when the flats are shards of larger tensors held by several
processes (FSDP2), summing every rank's histogram gives the exact threshold of the full tensors:
``rank`` all-reduces them through the active reducer (:mod:`gmt_plugins.distributed`). Without
one (a single process, or DDP's whole gradients) no collective is made.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from gmt_plugins import native, native_rank
from gmt_plugins.distributed import ShardReducer, active_reducer

DIGIT_BITS = 16
NUM_BINS = 1 << DIGIT_BITS
DEFAULT_CHUNK_NUMEL = 1 << 18


class KeySource(Protocol):
    """Maps gradient chunks to integer keys; smaller keys are masked first."""

    key_bits: int
    """Width of the key space: 16, 32 or 64."""

    cap: int
    """Keys ``>= cap`` are excluded (non-finite gradients). A multiple of ``2 ** (key_bits - 16)``."""

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        """Keys (int32 or int64, ``>= 0``) of the flat gradient ``chunk`` of tensor ``index``,
        whose first entry sits at flat offset ``start`` of that tensor."""
        ...

    def key_to_value(self, index: int, key: int) -> float | None:
        """The threshold as a number a person can read (``|grad|`` for GMT), or ``None``."""
        ...


@dataclass(frozen=True)
class Cut:
    """Zero the entries whose key is ``< threshold``, then up to ``ties`` entries whose key equals it.

    ``threshold=None`` means "mask nothing".
    """

    threshold: int | None
    ties: int = 0


@dataclass
class Ranked:
    """What the first histogram pass learned about a group of tensors."""

    rankable: int
    nonfinite: list[int]


def iter_chunks(flat: torch.Tensor, chunk_numel: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, flat.numel(), chunk_numel):
        yield start, flat[start : start + chunk_numel]


def _histogram(
    source: KeySource,
    flats: Sequence[tuple[int, torch.Tensor]],
    *,
    shift: int,
    base: int | None,
    chunk_numel: int,
    nonfinite: list[int] | None = None,
    gather: bool | None = None,
    use_native: bool | None = None,
) -> torch.Tensor:
    """Histogram of the 16-bit digit at ``shift``.

    With ``base=None`` (the top digit) every key counts and, if ``nonfinite`` is given, the number
    of excluded keys (``>= cap``) of each tensor is appended to it. Otherwise only keys in
    ``[base, base + 2**(shift + 16))`` count: an offset and a clamp send the others to two spill
    bins, which on CPU is several times cheaper than gathering the bucket with a boolean mask. On
    CUDA (or with ``gather=True``) the bucket is gathered instead; the two branches are twins.
    The spill bins of the clamp branch are only ever sliced off, so both return the same histogram.

    For magnitude keys of CPU tensors the compiled kernel of :mod:`gmt_plugins.native` computes
    the same histogram in one read (``use_native=None``: when it is available; ``False``: never;
    ``True``: required). The torch chunks below are its reference twin.
    """
    device = flats[0][1].device
    cap_digit = source.cap >> shift
    # resolved only when a flat can use it: CUDA-only groups never build the kernel nor warn about it
    wanted = use_native or any(native.supports(flat, source.key_bits) for _, flat in flats)
    kernel = _native_kernel(source, use_native) if wanted else None
    full = torch.zeros(NUM_BINS + 2, dtype=torch.int64, device=device)  # below, the digits, above
    digits_hist = full[1 : NUM_BINS + 1]
    ones = None
    excluded_before = 0
    for index, flat in flats:
        if kernel is not None and native.supports(flat, source.key_bits):
            native.add_histogram(kernel, flat, source.key_bits, base or 0, shift, full)
        else:
            for start, chunk in iter_chunks(flat, chunk_numel):
                keys = source.keys(index, chunk, start)
                target = full
                if base is None:
                    digits, target = (keys >> shift if shift else keys), digits_hist
                elif gather if gather is not None else keys.is_cuda:
                    # CUDA: compaction is cheap, while ~all keys landing in two spill bins would
                    # serialise bincount's atomics; keep only the bucket, count spills as zero.
                    inside = keys[(keys >= base) & (keys < base + (NUM_BINS << shift))]
                    digits = ((inside - base) >> shift) + 1
                else:
                    digits = keys - base
                    if shift:
                        digits >>= shift  # arithmetic: keys below the bucket stay negative
                    digits = digits.clamp_(-1, NUM_BINS).add_(1)
                if digits.is_cuda:
                    target += torch.bincount(digits, minlength=target.numel())
                else:
                    # index_add_ into one histogram beats bincount, which allocates a histogram per
                    # chunk and makes two extra passes (min and max) over the digits
                    if ones is None or ones.numel() < digits.numel():
                        ones = torch.ones(max(digits.numel(), min(chunk_numel, flat.numel())), dtype=torch.int64)
                    target.index_add_(0, digits, ones[: digits.numel()])
        if base is None and nonfinite is not None:
            # the group's excluded keys so far, minus those before this flat
            excluded = int(digits_hist[cap_digit:].sum().item())
            nonfinite.append(excluded - excluded_before)
            excluded_before = excluded
    return digits_hist


def histogram_across_devices(
    source: KeySource,
    flats: Sequence[tuple[int, torch.Tensor]],
    *,
    nonfinite: list[int] | None = None,
    device_of: Callable[[torch.Tensor], object] = lambda flat: flat.device,
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`_histogram` of flats that may sit on several devices (``device_map="auto"``, CPU
    offload, the global scope): one histogram per device, summed on the first flat's device.

    Histograms are sums, so the result (and ``nonfinite``, in ``flats`` order) is exactly that of
    one device holding every flat. ``device_of`` groups the flats (tests group CPU flats by other
    keys to exercise the sum without a second device).
    """
    groups: dict[object, list[int]] = {}
    for position, (_, flat) in enumerate(flats):
        groups.setdefault(device_of(flat), []).append(position)
    if len(groups) <= 1:
        return _histogram(source, flats, nonfinite=nonfinite, **kwargs)
    target = flats[0][1].device
    total: torch.Tensor | None = None
    counts: dict[int, int] = {}
    for positions in groups.values():
        part: list[int] | None = [] if nonfinite is not None else None
        hist = _histogram(source, [flats[p] for p in positions], nonfinite=part, **kwargs).to(target)
        total = hist if total is None else total + hist
        if part is not None:
            counts.update(zip(positions, part))
    if counts:  # only the top digit (base=None) counts them
        nonfinite.extend(counts[p] for p in range(len(flats)))
    return total


def _native_kernel(source: KeySource, use_native: bool | None) -> ctypes.CDLL | None:
    """The compiled kernel when it may serve ``source`` (exact magnitude keys): ``use_native=None``
    follows ``GMT_PLUGINS_NATIVE``, ``False`` declines it, ``True`` raises when it cannot serve."""
    serves = getattr(source, "native_keys", False)
    if use_native and not serves:
        raise ValueError(f"the compiled histogram only computes magnitude keys, not those of {type(source).__name__}")
    kernel = native.library() if serves and use_native is not False else None
    if use_native and kernel is None:
        raise native.NativeUnavailable(f"the compiled histogram is unavailable ({native.ENV}={native.mode()})")
    return kernel


def _kernel_keys(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]]) -> list[native_rank.NativeKeys] | None:
    """What the many-tensor kernel needs to compute every flat's keys itself, or ``None``."""
    describe = getattr(source, "native_source", None)
    if describe is None or not native_rank.usable([flat for _, flat in flats]):
        return None
    keys = [describe(index, flat) for index, flat in flats]
    return None if any(k is None for k in keys) else keys


def _rank_native(
    source: KeySource,
    flats: Sequence[tuple[int, torch.Tensor]],
    ratio: float | None,
    k: int | None,
    warm: dict[str, int] | None,
    group: str,
) -> tuple[Cut, Ranked] | None:
    keys = _kernel_keys(source, flats)
    lib = native.library() if keys is not None else None
    if lib is None:
        return None
    hint = warm.get(group) if warm is not None and native_rank.hint_helps(keys) else None
    result = native_rank.rank_group(
        lib, [flat for _, flat in flats], keys, key_bits=source.key_bits, cap=source.cap, ratio=ratio, k=k, hint=hint,
    )
    if warm is not None and result.boundary is not None:
        warm[group] = result.boundary
    ranked = Ranked(rankable=result.rankable, nonfinite=result.nonfinite)
    return Cut(result.threshold, result.ties if result.threshold is not None else 0), ranked


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th smallest entry (1-based) and how many entries lie in lower bins."""
    cumulative = hist.cumsum(0)
    digit = int(torch.searchsorted(cumulative, torch.tensor([k], device=hist.device)).item())
    below = int(cumulative[digit - 1].item()) if digit > 0 else 0
    return digit, below


def rank(
    source: KeySource,
    flats: Sequence[tuple[int, torch.Tensor]],
    ratio: float | None = None,
    *,
    k: int | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    reducer: ShardReducer | None = None,
    warm: dict[str, int] | None = None,
    group: str = "",
) -> tuple[Cut, Ranked]:
    """Find the cut that masks ``k`` entries (default ``floor(ratio * rankable)``) over all of ``flats``.

    ``flats`` are ``(index, flat_gradient)`` pairs; call it with one pair for the per-tensor scope
    and with all pairs for the global scope. ``k`` larger than the rankable count is clipped to it.

    ``reducer`` (default: the one :func:`gmt_plugins.distributed.active_reducer` returns, set by
    the masker while gradients are sharded) sums every histogram and the non-finite counts over
    the processes holding the other shards; ``k``, ``rankable``, ``nonfinite`` and the cut are
    then those of the full tensors, identical on every rank (``ties`` still counts over the full
    tensors in flat order: the masker splits it between shards). Every rank must call ``rank``
    for the same groups in the same order.

    Without a reducer, a group the compiled kernel can serve whole (:mod:`gmt_plugins.native_rank`)
    is ranked by one call; the passes below are its twin. ``warm[group]`` then holds the boundary
    bin of this group's previous call, which the kernel takes as a hint for random keys and scores (see
    :mod:`gmt_plugins.native_rank`); it changes nothing but the time.
    """
    if (ratio is None) == (k is None):
        raise TypeError("rank() takes exactly one of ratio and k")
    if reducer is None:
        reducer = active_reducer()
    top_shift = source.key_bits - DIGIT_BITS
    if not flats:
        return Cut(None), Ranked(rankable=0, nonfinite=[])
    if reducer is None:
        ranked_natively = _rank_native(source, flats, ratio, k, warm, group)
        if ranked_natively is not None:
            return ranked_natively
    nonfinite: list[int] = []
    hist = histogram_across_devices(source, flats, shift=top_shift, base=None, chunk_numel=chunk_numel, nonfinite=nonfinite)
    if reducer is not None:
        hist, nonfinite = reducer.sum_histogram(hist, nonfinite)
    rankable = int(hist[: source.cap >> top_shift].sum().item())
    ranked = Ranked(rankable=rankable, nonfinite=nonfinite)
    k = int(ratio * rankable) if k is None else min(int(k), rankable)
    if k <= 0:
        return Cut(None), ranked
    digit, below = _locate(hist, k)
    prefix, remaining = digit, k - below
    for shift in range(top_shift - DIGIT_BITS, -1, -DIGIT_BITS):
        base = prefix << (shift + DIGIT_BITS)
        hist = histogram_across_devices(source, flats, shift=shift, base=base, chunk_numel=chunk_numel)
        if reducer is not None:
            reducer.sum_(hist)
        digit, below = _locate(hist, remaining)
        prefix, remaining = (prefix << DIGIT_BITS) | digit, remaining - below
    if remaining == int(hist[digit].item()):
        # every entry equal to the threshold goes: no tie to break, so no position scan is needed
        return Cut(prefix + 1), ranked
    return Cut(prefix, ties=remaining), ranked


def select_chunk(keys: torch.Tensor, threshold: int, ties_left: int) -> tuple[torch.Tensor, int]:
    """The entries of one chunk a cut selects: keys below ``threshold``, then the first ``ties_left``
    keys equal to it (in position order). Returns the bool mask and how many ties it took."""
    mask = keys < threshold
    if ties_left <= 0:
        return mask, 0
    equal = keys == threshold
    n_equal = int(equal.sum().item())
    if n_equal > ties_left:
        first = equal.nonzero()[:ties_left, 0]
        equal = torch.zeros_like(equal)
        equal[first] = True
        n_equal = ties_left
    return mask | equal, n_equal


class Applied(NamedTuple):
    """What :func:`apply_cut_counted` did to one flat."""

    masked: int
    ties_used: int
    masked_nonzero: int
    """Masked entries whose gradient was nonzero (masked entries are always finite)."""


def apply_cut_counted(
    source: KeySource,
    index: int,
    flat: torch.Tensor,
    cut: Cut,
    *,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    record: torch.Tensor | None = None,
) -> Applied:
    """Zero, in place, the entries of ``flat`` that ``cut`` selects.

    Returns the counts (:class:`Applied`), ``masked_nonzero`` taken in the same pass. When
    ``record`` (a flat bool tensor shaped like ``flat``) is given, it receives the mask. Sources
    whose ``has_zero_below`` is true offer a ``zero_below(index, chunk, threshold)`` fast path
    (magnitude keys), taken for chunks that need no tie breaking; the generic path below is its twin.
    """
    if cut.threshold is None:
        if record is not None:
            record.zero_()
        return Applied(0, 0, 0)
    threshold, ties_left = cut.threshold, cut.ties
    keys = _kernel_keys(source, [(index, flat)]) if record is None or native_rank.usable([record], None) else None
    lib = native.library() if keys is not None else None
    if lib is not None:  # one C pass; the chunks below are its twin
        return Applied(*native_rank.apply(lib, flat, keys[0], threshold, ties_left, record))
    fast = source.zero_below if getattr(source, "has_zero_below", False) else None
    masked = torch.zeros((), dtype=torch.int64, device=flat.device)
    nonzero = torch.zeros((), dtype=torch.int64, device=flat.device)
    ties_used = 0
    for start, chunk in iter_chunks(flat, chunk_numel):
        if fast is not None and ties_left == 0:
            if threshold <= 0:  # masks nothing
                if record is not None:
                    record[start : start + chunk.numel()].zero_()
                continue
            nonzero_before = (chunk != 0).sum()  # -0.0 == 0; NaN and inf count, and stay after zero_below
            zeroed = fast(index, chunk, threshold)  # the entries that are zero now
            masked += zeroed
            nonzero += nonzero_before - (chunk.numel() - zeroed)
            if record is not None:
                # with no ties to break the cut is "key < threshold": for threshold > 0 exactly the
                # entries that are zero now (every zero has key 0)
                torch.eq(chunk, 0, out=record[start : start + chunk.numel()])
            continue
        mask, n_equal = select_chunk(source.keys(index, chunk, start), threshold, ties_left)
        ties_left -= n_equal
        ties_used += n_equal
        nonzero += (mask & (chunk != 0)).sum()
        chunk.masked_fill_(mask, 0)
        masked += mask.sum()
        if record is not None:
            record[start : start + chunk.numel()] = mask
    return Applied(int(masked.item()), ties_used, int(nonzero.item()))


def count_equal(source: KeySource, index: int, flat: torch.Tensor, key: int, *, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> int:
    """How many entries of ``flat`` have key ``key`` (the per-shard tie count of a sharded cut)."""
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start, chunk in iter_chunks(flat, chunk_numel):
        total += (source.keys(index, chunk, start) == key).sum()
    return int(total.item())
