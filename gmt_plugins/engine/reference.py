"""The engine's torch reference: exact selection of the k smallest keys, per tensor or over many
tensors, without sorting, and the torch twins of every kernel operation.

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
``rank`` all-reduces them through the reducer it is given (:mod:`gmt_plugins.distributed`). Without
one (a single process, or DDP's whole gradients) no collective is made.

Every function here runs on any device; :mod:`gmt_plugins.engine.dispatch` calls them when no faster
backend serves a call, and the tests compare each faster backend against them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
import torch

from gmt_plugins.distributed import ShardReducer
from gmt_plugins.engine.bits import all_set, pack_bits, popcount
from gmt_plugins.engine.keys import FLOAT32_MAX_BITS, SCORE_CAP, ScoreKeys, count_nonzero_bits
from gmt_plugins.engine.types import (
    DEFAULT_CHUNK_NUMEL,
    DIGIT_BITS,
    NUM_BINS,
    Applied,
    Cut,
    Energy,
    KeySource,
    Ranked,
    iter_chunks,
)

KernelHistogram = Callable[[torch.Tensor, int, int, torch.Tensor], bool]
"""``kernel(flat, base, shift, hist)`` adds ``flat``'s digit histogram to ``hist`` and returns True, or
returns False for a flat it does not serve (see :func:`_histogram`)."""


def _histogram(
    source: KeySource,
    flats: Sequence[tuple[int, torch.Tensor]],
    *,
    shift: int,
    base: int | None,
    chunk_numel: int,
    nonfinite: list[int] | None = None,
    gather: bool | None = None,
    kernel: KernelHistogram | None = None,
) -> torch.Tensor:
    """Histogram of the 16-bit digit at ``shift``.

    With ``base=None`` (the top digit) every key counts and, if ``nonfinite`` is given, the number
    of excluded keys (``>= cap``) of each tensor is appended to it. Otherwise only keys in
    ``[base, base + 2**(shift + 16))`` count: an offset and a clamp send the others to two spill
    bins, which on CPU is several times cheaper than gathering the bucket with a boolean mask. On
    CUDA (or with ``gather=True``) the bucket is gathered instead; the two branches are twins.
    The spill bins of the clamp branch are only ever sliced off, so both return the same histogram.

    ``kernel`` (from :mod:`gmt_plugins.engine.dispatch`) adds the histogram of the flats it serves in
    one read of each; the torch chunks below are its twin.
    """
    device = flats[0][1].device
    cap_digit = source.cap >> shift
    full = torch.zeros(NUM_BINS + 2, dtype=torch.int64, device=device)  # below, the digits, above
    digits_hist = full[1 : NUM_BINS + 1]
    ones = None
    excluded_before = 0
    for index, flat in flats:
        if kernel is None or not kernel(flat, base or 0, shift, full):
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
    kernel: KernelHistogram | None = None,
) -> tuple[Cut, Ranked]:
    """Find the cut that masks ``k`` entries (default ``floor(ratio * rankable)``) over all of ``flats``.

    ``flats`` are ``(index, flat_gradient)`` pairs; call it with one pair for the per-tensor scope
    and with all pairs for the global scope. ``k`` larger than the rankable count is clipped to it.

    ``reducer`` (set by the masker while gradients are sharded) sums every histogram and the non-finite counts over
    the processes holding the other shards; ``k``, ``rankable``, ``nonfinite`` and the cut are
    then those of the full tensors, identical on every rank (``ties`` still counts over the full
    tensors in flat order: the masker splits it between shards). Every rank must call ``rank``
    for the same groups in the same order.

    ``kernel`` computes the histograms of the flats it serves (see :func:`_histogram`).
    """
    if (ratio is None) == (k is None):
        raise TypeError("rank() takes exactly one of ratio and k")
    top_shift = source.key_bits - DIGIT_BITS
    if not flats:
        return Cut(None), Ranked(rankable=0, nonfinite=[])
    nonfinite: list[int] = []
    hist = histogram_across_devices(source, flats, shift=top_shift, base=None, chunk_numel=chunk_numel, nonfinite=nonfinite, kernel=kernel)
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
        hist = histogram_across_devices(source, flats, shift=shift, base=base, chunk_numel=chunk_numel, kernel=kernel)
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


def apply_cut(
    source: KeySource,
    index: int,
    flat: torch.Tensor,
    cut: Cut,
    *,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    record: torch.Tensor | None = None,
    energy: Energy | None = None,
) -> Applied:
    """Zero, in place, the entries of ``flat`` that ``cut`` selects.

    Returns the counts (:class:`Applied`), ``masked_nonzero`` taken in the same pass. When
    ``record`` (a flat bool tensor shaped like ``flat``) is given, it receives the mask; when
    ``energy`` is given, it is added the sums of ``g ** 2`` over the finite entries of each chunk
    before and after the chunk is masked (the twin of the kernel's ``csrc/energy.c``). Sources
    whose ``exact_magnitude`` is true offer a ``zero_below(index, chunk, threshold)`` fast path
    (magnitude keys), taken for chunks that need no tie breaking; the generic path below is its twin.
    """
    before = None if energy is None else square_sum(flat, chunk_numel)
    applied = _apply_cut(source, index, flat, cut, chunk_numel, record)
    if energy is not None:
        energy.add(before, square_sum(flat, chunk_numel) if applied.masked else before)
    return applied


def square_sum(flat: torch.Tensor, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> float:
    """The sum of ``g ** 2`` over the finite entries of ``flat``, in float64 (each square exact for
    32-bit and narrower floats), chunk by chunk."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for _, chunk in iter_chunks(flat, chunk_numel):
        squares = chunk.double().square()  # not square_: double() of a float64 chunk is the chunk itself
        total += squares.masked_fill_(~torch.isfinite(chunk), 0).sum()
    return float(total.item())


def _apply_cut(source: KeySource, index: int, flat: torch.Tensor, cut: Cut, chunk_numel: int, record: torch.Tensor | None) -> Applied:
    if cut.threshold is None:
        if record is not None:
            record.zero_()
        return Applied(0, 0, 0)
    threshold, ties_left = cut.threshold, cut.ties
    fast = source.zero_below if getattr(source, "exact_magnitude", False) else None
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


# --- torch twins of the kernel's other operations ---------------------------------------------


def count_nonfinite(flat: torch.Tensor, chunk_numel: int) -> int:
    """NaN/inf entries of ``flat``, counted chunk by chunk (no full-size scratch buffer)."""
    total = 0
    for _, chunk in iter_chunks(flat, chunk_numel):
        total += int((~torch.isfinite(chunk)).sum().item())
    return total


def count_zeros(flat: torch.Tensor, chunk_numel: int) -> int:
    """Entries of ``flat`` that are +0 or -0."""
    zeros = torch.zeros((), dtype=torch.int64, device=flat.device)
    for _, chunk in iter_chunks(flat, chunk_numel):
        zeros += chunk.numel() - count_nonzero_bits(chunk)
    return int(zeros.item())


def ema_update(ema: torch.Tensor, grad: torch.Tensor, beta: float, *, first: bool) -> None:
    """``ema = beta * ema + (1 - beta) * grad`` in place where ``grad`` is finite (``first``: the finite
    gradient, 0 elsewhere); ``ema`` is a flat float32 tensor on ``grad``'s device."""
    grad = grad.to(torch.float32)
    finite = torch.isfinite(grad)
    if first:
        ema.copy_(torch.where(finite, grad, 0.0))
    else:
        ema.copy_(torch.where(finite, beta * ema + (1 - beta) * grad, ema))


def accumulate_finite(acc: torch.Tensor | None, grad: torch.Tensor, *, square: bool = False) -> torch.Tensor:
    """A finite copy of ``grad`` (squared with ``square``) as float32, added to ``acc`` in place
    (a new tensor when ``acc`` is ``None``)."""
    finite = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)  # a copy: grad is not changed
    if square:
        finite.square_()
    return finite if acc is None else acc.add_(finite)


