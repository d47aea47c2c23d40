"""Strict mode's copy-out and write-back of masked parameter entries, one branch-free pass each."""

from __future__ import annotations

import ctypes

import torch

# element size in bytes -> (gather, scatter) of strict mode's masked entries
MOVES = {2: ("gmt_gather_masked_16", "gmt_scatter_masked_16"), 4: ("gmt_gather_masked_32", "gmt_scatter_masked_32"),
         8: ("gmt_gather_masked_64", "gmt_scatter_masked_64")}


def supports_moves(flat: torch.Tensor) -> bool:
    """Whether :func:`gather_masked` and :func:`scatter_masked` take ``flat``."""
    return flat.device.type == "cpu" and flat.is_contiguous() and flat.element_size() in MOVES


def gather_masked(lib: ctypes.CDLL, flat: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``flat[mask]`` for a flat bool ``mask`` with ``count`` true entries, as a tensor of ``count + 1``
    slots (the last is scratch for :func:`scatter_masked`)."""
    _check_moves(flat, mask)
    out = torch.empty(count + 1, dtype=flat.dtype)
    found = getattr(lib, MOVES[flat.element_size()][0])(mask.data_ptr(), flat.data_ptr(), out.data_ptr(), flat.numel(), count)
    if found != count:
        raise RuntimeError(f"mask holds {found} entries, expected {count}")
    return out


def scatter_masked(lib: ctypes.CDLL, flat: torch.Tensor, mask: torch.Tensor, saved: torch.Tensor) -> None:
    """``flat[mask] = saved[:-1]`` for the output of :func:`gather_masked` on the same mask."""
    _check_moves(flat, mask)
    if saved.dtype != flat.dtype or not saved.is_contiguous() or saved.numel() < 1:
        raise ValueError("saved must be gather_masked's output for this tensor")
    found = getattr(lib, MOVES[flat.element_size()][1])(mask.data_ptr(), flat.data_ptr(), saved.data_ptr(), flat.numel(), saved.numel() - 1)
    if found != saved.numel() - 1:
        raise RuntimeError(f"mask holds {found} entries, {saved.numel() - 1} were saved")


def _check_moves(flat: torch.Tensor, mask: torch.Tensor) -> None:
    if not supports_moves(flat):
        raise ValueError(f"kernel cannot move entries of a {flat.dtype} {flat.device} tensor (contiguous={flat.is_contiguous()})")
    if mask.dtype != torch.bool or mask.numel() != flat.numel() or not mask.is_contiguous() or mask.device.type != "cpu":
        raise ValueError("mask must be a contiguous CPU bool tensor shaped like the flat tensor")
