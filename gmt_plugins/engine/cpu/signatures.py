"""Every function the compiled CPU kernel exports, with its ``ctypes`` signature.

One table, :data:`SIGNATURES`, for the C prototypes in ``gmt_plugins/engine/csrc``: the loader
(:mod:`gmt_plugins.engine.cpu.loader`) declares each function from it once, when the library is
loaded, and refuses a library missing one of them (:data:`REQUIRED_SYMBOLS`). A test compares the
table with the prototypes the C preprocessor sees, type by type.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple


class Source(ctypes.Structure):
    """One member of a group: ``source_t`` in ``csrc/gmt.h``."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("s", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("start", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
        ("kind", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    ]


SOURCE_FP16 = 1
"""``Source.flags``: the 16-bit values are fp16, not bf16 (``KIND_16``, ``KIND_RANDOM_16``)."""
SOURCE_KEPT = 2
"""``Source.flags``: a ``KIND_MASK`` source's bytes flag the kept entries, not the masked ones."""


class Id3Source(ctypes.Structure):
    """One tensor of id3's growth step: ``id3_source_t`` in ``csrc/id3_grow.c``."""

    _fields_ = [
        ("g", ctypes.c_void_p),
        ("theta", ctypes.c_void_p),
        ("updatable", ctypes.c_void_p),
        ("masked", ctypes.c_void_p),
        ("n", ctypes.c_int64),
    ]


class Signature(NamedTuple):
    argtypes: tuple[type, ...]
    restype: type | None


_p, _i32, _i64, _u32, _u64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64
_f32, _f64 = ctypes.c_float, ctypes.c_double
_src, _id3 = ctypes.POINTER(Source), ctypes.POINTER(Id3Source)

_HIST = Signature((_p, _i64, _u32, _u32, _p), None)  # x, n, base, shift, hist
_MOVE = Signature((_p, _p, _p, _i64, _i64), _i64)  # mask, x, out/saved, n, limit -> entries found

SIGNATURES: dict[str, Signature] = {
    # digit_histogram.c: per-pass digit histograms of magnitude keys
    "gmt_hist_f32": _HIST,
    "gmt_hist_bf16_wide": _HIST,
    "gmt_hist_16": _HIST,
    # masked_moves.c: strict mode's copy-out and write-back, by element size
    "gmt_gather_masked_16": _MOVE,
    "gmt_scatter_masked_16": _MOVE,
    "gmt_gather_masked_32": _MOVE,
    "gmt_scatter_masked_32": _MOVE,
    "gmt_gather_masked_64": _MOVE,
    "gmt_scatter_masked_64": _MOVE,
    # cpu_features.c
    "gmt_avx2_scan": Signature((), _i32),
    # rank_group.c: src, count, key_bits, cap, ratio, k, wlo, whi, hist, cand, cand_cap, nonfinite, out
    "gmt_rank_group": Signature((_src, _i64, _u32, _u32, _f64, _i64, _i64, _i64, _p, _p, _i64, _p, _p), None),
    # apply.c: src, threshold, ties, record, out
    "gmt_apply": Signature((_src, _u64, _i64, _p, _p), None),
    # src, threshold, ties, record, out, energy (2 doubles, added to: g^2 before and after masking)
    "gmt_apply_energy": Signature((_src, _u64, _i64, _p, _p, _p), None),
    # energy.c: x, n, value kind (fp32, bf16, fp16, fp64) -> the sum of g^2 over the finite entries
    "gmt_square_sum": Signature((_p, _i64, _i32), _f64),
    # finite_f32.c
    "gmt_ema_f32": Signature((_p, _p, _i64, _f32, _f32, _i32), None),  # ema, g, n, a, b, first
    "gmt_count_nonfinite_f32": Signature((_p, _i64), _i64),
    "gmt_accumulate_finite_f32": Signature((_p, _p, _i64, _i32, _i32), None),  # acc, g, n, first, square
    "gmt_score_keys_f32": Signature((_p, _p, _i64, _i32, _p), None),  # s, excluded, n, largest, out
    # random_rank.c: src, count, ratio, k, lo, width, bits, word_offsets, cand_key, cand_pos, cand_start,
    # cand_cap, hist, nonfinite, out
    "gmt_random_rank": Signature((_src, _i64, _f64, _i64, _u32, _u32, _p, _p, _p, _p, _p, _i64, _p, _p, _p), _i32),
    # s, bits, cand_key, cand_pos, nc, threshold, ties, record, out, energy (or NULL)
    "gmt_apply_preselected": Signature((_src, _p, _p, _p, _i64, _u32, _i64, _p, _p, _p), None),
    # ema_rank.c: src, count, a, b, first, ratio, k, sample_shift, hist, bits, word_offsets, cand_key,
    # cand_pos, cand_start, cand_cap, nonfinite, out
    "gmt_ema_rank": Signature((_src, _i64, _f32, _f32, _p, _f64, _i64, _u32, _p, _p, _p, _p, _p, _p, _i64, _p, _p), _i32),
    # src, a, b, first, group_end, ngroups, ratio, k, sample_from, sample_shift, hist, bits, word_offsets,
    # cand_key, cand_pos, cand_lo, cand_hi, cand_cap, nonfinite, out
    "gmt_ema_rank_groups": Signature(
        (_src, _f32, _f32, _p, _p, _i64, _f64, _i64, _i64, _u32, _p, _p, _p, _p, _p, _p, _p, _i64, _p, _p), None
    ),
    # id3_grow.c: src, count, eps, kind, k, wlo, whi, hist, list, list_cap, cand_key, cand_pos, cand_cap,
    # nonfinite, marked, out
    "gmt_id3_grow": Signature((_id3, _i64, _f32, _i32, _i64, _i64, _i64, _p, _p, _i64, _p, _p, _i64, _p, _p, _p), None),
    # coverage.c: mask, n, updated, previous, first, out
    "gmt_coverage_observe": Signature((_p, _i64, _p, _p, _i32, _p), None),
    # src, threshold, ties, updated, previous, first, out, energy (or NULL) -> 1 when served
    "gmt_apply_tracked": Signature((_src, _u64, _i64, _p, _p, _i32, _p, _p), _i32),
    # mask_bits.c
    "gmt_pack_mask_bits": Signature((_p, _i64, _i32, _p), None),  # mask, n, invert, bits
    "gmt_apply_mask_bits": Signature((_p, _p, _i64, _p, _p, _p), None),  # y, bits, n, record, out, energy (or NULL)
}

REQUIRED_SYMBOLS: tuple[str, ...] = tuple(sorted(SIGNATURES))
"""Every exported function: a library missing one is a load failure, not an AttributeError mid-step."""


def declare(library: ctypes.CDLL) -> None:
    """Set every exported function's ``argtypes`` and ``restype`` on ``library``."""
    for name, signature in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = list(signature.argtypes)
        function.restype = signature.restype