def key_scores(score: torch.Tensor, excluded: torch.Tensor | None, *, largest: bool) -> torch.Tensor:
    """Float32 values whose bit patterns are the :class:`~gmt_plugins.engine.keys.ScoreKeys` keys of
    ``score`` (``largest`` first), +inf where the score is not finite or ``excluded`` flags it."""
    bits = score.float().reshape(-1).view(torch.int32) & 0x7FFF_FFFF
    rankable = bits < SCORE_CAP
    if excluded is not None:
        rankable &= ~excluded.reshape(-1)
    key = FLOAT32_MAX_BITS - bits if largest else bits
    return torch.where(rankable, key, SCORE_CAP).view(torch.float32)


def pack_mask_bits(mask: torch.Tensor, *, invert: bool) -> torch.Tensor:
    """A flat bool mask packed 64 entries to an int64 word (entry ``i`` at bit ``i % 64`` of word
    ``i // 64``, the bits past the end 0), inverted with ``invert``: the bits summed as powers of two."""
    flags = (~mask if invert else mask).to(torch.int64).cpu()
    padded = torch.zeros((mask.numel() + 63) // 64 * 64, dtype=torch.int64)
    padded[: mask.numel()] = flags
    words = padded.view(-1, 64)
    weights = torch.tensor([1 << j for j in range(63)] + [-(1 << 63)], dtype=torch.int64)  # bit 63 is the sign
    return (words * weights).sum(dim=1)


def mark(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]], cut: Cut, chunk_numel: int) -> list[torch.Tensor]:
    """Flat bool masks of the entries ``cut`` selects, the ``ties`` budget spent over ``flats`` in order."""
    out = [torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device) for _, flat in flats]
    if cut.threshold is None:
        return out
    ties_left = cut.ties
    for (index, flat), mask in zip(flats, out):
        for start, chunk in iter_chunks(flat, chunk_numel):
            selected, n_equal = select_chunk(source.keys(index, chunk, start), cut.threshold, ties_left)
            ties_left -= n_equal
            mask[start : start + chunk.numel()] = selected
    return out


