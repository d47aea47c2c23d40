"""The kernel's digit histogram of magnitude keys: the per-pass ranking's histograms in one read."""

from __future__ import annotations

import ctypes

import torch

HIST_BINS = (1 << 16) + 2

# (dtype, key width) -> C function: which flats the kernel computes keys for itself, exactly as
# MagnitudeKeys.keys does. fp16 widened to 32 bits goes through fp32 in torch, so it stays there.
FUNCTIONS = {
    (torch.float32, 32): "gmt_hist_f32",
    (torch.bfloat16, 32): "gmt_hist_bf16_wide",
    (torch.bfloat16, 16): "gmt_hist_16",
    (torch.float16, 16): "gmt_hist_16",
}


def supports(flat: torch.Tensor, key_bits: int) -> bool:
    """Whether the kernel computes ``MagnitudeKeys`` keys of width ``key_bits`` for ``flat``."""
    return flat.device.type == "cpu" and flat.is_contiguous() and (flat.dtype, key_bits) in FUNCTIONS


def add_histogram(lib: ctypes.CDLL, flat: torch.Tensor, key_bits: int, base: int, shift: int, hist: torch.Tensor) -> None:
    """Add to ``hist`` (``HIST_BINS`` int64: below, 65,536 digits, above) the digit histogram of the
    magnitude keys of ``flat``: keys below ``base``, digits ``(key - base) >> shift``, keys above."""
    if not (supports(flat, key_bits) and 0 <= base < 1 << key_bits and 0 <= shift <= key_bits - 16):
        raise ValueError(f"kernel cannot histogram {flat.dtype} {flat.device} keys of {key_bits} bits at base={base} shift={shift}")
    if hist.dtype != torch.int64 or hist.numel() != HIST_BINS or not hist.is_contiguous() or hist.device.type != "cpu":
        raise ValueError(f"hist must be a contiguous CPU int64 tensor of {HIST_BINS} bins")
    if flat.numel():
        getattr(lib, FUNCTIONS[(flat.dtype, key_bits)])(flat.data_ptr(), flat.numel(), base, shift, hist.data_ptr())


