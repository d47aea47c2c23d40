"""The many-tensor engine: a whole group ranked, and a tensor masked, by one call of the C kernel.

:func:`gmt_plugins.selection.rank` and :func:`~gmt_plugins.selection.apply_cut` hand a group here
when every flat is a contiguous CPU tensor whose key source describes its keys to the kernel
(``native_source``): magnitude keys (:class:`~gmt_plugins.keys.MagnitudeKeys`), the random hash
(:class:`~gmt_plugins.keys.RandomKeys`) and float32 scores
(:class:`~gmt_plugins.strategies._masks.ScoreKeys`). The kernel (``gmt_rank_group`` and
``gmt_apply`` in ``_native/histogram.c``) does in one call what the per-pass engine does with a
loop of histogram calls and per-tensor torch bookkeeping, with the same result bit for bit: the
per-pass engine (kernel histograms, and the torch passes) is its reference twin in the tests.

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

from gmt_plugins import native

# kinds of key the kernel computes (enum in _native/histogram.c)
KIND_F32, KIND_BF16_WIDE, KIND_16, KIND_RANDOM_32, KIND_RANDOM_16, KIND_RANDOM_64, KIND_SCORE, KIND_MASK = range(8)
TABLES = 4
BINS = 1 << 16
MAX_GROUP = (1 << 32) - 1  # counts are uint32 per table
MAX_CANDIDATES = 1 << 24
SAMPLE_WINDOW = -3  # wlo: the kernel samples the keys to choose the window (histogram.c)
_RANDOM_KINDS = (KIND_RANDOM_32, KIND_RANDOM_16, KIND_RANDOM_64)
_MAGNITUDE_KINDS = (KIND_F32, KIND_BF16_WIDE, KIND_16)


@dataclass(frozen=True)
class NativeKeys:
    """How the kernel computes the keys of one flat: its kind, the hash seed (``splitmix64(salt)``,
    random keys), the flat offset of its first entry (random keys) and the score tensor (scores; for
    stored masks the bool mask, ``None`` when every entry is masked)."""

    kind: int
    seed: int = 0
    start: int = 0
    score: torch.Tensor | None = None


class _Source(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("s", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("start", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
        ("kind", ctypes.c_int32),
    ]


_scratch = threading.local()
_declared: set[int] = set()


def _declare(lib: ctypes.CDLL) -> None:
    if id(lib) in _declared:
        return
    lib.gmt_rank_group.argtypes = [
        ctypes.POINTER(_Source), ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_double, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.gmt_rank_group.restype = None
    lib.gmt_apply.argtypes = [ctypes.POINTER(_Source), ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.gmt_apply.restype = None
    _declared.add(id(lib))


def _source(flat: torch.Tensor, keys: NativeKeys) -> _Source:
    score = keys.score
    # KIND_RANDOM_16 tells fp16 from bf16 by a non-null second pointer
    s = score.data_ptr() if score is not None else (1 if keys.kind == KIND_RANDOM_16 and flat.dtype == torch.float16 else 0)
    return _Source(flat.data_ptr(), s or None, flat.numel(), keys.start, keys.seed & (2**64 - 1), keys.kind)


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
    _declare(lib)
    count = len(flats)
    sources = (_Source * max(count, 1))(*[_source(f, kk) for f, kk in zip(flats, keys)])
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


def _window(keys: Sequence[NativeKeys], total: int, ratio: float | None, k: int | None, hint: int | None) -> tuple[int, int]:
    """Top digits whose keys the window scan keeps. Random keys (uniform, so the boundary is known in
    advance): the expected bin +- 6 standard deviations of the count. Other keys: the hint's bin and
    its neighbours, or without a hint ``SAMPLE_WINDOW``: the kernel picks the window from a sample of
    this call's keys (fp32 keys, where its AVX2 scan serves; else the histogram passes)."""
    if total and all(kk.kind in _RANDOM_KINDS for kk in keys):
        p = min(max(ratio if k is None else k / total, 0.0), 1.0)
        center = hint if hint is not None else int(p * (1 << 15))
        half = int(6 * math.sqrt(total * p * (1 - p)) / total * (1 << 15)) + 2
        return max(center - half, 0), center + half
    return (hint - 1, hint + 1) if hint is not None else (SAMPLE_WINDOW, SAMPLE_WINDOW)


def hint_helps(keys: Sequence[NativeKeys]) -> bool:
    """Whether to pass the previous step's boundary as a hint: not for gradient magnitudes, which
    move their scale from step to step (a SmolLM2 tensor's boundary digit moves by tens of digits
    between steps), so that a hint mostly misses and a miss costs a scan on top of the histogram
    passes; the kernel samples fp32 magnitudes instead. Random keys (the same distribution at every
    step) and scores (gmt_momentum's EMA moves slowly) keep it."""
    return bool(keys) and not any(kk.kind in _MAGNITUDE_KINDS for kk in keys)


def apply(lib: ctypes.CDLL, flat: torch.Tensor, keys: NativeKeys, threshold: int, ties: int, record: torch.Tensor | None) -> tuple[int, int]:
    """Zero the entries below ``threshold`` and the first ``ties`` equal to it; ``(masked, ties_used)``."""
    _declare(lib)
    out = (ctypes.c_int64 * 2)()
    source = _source(flat, keys)
    lib.gmt_apply(ctypes.byref(source), threshold, ties, None if record is None else record.data_ptr(), out)
    return out[0], out[1]


def avx2_scan(lib: ctypes.CDLL) -> bool:
    """Whether the kernel scans fp32 windows with AVX2 (and so samples windows for them)."""
    lib.gmt_avx2_scan.restype = ctypes.c_int32
    return bool(lib.gmt_avx2_scan())


def usable(flats: Sequence[torch.Tensor], record: torch.Tensor | None = None) -> bool:
    """Whether every flat (and the record) lies where the kernel can read it, in a group small enough."""
    if record is not None and not (record.device.type == "cpu" and record.is_contiguous() and record.dtype == torch.bool):
        return False
    return all(f.device.type == "cpu" and f.is_contiguous() for f in flats) and sum(f.numel() for f in flats) <= MAX_GROUP


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on a Python int (mod 2**64), as :func:`gmt_plugins.keys.splitmix64`."""
    mask = 2**64 - 1
    x = (x * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def library() -> ctypes.CDLL | None:
    """The kernel when ``GMT_PLUGINS_NATIVE`` allows it and it builds (``None`` otherwise)."""
    return native.library()


def ema_f32(lib: ctypes.CDLL, ema: torch.Tensor, grad: torch.Tensor, beta: float, *, first: bool) -> None:
    """gmt_momentum's EMA update of ``ema`` in place (``first``: set it to the finite gradient), bit for
    bit what ``torch.where(isfinite(g), beta * ema + (1 - beta) * g, ema)`` gives for fp32 tensors."""
    if not (ema_usable(ema) and ema_usable(grad) and ema.numel() == grad.numel()):
        raise ValueError("ema_f32 takes contiguous CPU float32 tensors of one size")
    function = lib.gmt_ema_f32
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int32]
    function.restype = None
    function(ema.data_ptr(), grad.data_ptr(), grad.numel(), beta, 1 - beta, int(first))


def ema_usable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def count_nonfinite_f32(lib: ctypes.CDLL, flat: torch.Tensor) -> int:
    """NaN and inf entries of a contiguous CPU fp32 tensor, in one C read."""
    function = lib.gmt_count_nonfinite_f32
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    function.restype = ctypes.c_int64
    return int(function(flat.data_ptr(), flat.numel())) if flat.numel() else 0