def gather_masked(flat: torch.Tensor, mask: torch.Tensor, chunk_numel: int) -> list[torch.Tensor]:
    """The entries of ``flat`` that the flat bool ``mask`` selects, one tensor per chunk."""
    return [chunk[m] for (_, chunk), (_, m) in zip(iter_chunks(flat, chunk_numel), iter_chunks(mask, chunk_numel))]


def scatter_masked(flat: torch.Tensor, mask: torch.Tensor, saved: list[torch.Tensor], chunk_numel: int) -> int:
    """Write :func:`gather_masked`'s output back; returns the number of entries written."""
    written = 0
    for ((_, chunk), (_, m)), values in zip(zip(iter_chunks(flat, chunk_numel), iter_chunks(mask, chunk_numel)), saved):
        chunk[m] = values
        written += values.numel()
    return written


def observe_coverage(
    mask: torch.Tensor | None, numel: int, updated: torch.Tensor | None, previous: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int | None]:
    """Fold one step's mask (flat bool, True = masked; ``None``: every entry masked) into the packed bit
    sets ``updated`` (updated at least once) and ``previous`` (masked at the last step; ``None`` the first
    time). Returns the new sets, the entries updated so far and the entries whose masked state changed."""
    packed_mask = pack_bits(mask) if mask is not None else all_set(numel, device)
    kept = all_set(numel, device) & ~packed_mask  # padding bits stay 0
    updated = kept if updated is None else updated.to(device) | kept
    changed = None if previous is None else popcount(previous.to(device) ^ packed_mask)
    return updated, packed_mask, popcount(updated), changed


def id3_grow(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    updatable: Sequence[torch.Tensor],
    masked: Sequence[torch.Tensor],
    *,
    eps: float,
    exponent: float,
    k: int,
    chunk_numel: int,
) -> list[int]:
    """Make the ``k`` still-masked entries with the largest ``|grad| / (eps + |theta|) ** exponent`` (float32)
    updatable, over all tensors (ties in order): set in ``updatable`` and cleared in ``masked`` in place.
    Returns how many entries each tensor gained."""
    def score(index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        theta = thetas[index][start : start + chunk.numel()].to(torch.float32)
        return chunk.to(torch.float32).abs() / (eps + theta.abs()).pow(exponent)

    source = ScoreKeys(score, largest=True, excluded=updatable)
    flats = list(enumerate(grads))
    cut, _ = rank(source, flats, k=k, chunk_numel=chunk_numel)
    added = []
    for kept, still, new in zip(updatable, masked, mark(source, flats, cut, chunk_numel)):
        kept |= new
        still &= ~new
        added.append(int(new.sum().item()))
    return added
