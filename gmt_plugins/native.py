"""Calls into the compiled CPU kernel from torch tensors: the per-pass digit histograms and strict
mode's copy-out and write-back of masked entries.

The kernel is built and loaded by :mod:`gmt_plugins.engine.cpu.loader` (its names are re-exported
here for the modules that import them from this one); its exported functions and their ctypes
signatures are listed in :mod:`gmt_plugins.engine.cpu.signatures`.
"""

from __future__ import annotations

import ctypes

import torch

from gmt_plugins.engine.cpu.loader import (  # noqa: F401  (re-exported for the modules that import them from here)
    BUILD_TIMEOUT_S,
    CFLAGS,
    CSRC,
    ENV,
    MODES,
    REQUIRED_SYMBOLS,
    SOURCE,
    NativeUnavailable,
    cache_dir,
    library,
    mode,
)

HIST_BINS = (1 << 16) + 2

# (dtype, key width) -> C function: which flats the kernel computes keys for itself, exactly as
# MagnitudeKeys.keys does. fp16 widened to 32 bits goes through fp32 in torch, so it stays there.
_FUNCTIONS = {
    (torch.float32, 32): "gmt_hist_f32",
    (torch.bfloat16, 32): "gmt_hist_bf16_wide",
    (torch.bfloat16, 16): "gmt_hist_16",
    (torch.float16, 16): "gmt_hist_16",
}

# element size in bytes -> (gather, scatter) of strict mode's masked entries
_MOVES = {2: ("gmt_gather_masked_16", "gmt_scatter_masked_16"), 4: ("gmt_gather_masked_32", "gmt_scatter_masked_32"),
          8: ("gmt_gather_masked_64", "gmt_scatter_masked_64")}


def supports(flat: torch.Tensor, key_bits: int) -> bool:
    """Whether the kernel computes ``MagnitudeKeys`` keys of width ``key_bits`` for ``flat``."""
    return flat.device.type == "cpu" and flat.is_contiguous() and (flat.dtype, key_bits) in _FUNCTIONS


def add_histogram(lib: ctypes.CDLL, flat: torch.Tensor, key_bits: int, base: int, shift: int, hist: torch.Tensor) -> None:
    """Add to ``hist`` (``HIST_BINS`` int64: below, 65,536 digits, above) the digit histogram of the
    magnitude keys of ``flat``: keys below ``base``, digits ``(key - base) >> shift``, keys above."""
    if not (supports(flat, key_bits) and 0 <= base < 1 << key_bits and 0 <= shift <= key_bits - 16):
        raise ValueError(f"kernel cannot histogram {flat.dtype} {flat.device} keys of {key_bits} bits at base={base} shift={shift}")
    if hist.dtype != torch.int64 or hist.numel() != HIST_BINS or not hist.is_contiguous() or hist.device.type != "cpu":
        raise ValueError(f"hist must be a contiguous CPU int64 tensor of {HIST_BINS} bins")
    if flat.numel():
        getattr(lib, _FUNCTIONS[(flat.dtype, key_bits)])(flat.data_ptr(), flat.numel(), base, shift, hist.data_ptr())


def supports_moves(flat: torch.Tensor) -> bool:
    """Whether :func:`gather_masked` and :func:`scatter_masked` take ``flat``."""
    return flat.device.type == "cpu" and flat.is_contiguous() and flat.element_size() in _MOVES


def gather_masked(lib: ctypes.CDLL, flat: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``flat[mask]`` for a flat bool ``mask`` with ``count`` true entries, as a tensor of ``count + 1``
    slots (the last is scratch for :func:`scatter_masked`)."""
    _check_moves(flat, mask)
    out = torch.empty(count + 1, dtype=flat.dtype)
    found = getattr(lib, _MOVES[flat.element_size()][0])(mask.data_ptr(), flat.data_ptr(), out.data_ptr(), flat.numel(), count)
    if found != count:
        raise RuntimeError(f"mask holds {found} entries, expected {count}")
    return out


def scatter_masked(lib: ctypes.CDLL, flat: torch.Tensor, mask: torch.Tensor, saved: torch.Tensor) -> None:
    """``flat[mask] = saved[:-1]`` for the output of :func:`gather_masked` on the same mask."""
    _check_moves(flat, mask)
    if saved.dtype != flat.dtype or not saved.is_contiguous() or saved.numel() < 1:
        raise ValueError("saved must be gather_masked's output for this tensor")
    found = getattr(lib, _MOVES[flat.element_size()][1])(mask.data_ptr(), flat.data_ptr(), saved.data_ptr(), flat.numel(), saved.numel() - 1)
    if found != saved.numel() - 1:
        raise RuntimeError(f"mask holds {found} entries, {saved.numel() - 1} were saved")


def _check_moves(flat: torch.Tensor, mask: torch.Tensor) -> None:
    if not supports_moves(flat):
        raise ValueError(f"kernel cannot move entries of a {flat.dtype} {flat.device} tensor (contiguous={flat.is_contiguous()})")
    if mask.dtype != torch.bool or mask.numel() != flat.numel() or not mask.is_contiguous() or mask.device.type != "cpu":
        raise ValueError("mask must be a contiguous CPU bool tensor shaped like the flat tensor")
