"""The CPU kernel's ranking and apply: a whole group ranked, and a tensor masked, by one call.

:mod:`gmt_plugins.engine.dispatch` hands a group here when every flat is a contiguous CPU tensor whose
key source :func:`describe` can describe to the kernel: magnitude keys, the random hash, stored float32
scores and stored masks (:mod:`gmt_plugins.engine.keys`). The kernel (``gmt_rank_group`` and
``gmt_apply``) does in one call what the per-pass ranking of :mod:`gmt_plugins.engine.reference` does
with a loop of histogram passes, with the same result bit for bit: the reference is its twin in the tests.

Window scan: when it knows a window of top digits that should hold the boundary, the kernel reads
each tensor once, counting the keys below the window and copying those inside it, and finds the
boundary among the copies; the histogram passes run only when it is not there. Random keys take
the window where their uniform keys must fall (or the previous step's boundary, ``hint``), scores
the previous boundary; fp32 gradient magnitudes take it from a sample of the keys of this call
(``SAMPLE_WINDOW``), scanned with AVX2 where the CPU has it. The result never depends on the
window, only the time.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gmt_plugins.engine.cpu.signatures import SOURCE_FP16, SOURCE_KEPT, Source
from gmt_plugins.engine.keys import MagnitudeKeys, MaskKeys, RandomKeys, ScoreKeys, StoredMask
from gmt_plugins.engine.types import Energy

# kinds of key the kernel computes (the enum of the C sources)
KIND_F32, KIND_BF16_WIDE, KIND_16, KIND_RANDOM_32, KIND_RANDOM_16, KIND_RANDOM_64, KIND_SCORE, KIND_MASK = range(8)
TABLES = 4
BINS = 1 << 16
MAX_GROUP = (1 << 32) - 1  # counts are uint32 per table
MAX_CANDIDATES = 1 << 24
SAMPLE_WINDOW = -3  # wlo: the kernel samples the keys to choose the window (csrc/rank_group.c)
_RANDOM_KINDS = (KIND_RANDOM_32, KIND_RANDOM_16, KIND_RANDOM_64)
_MAGNITUDE_KINDS = (KIND_F32, KIND_BF16_WIDE, KIND_16)


@dataclass(frozen=True)
class NativeKeys:
    """How the kernel computes the keys of one flat: its kind, the hash seed (``splitmix64(salt)``,
    random keys), the flat offset of its first entry (random keys), the float32 score (``KIND_SCORE``)
    or the bool mask (``KIND_MASK``; ``None`` when every entry is masked)."""

    kind: int
    seed: int = 0
    start: int = 0
    score: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    selection: Preselection | None = None
    """Random keys already hashed by :func:`random_rank_group`: :func:`apply` then reads its bits."""
    member: int = 0
    """This flat's place in ``selection``'s group."""
    kept: bool = False
    """KIND_MASK: ``mask`` flags the kept entries (a strategy's stored set), not the masked ones."""
    bits: torch.Tensor | None = None
    """KIND_MASK: the masked entries packed 64 to a word (:func:`pack_mask_bits`), which :func:`apply`
    reads instead of ``mask`` for the stored-mask step (threshold 1, no ties)."""


_scratch = threading.local()




def _source(flat: torch.Tensor, keys: NativeKeys) -> Source:
    """The kernel's view of one flat: the score or mask bytes as the second pointer, and the flags that
    say how 16-bit values and mask bytes read (``SOURCE_FP16``, ``SOURCE_KEPT``)."""
    fp16 = keys.kind in (KIND_RANDOM_16, KIND_16) and flat.dtype == torch.float16
    flags = (SOURCE_FP16 if fp16 else 0) | (SOURCE_KEPT if keys.kind == KIND_MASK and keys.kept else 0)
    second = keys.mask if keys.kind == KIND_MASK else keys.score
    score = None if second is None else second.data_ptr()
    return Source(flat.data_ptr(), score, flat.numel(), keys.start, keys.seed & (2**64 - 1), keys.kind, flags)


def _buffers(candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's zeroed histogram tables and a candidate buffer of at least ``candidates`` keys."""
    hist = getattr(_scratch, "hist", None)
    if hist is None:
        hist = _scratch.hist = torch.zeros(TABLES * BINS, dtype=torch.int32)
    cand = getattr(_scratch, "cand", None)
    if cand is None or cand.numel() < candidates:
        cand = _scratch.cand = torch.empty(max(candidates, 1), dtype=torch.int32)
    return hist, cand


@dataclass
class GroupResult:
    threshold: int | None
    ties: int
    rankable: int
    nonfinite: list[int]
    boundary: int | None
    second_pass: bool


def rank_group(
    lib: ctypes.CDLL,
    flats: Sequence[torch.Tensor],
    keys: Sequence[NativeKeys],
    *,
    key_bits: int,
    cap: int,
    ratio: float | None,
    k: int | None,
    hint: int | None = None,
) -> GroupResult:
    """Rank one group in one call (see the module doc). ``hint``: the previous boundary top digit."""
    count = len(flats)
    sources = (Source * max(count, 1))(*[_source(f, kk) for f, kk in zip(flats, keys)])
    total = sum(f.numel() for f in flats)
    window = _window(keys, total, ratio, k, hint) if key_bits > 16 else (-1, -2)
    cand_cap = _candidate_room(total) if window[0] <= window[1] or window[0] == SAMPLE_WINDOW else 0
    hist, cand = _buffers(cand_cap)
    nonfinite = (ctypes.c_int64 * max(count, 1))()
    out = (ctypes.c_int64 * 5)()
    lib.gmt_rank_group(
        sources, count, key_bits, cap, 0.0 if ratio is None else float(ratio), -1 if k is None else max(int(k), 0),
        window[0], window[1], hist.data_ptr(), cand.data_ptr(), cand_cap, nonfinite, out,
    )
    threshold, ties, rankable, boundary, second = out
    return GroupResult(
        threshold=None if threshold < 0 else threshold,
        ties=ties,
        rankable=rankable,
        nonfinite=nonfinite[:count],
        boundary=None if boundary < 0 else boundary,
        second_pass=bool(second),
    )


def _candidate_room(total: int) -> int:
    """Keys the window scan may copy: an eighth of a small group, a 32nd of a large one (at least 2**19),
    never more than MAX_CANDIDATES (64 MiB). The kernel's sample declines a window that would not fit."""
    return min(total, BINS + total // 8, max(total // 32, 1 << 19), MAX_CANDIDATES)


def _window(
    keys: Sequence[NativeKeys],
    total: int,
    ratio: float | None,
    k: int | None,
    hint: int | None,
    *,
    sigmas: float = 6.0,
    pad: int = 2,
) -> tuple[int, int]:
    """Top digits whose keys the window scan keeps. Random keys (uniform, so the boundary is known in
    advance): the expected bin +- ``sigmas`` standard deviations of the count. Other keys: the hint's bin
    and its neighbours, or without a hint ``SAMPLE_WINDOW``: the kernel picks the window from a sample of
    this call's keys (fp32 keys, where its AVX2 scan serves; else the histogram passes)."""
    if total and all(kk.kind in _RANDOM_KINDS for kk in keys):
        p = min(max(ratio if k is None else k / total, 0.0), 1.0)
        center = hint if hint is not None else int(p * (1 << 15))
        half = int(sigmas * math.sqrt(total * p * (1 - p)) / total * (1 << 15)) + pad
        return max(center - half, 0), center + half
    return (hint - 1, hint + 1) if hint is not None else (SAMPLE_WINDOW, SAMPLE_WINDOW)


def hint_helps(keys: Sequence[NativeKeys]) -> bool:
    """Whether to pass the previous step's boundary as a hint: not for gradient magnitudes, which
    move their scale from step to step (a SmolLM2 tensor's boundary digit moves by tens of digits
    between steps), so that a hint mostly misses and a miss costs a scan on top of the histogram
    passes; the kernel samples fp32 magnitudes instead. Random keys (the same distribution at every
    step) and scores (gmt_momentum's EMA moves slowly) keep it."""
    return bool(keys) and not any(kk.kind in _MAGNITUDE_KINDS for kk in keys)


def apply(
    lib: ctypes.CDLL, flat: torch.Tensor, keys: NativeKeys, threshold: int, ties: int, record: torch.Tensor | None,
    energy: Energy | None = None,
) -> tuple[int, int, int]:
    """Zero the entries below ``threshold`` and the first ``ties`` equal to it; ``(masked, ties_used,
    masked_nonzero)``, the last counted in the same pass: masked entries that were nonzero before.
    ``energy`` (or ``None``) is added the sums of ``g ** 2`` before and after masking, taken block by
    block in the same pass (``csrc/energy.c``)."""
    if keys.selection is not None and keys.selection.covers(threshold, ties):
        return apply_preselected(lib, flat, keys, threshold, ties, record, energy)
    if keys.bits is not None and keys.kind == KIND_MASK and threshold == 1 and ties == 0:
        return apply_mask_bits(lib, flat, keys.bits, record, energy)
    out = (ctypes.c_int64 * 3)()
    source = _source(flat, keys)
    record_ptr = None if record is None else record.data_ptr()
    if energy is None:
        lib.gmt_apply(ctypes.byref(source), threshold, ties, record_ptr, out)
    else:
        sums = (ctypes.c_double * 2)()
        lib.gmt_apply_energy(ctypes.byref(source), threshold, ties, record_ptr, out, sums)
        energy.add(sums[0], sums[1])
    return out[0], out[1], out[2]


_VALUE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
"""The value kinds of ``csrc/energy.c`` by gradient dtype."""


def square_sum(lib: ctypes.CDLL, flat: torch.Tensor) -> float | None:
    """The sum of ``g ** 2`` over the finite entries of ``flat`` (``gmt_square_sum``, blocks as the apply's
    sums), or ``None`` for a flat the kernel cannot read (not on the CPU, not contiguous, another dtype)."""
    value = _VALUE_KINDS.get(flat.dtype)
    if value is None or flat.device.type != "cpu" or not flat.is_contiguous():
        return None
    return float(lib.gmt_square_sum(flat.data_ptr(), flat.numel(), value)) if flat.numel() else 0.0


def _sums(energy: Energy | None) -> ctypes.Array | None:
    """The kernel's ``double energy[2]`` for an apply given ``energy``, else NULL."""
    return None if energy is None else (ctypes.c_double * 2)()


def _added(energy: Energy | None, sums: ctypes.Array | None) -> None:
    if energy is not None and sums is not None:
        energy.add(sums[0], sums[1])


def apply_tracked(
    lib: ctypes.CDLL, flat: torch.Tensor, keys: NativeKeys, threshold: int, ties: int,
    updated: torch.Tensor, previous: torch.Tensor, first: bool, energy: Energy | None = None,
) -> tuple[int, int, int, int, int] | None:
    """:func:`apply` with coverage folded in block by block (``gmt_apply_tracked``): the packed bit sets
    ``updated`` and ``previous`` (contiguous CPU uint8, ``ceil(n / 8)`` bytes) are updated as
    :meth:`gmt_plugins.coverage.CoverageTracker.observe` would with this apply's record. Returns
    ``(masked, ties_used, masked_nonzero, updated_bits, changed)``, or ``None`` for keys other than
    gradient magnitudes (fp32, bf16, fp16), which it does not serve. ``energy`` as :func:`apply`'s."""
    if keys.kind not in _MAGNITUDE_KINDS or keys.selection is not None:
        return None
    out, sums = (ctypes.c_int64 * 5)(), _sums(energy)
    source = _source(flat, keys)
    if not lib.gmt_apply_tracked(ctypes.byref(source), threshold, ties, updated.data_ptr(), previous.data_ptr(), int(first), out, sums):
        return None
    _added(energy, sums)
    return out[0], out[1], out[2], out[3], out[4]



def avx2_scan(lib: ctypes.CDLL) -> bool:
    """Whether the kernel scans fp32 windows with AVX2 (and so samples windows for them)."""
    return bool(lib.gmt_avx2_scan())


def usable(flats: Sequence[torch.Tensor], record: torch.Tensor | None = None) -> bool:
    """Whether every flat (and the record) lies where the kernel can read it, in a group small enough."""
    if record is not None and not (record.device.type == "cpu" and record.is_contiguous() and record.dtype == torch.bool):
        return False
    return all(f.device.type == "cpu" and f.is_contiguous() for f in flats) and sum(f.numel() for f in flats) <= MAX_GROUP


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on a Python int (mod 2**64), as :func:`gmt_plugins.engine.keys.splitmix64`."""
    mask = 2**64 - 1
    x = (x * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)




def ema_f32(lib: ctypes.CDLL, ema: torch.Tensor, grad: torch.Tensor, beta: float, *, first: bool) -> None:
    """gmt_momentum's EMA update of ``ema`` in place (``first``: set it to the finite gradient), bit for
    bit what ``torch.where(isfinite(g), beta * ema + (1 - beta) * g, ema)`` gives for fp32 tensors."""
    if not (contiguous_cpu_f32(ema) and contiguous_cpu_f32(grad) and ema.numel() == grad.numel()):
        raise ValueError("ema_f32 takes contiguous CPU float32 tensors of one size")
    lib.gmt_ema_f32(ema.data_ptr(), grad.data_ptr(), grad.numel(), beta, 1 - beta, int(first))


def contiguous_cpu_f32(t: torch.Tensor) -> bool:
    """Whether ``t`` is a contiguous CPU float32 tensor, the only kind the float32 kernels read."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def count_nonfinite_f32(lib: ctypes.CDLL, flat: torch.Tensor) -> int:
    """NaN and inf entries of a contiguous CPU fp32 tensor, in one C read."""
    return int(lib.gmt_count_nonfinite_f32(flat.data_ptr(), flat.numel())) if flat.numel() else 0


# --- random keys hashed once (gmt_random_rank / gmt_apply_preselected in csrc/random_rank.c) -----


@dataclass(frozen=True, eq=False)
class Preselection:
    """What :func:`random_rank_group` (or :func:`ema_rank_groups`) learnt of a group's keys in the read
    that ranked them, for :func:`apply`: per entry one bit "finite and key < ``lo``" (``bits``, int64
    words, member ``t`` from word ``word_offsets[t]``), and the keys in ``[lo, hi)`` with their
    positions (``cand_key``, ``cand_pos``; member ``t``'s from ``cand_start[t]`` to
    ``cand_start[t + 1]``, in position order). One bit per entry: 1/32 of fp32 gradients' memory,
    held from the plan to the apply of one step."""

    bits: torch.Tensor
    word_offsets: list[int]
    cand_key: torch.Tensor
    cand_pos: torch.Tensor
    cand_start: list[int]
    lo: int
    hi: int
    scratch: _ReusedBuffers | None = None
    """Buffers reused from call to call (:func:`ema_rank_groups`): the selection holds only until the
    next call that reuses them, ``generation`` tells (:func:`apply_preselected` refuses a stale one)."""
    generation: int = 0

    def stale(self) -> bool:
        return self.scratch is not None and self.scratch.generation != self.generation

    def covers(self, threshold: int, ties: int) -> bool:
        """Whether a cut at ``threshold`` is decided by the bits and candidates alone."""
        return self.lo <= threshold < self.hi or (threshold == self.hi and ties == 0)


# Half-width of random_rank_group's window in standard deviations of the count below it: the k-th key
# falls outside it for about one group in 16,000 (then the histogram passes rank it); a wider window
# holds more candidates, and every block of 64 entries holding one costs a second look.
RANDOM_SIGMAS = 4.0




def random_rank_group(
    lib: ctypes.CDLL,
    flats: Sequence[torch.Tensor],
    keys: Sequence[NativeKeys],
    *,
    ratio: float | None,
    k: int | None,
) -> tuple[GroupResult, Preselection] | None:
    """Rank a group of random-key flats (``KIND_RANDOM_*``) hashing every key once, and keep what
    :func:`apply` needs to mask them without hashing again; ``None`` when the k-th key fell outside
    the expected window (about one group in 10**9): then rank with :func:`rank_group`."""
    if not flats or any(kk.kind not in _RANDOM_KINDS for kk in keys):
        raise ValueError(f"random_rank_group takes random-key flats only, got kinds {sorted({kk.kind for kk in keys})}")
    count = len(flats)
    sizes = [f.numel() for f in flats]
    total = sum(sizes)
    wlo, whi = _window(keys, total, ratio, k, None, sigmas=RANDOM_SIGMAS, pad=1)
    lo, hi = wlo << 16, min((whi + 1) << 16, 1 << 31)
    words = [(n + 63) // 64 for n in sizes]
    offsets = [0]
    for w in words:
        offsets.append(offsets[-1] + w)
    # twice the window's expected share of the keys: more is a miss like a k-th key outside it
    expected = total * (whi - wlo + 1) / (1 << 15)
    cand_cap = int(min(total, 2 * expected + 1024, MAX_CANDIDATES))
    bits = torch.empty(max(offsets[-1], 1), dtype=torch.int64)
    cand_key = torch.empty(max(cand_cap, 1), dtype=torch.int32)
    cand_pos = torch.empty(max(cand_cap, 1), dtype=torch.int64)
    hist, _ = _buffers(0)
    sources = (Source * count)(*[_source(f, kk) for f, kk in zip(flats, keys)])
    word_offsets = (ctypes.c_int64 * count)(*offsets[:-1])
    cand_start = (ctypes.c_int64 * (count + 1))()
    nonfinite = (ctypes.c_int64 * count)()
    out = (ctypes.c_int64 * 3)()
    ranked = lib.gmt_random_rank(
        sources, count, 0.0 if ratio is None else float(ratio), -1 if k is None else max(int(k), 0), lo, hi - lo,
        bits.data_ptr(), word_offsets, cand_key.data_ptr(), cand_pos.data_ptr(), cand_start, cand_cap,
        hist.data_ptr(), nonfinite, out,
    )
    if not ranked:
        return None
    threshold, ties, rankable = out
    result = GroupResult(
        threshold=None if threshold < 0 else threshold, ties=ties, rankable=rankable, nonfinite=nonfinite[:count],
        boundary=None, second_pass=False,
    )
    selection = Preselection(bits, offsets[:-1], cand_key, cand_pos, cand_start[: count + 1], lo, hi)
    return result, selection


def apply_preselected(
    lib: ctypes.CDLL, flat: torch.Tensor, keys: NativeKeys, threshold: int, ties: int, record: torch.Tensor | None,
    energy: Energy | None = None,
) -> tuple[int, int, int]:
    """:func:`apply` for a flat whose keys :func:`random_rank_group` or :func:`ema_rank_groups` kept: one
    bit per entry and the window's keys are read, no key is computed. ``(masked, ties_used,
    masked_nonzero)`` and ``energy`` as :func:`apply`."""
    selection = keys.selection
    if selection is None or not selection.covers(threshold, ties):
        window = None if selection is None else (selection.lo, selection.hi)
        raise ValueError(f"apply_preselected needs a selection whose window {window} holds threshold {threshold}")
    if selection.stale():
        raise RuntimeError(
            "this selection's buffers were reused by a later ema_rank_groups call on this thread: apply a step's "
            "plan before planning the next one"
        )
    t = keys.member
    first, last = selection.cand_start[t], selection.cand_start[t + 1]
    out, sums = (ctypes.c_int64 * 3)(), _sums(energy)
    source = _source(flat, keys)
    lib.gmt_apply_preselected(
        ctypes.byref(source), selection.bits.data_ptr() + 8 * selection.word_offsets[t],
        selection.cand_key.data_ptr() + 4 * first, selection.cand_pos.data_ptr() + 8 * first, last - first,
        threshold, ties, None if record is None else record.data_ptr(), out, sums,
    )
    _added(energy, sums)
    return out[0], out[1], out[2]


# --- stored masks read as bits, gradient sums (csrc/mask_bits.c and csrc/finite_f32.c) ----------





def pack_mask_bits(lib: ctypes.CDLL, mask: torch.Tensor, *, invert: bool) -> torch.Tensor:
    """A flat CPU bool mask packed 64 entries to an int64 word (entry ``i`` at bit ``i % 64`` of word
    ``i // 64``, the bits past the end 0), inverted with ``invert`` (kept entries -> masked bits).
    :func:`gmt_plugins.engine.reference.pack_mask_bits` is its twin."""
    if mask.dtype != torch.bool or mask.device.type != "cpu" or not mask.is_contiguous() or mask.dim() != 1:
        raise ValueError(f"pack_mask_bits takes a flat contiguous CPU bool tensor, got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
    bits = torch.empty((mask.numel() + 63) // 64, dtype=torch.int64)
    if mask.numel():
        lib.gmt_pack_mask_bits(mask.data_ptr(), mask.numel(), int(invert), bits.data_ptr())
    return bits


def apply_mask_bits(
    lib: ctypes.CDLL, flat: torch.Tensor, bits: torch.Tensor, record: torch.Tensor | None, energy: Energy | None = None
) -> tuple[int, int, int]:
    """The stored-mask step from packed bits: zero the finite entries of the fp32 ``flat`` whose bit is
    set; ``(masked, 0, masked_nonzero)`` (and ``energy``) as :func:`apply` gives for ``KIND_MASK`` at
    threshold 1, no ties (its twin in the tests)."""
    if not contiguous_cpu_f32(flat) or bits.dtype != torch.int64 or bits.device.type != "cpu" or not bits.is_contiguous():
        raise ValueError("apply_mask_bits takes a contiguous CPU float32 gradient and contiguous CPU int64 bits")
    if bits.numel() < (flat.numel() + 63) // 64:
        raise ValueError(f"apply_mask_bits: {bits.numel()} words cannot hold {flat.numel()} entries")
    out, sums = (ctypes.c_int64 * 3)(), _sums(energy)
    if flat.numel():
        lib.gmt_apply_mask_bits(flat.data_ptr(), bits.data_ptr(), flat.numel(), None if record is None else record.data_ptr(), out, sums)
    _added(energy, sums)
    return out[0], out[1], out[2]


def accumulate_finite_f32(lib: ctypes.CDLL, acc: torch.Tensor, grad: torch.Tensor, *, first: bool, square: bool) -> None:
    """``acc`` (+)= the finite entries of ``grad`` (squared with ``square``), NaN/inf counting as +0, in
    place and in one read of ``grad``; ``first``: ``acc`` is overwritten. Bit for bit the torch twin
    :func:`gmt_plugins.strategies._masks.reference_accumulate_finite` (``nan_to_num``, ``square_``, ``add_``)."""
    if not (contiguous_cpu_f32(acc) and contiguous_cpu_f32(grad) and acc.numel() == grad.numel()):
        raise ValueError("accumulate_finite_f32 takes contiguous CPU float32 tensors of one size")
    if grad.numel():
        lib.gmt_accumulate_finite_f32(acc.data_ptr(), grad.data_ptr(), grad.numel(), int(first), int(square))


def score_keys_f32(lib: ctypes.CDLL, score: torch.Tensor, excluded: torch.Tensor | None, *, largest: bool) -> torch.Tensor:
    """:func:`gmt_plugins.strategies._sparse.key_scores` for one tensor in one C pass (the torch
    :func:`~gmt_plugins.strategies._sparse.reference_key_scores` is its twin)."""
    flags_ok = excluded is None or (
        excluded.dtype == torch.bool and excluded.device.type == "cpu" and excluded.is_contiguous() and excluded.numel() == score.numel()
    )
    if not contiguous_cpu_f32(score) or not flags_ok:
        raise ValueError("score_keys_f32 takes a contiguous CPU float32 score and, optionally, contiguous CPU bool flags of its size")
    out = torch.empty(score.numel(), dtype=torch.float32)
    if score.numel():
        lib.gmt_score_keys_f32(score.data_ptr(), None if excluded is None else excluded.data_ptr(), score.numel(), int(largest), out.data_ptr())
    return out


# --- gmt_momentum in one read per tensor, many groups per call (gmt_ema_rank_groups) ---------------

# the first read histograms every 2**EMA_SAMPLE_SHIFT-th key of groups of EMA_SAMPLE_FROM entries or
# more (fewer counts, a wider window); a smaller group's sample would be too small to place a narrow window
EMA_SAMPLE_SHIFT = 3
EMA_SAMPLE_FROM = 1 << 16



def ema_rank_groups(
    lib: ctypes.CDLL,
    grads: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    first: Sequence[bool],
    groups: Sequence[int],
    *,
    beta: float,
    ratio: float | None,
    k: int | None,
) -> list[tuple[GroupResult | None, Preselection | None]]:
    """Update every EMA in place as :func:`ema_f32` does and rank each group by the score keys of its
    updated EMAs (sampled windows, then the cuts), for many
    groups in one kernel call: ``groups[g]`` is the number of tensors of group ``g``, in order (tensor
    scope: ``[1] * len(grads)``; global scope: ``[len(grads)]``). One call per step instead of one per
    tensor: per call, Python, ctypes and fresh buffers cost about as much as ranking a 100k-entry
    tensor. A group whose ``k``-th key fell outside its window, or whose window keys overflowed the
    shared buffer, gives ``(None, None)``: its EMAs are updated all the same; rank them with
    :func:`rank_group`. :func:`ema_f32` then :func:`rank_group` is the twin."""
    if len(grads) != len(emas) or len(grads) != len(first) or not grads:
        raise ValueError("ema_rank_groups takes as many gradients, EMAs and first flags, at least one")
    if any(int(c) < 1 for c in groups) or sum(groups) != len(grads):
        raise ValueError(f"groups must be positive tensor counts adding up to {len(grads)}, got {list(groups)[:8]}...")
    for g, e in zip(grads, emas):
        if not (contiguous_cpu_f32(g) and contiguous_cpu_f32(e) and g.numel() == e.numel()):
            raise ValueError("ema_rank_groups takes contiguous CPU float32 gradients and EMAs of equal sizes")
    count = len(grads)
    sizes = [g.numel() for g in grads]
    ends, at = [], 0
    for c in groups:
        at += int(c)
        ends.append(at)
    starts = [0, *ends[:-1]]
    if max(sum(sizes[s:e]) for s, e in zip(starts, ends)) > MAX_GROUP:
        raise ValueError(f"ema_rank_groups takes at most {MAX_GROUP} entries in one group")
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + (n + 63) // 64)
    total = sum(sizes)
    # the windows' keys of every group, one after the other: about 1 % of the entries in all
    cand_cap = min(total, BINS + total // 16, MAX_CANDIDATES)
    hist, _ = _buffers(0)
    scratch = _reused_buffers(offsets[-1], cand_cap)
    bits, cand_key, cand_pos = scratch.bits, scratch.cand_key, scratch.cand_pos
    sources = (Source * count)(*[Source(g.data_ptr(), e.data_ptr(), g.numel(), 0, 0, KIND_SCORE) for g, e in zip(grads, emas)])
    firsts = (ctypes.c_int32 * count)(*[int(bool(f)) for f in first])
    group_end = (ctypes.c_int64 * len(ends))(*ends)
    word_offsets = (ctypes.c_int64 * count)(*offsets[:-1])
    cand_lo, cand_hi = (ctypes.c_int64 * count)(), (ctypes.c_int64 * count)()
    nonfinite = (ctypes.c_int64 * count)()
    out = (ctypes.c_int64 * (6 * len(ends)))()
    lib.gmt_ema_rank_groups(
        sources, beta, 1 - beta, firsts, group_end, len(ends), 0.0 if ratio is None else float(ratio),
        -1 if k is None else max(int(k), 0), EMA_SAMPLE_FROM, EMA_SAMPLE_SHIFT, hist.data_ptr(), bits.data_ptr(), word_offsets,
        cand_key.data_ptr(), cand_pos.data_ptr(), cand_lo, cand_hi, cand_cap, nonfinite, out,
    )
    results: list[tuple[GroupResult | None, Preselection | None]] = []
    for gi, (s, e) in enumerate(zip(starts, ends)):
        ranked, threshold, ties, rankable, lo, hi = out[6 * gi : 6 * gi + 6]
        if not ranked:
            results.append((None, None))
            continue
        result = GroupResult(
            threshold=None if threshold < 0 else threshold, ties=ties, rankable=rankable, nonfinite=nonfinite[s:e],
            boundary=None, second_pass=True,
        )
        selection = Preselection(
            bits, offsets[s:e], cand_key, cand_pos, [*cand_lo[s:e], cand_hi[e - 1]], lo, hi, scratch, scratch.generation
        )
        results.append((result, selection))
    return results


class _ReusedBuffers:
    """One thread's bits and window-key buffers for :func:`ema_rank_groups`, kept from call to call:
    fresh ones (17 MB of bits and about as much of window keys on SmolLM2-135M) cost a page fault per
    4 KiB written, about 0.02 s a step. ``generation`` counts the calls that reused them."""

    def __init__(self) -> None:
        self.bits = torch.empty(1, dtype=torch.int64)
        self.cand_key = torch.empty(1, dtype=torch.int32)
        self.cand_pos = torch.empty(1, dtype=torch.int64)
        self.generation = 0


_reused = threading.local()


def _reused_buffers(words: int, candidates: int) -> _ReusedBuffers:
    """This thread's buffers, grown to ``words`` bit words and ``candidates`` keys; every earlier
    selection drawn from them turns stale."""
    held = getattr(_reused, "buffers", None)
    if held is None:
        held = _reused.buffers = _ReusedBuffers()
    if held.bits.numel() < words:
        held.bits = torch.empty(words, dtype=torch.int64)
    if held.cand_key.numel() < candidates:
        held.cand_key = torch.empty(candidates, dtype=torch.int32)
        held.cand_pos = torch.empty(candidates, dtype=torch.int64)
    held.generation += 1
    return held


# --- key sources as the kernel computes them ----------------------------------------------------

_MAGNITUDE = {
    (torch.float32, 32): KIND_F32,
    (torch.bfloat16, 32): KIND_BF16_WIDE,
    (torch.bfloat16, 16): KIND_16,
    (torch.float16, 16): KIND_16,
}
_RANDOM = {2: KIND_RANDOM_16, 4: KIND_RANDOM_32, 8: KIND_RANDOM_64}


def describe(source: object, index: int, flat: torch.Tensor) -> NativeKeys | None:
    """How the kernel computes the keys of ``source`` for its tensor ``index`` (``flat``), or ``None``
    when it cannot compute exactly the keys ``source.keys`` gives."""
    if isinstance(source, MagnitudeKeys):
        kind = _MAGNITUDE.get((flat.dtype, source.key_bits)) if source.exact_magnitude else None
        return None if kind is None else NativeKeys(kind)
    if isinstance(source, RandomKeys):
        if not source.exact_hash or not flat.is_floating_point() or flat.element_size() not in _RANDOM:
            return None
        return NativeKeys(_RANDOM[flat.element_size()], seed=splitmix64(source.salt(index) & (2**64 - 1)))
    if isinstance(source, ScoreKeys):
        if not source.stored_smallest_first:
            return None
        score = source.tensors[index]
        usable = flat.dtype == torch.float32 and score.dtype == torch.float32 and score.device.type == "cpu"
        if not usable or not score.is_contiguous() or score.numel() != flat.numel():
            return None
        return NativeKeys(KIND_SCORE, score=score)
    if isinstance(source, MaskKeys):
        return _describe_mask(source, index, flat)
    return None


def _describe_mask(source: MaskKeys, index: int, flat: torch.Tensor) -> NativeKeys | None:
    """Stored masks of fp32 CPU gradients: a bool for the whole tensor, a flat bool mask (True =
    masked) or a :class:`StoredMask` of kept entries (with its packed bits, when they were packed)."""
    masked = source.masked[index]
    if not source.exact_masks or not contiguous_cpu_f32(flat) or masked is False:
        return None
    if masked is True:
        return NativeKeys(KIND_MASK)
    stored = isinstance(masked, StoredMask)
    flags = masked.kept if stored else masked
    usable = flags.dtype == torch.bool and flags.device.type == "cpu" and flags.is_contiguous()
    if not usable or flags.numel() != flat.numel():
        return None
    if stored:
        return NativeKeys(KIND_MASK, mask=flags, kept=True, bits=masked.bits)
    return NativeKeys(KIND_MASK, mask=flags)


def coverage_observe(lib: ctypes.CDLL, mask: torch.Tensor | None, numel: int, updated: torch.Tensor, previous: torch.Tensor, first: bool) -> tuple[int, int]:
    """Fold one step's mask (``None``: every entry masked) into the packed bit sets ``updated`` and
    ``previous`` in place (``gmt_coverage_observe``); ``(updated entries, changed entries)``."""
    out = torch.zeros(2, dtype=torch.int64)
    lib.gmt_coverage_observe(None if mask is None else mask.data_ptr(), numel, updated.data_ptr(), previous.data_ptr(), int(first), out.data_ptr())
    return int(out[0]), int(out[1])
