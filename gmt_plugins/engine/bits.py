"""Packed bit sets of flat bool masks: packing, unpacking and counting, on any device."""

from __future__ import annotations

import sys

import torch

_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_POPCOUNT: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return _WEIGHTS[device]


def _popcount_table(device: torch.device) -> torch.Tensor:
    if device not in _POPCOUNT:
        table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
        _POPCOUNT[device] = table.to(device)
    return _POPCOUNT[device]


# Byte j of a little-endian word lands on bit 56 + j: 0x01 bytes never carry into each other.
_GATHER = 0x0102040810204080
_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor of ``n`` entries as ``ceil(n / 8)`` bytes: entry ``i`` is bit ``i % 8`` of
    byte ``i // 8``; the bits past ``n`` are 0.

    Eight bools are one 64-bit word; one multiply gathers their low bits into the top byte (little-endian
    layouts; elsewhere, and as the reference twin, :func:`pack_bits_reference`).
    """
    n = mask.numel()
    if n % 8:
        mask = torch.cat([mask, mask.new_zeros((-n) % 8)])
    if sys.byteorder != "little":
        return pack_bits_reference(mask)
    words = mask.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)  # the top byte: the shift's sign bits fall away


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` by weighted sums of bytes."""
    n = mask.numel()
    if n % 8:
        mask = torch.cat([mask, mask.new_zeros((-n) % 8)])
    return (mask.view(-1, 8).to(torch.uint8) * _weights(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: a flat bool tensor of ``n`` entries."""
    return ((packed.unsqueeze(1) & _weights(packed.device)) != 0).view(-1)[:n]


def popcount(packed: torch.Tensor) -> int:
    """Set bits of a uint8 tensor: bit-parallel counts on 64-bit words (the bytes padded to a multiple of 8)."""
    n = packed.numel()
    if not n:
        return 0
    if n % 8:
        packed = torch.cat([packed, packed.new_zeros((-n) % 8)])
    x = packed.contiguous().view(torch.int64)
    x = x - ((x >> 1) & _M1)  # arithmetic shifts: the masks clear the sign bits they bring in
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return int((((x * _H01) >> 56) & 0xFF).sum().item())


def popcount_reference(packed: torch.Tensor) -> int:
    """:func:`popcount` by a table of the 256 byte values."""
    return int(_popcount_table(packed.device)[packed.long()].sum().item()) if packed.numel() else 0


def all_set(numel: int, device: torch.device) -> torch.Tensor:
    """Packed bits with the first ``numel`` set and the padding clear."""
    packed = torch.full(((numel + 7) // 8,), 255, dtype=torch.uint8, device=device)
    if numel % 8:
        packed[-1] = (1 << (numel % 8)) - 1
    return packed
