"""Key sources for the selection engine: gradient magnitude and a counter-based random hash."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gmt_plugins import native_rank

if TYPE_CHECKING:
    from gmt_plugins.selection import KeySource

_SIGN_CLEAR = {16: 0x7FFF, 32: 0x7FFF_FFFF, 64: 0x7FFF_FFFF_FFFF_FFFF}
_INT_VIEW = {16: torch.int16, 32: torch.int32, 64: torch.int64}
_FLOAT_VIEW = {32: torch.float32, 64: torch.float64}
# Bit patterns of +inf: every larger pattern (sign cleared) is a NaN.
_INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, 32: 0x7F80_0000, 64: 0x7FF0_0000_0000_0000}


def magnitude_key_bits(dtypes: Sequence[torch.dtype]) -> int:
    """The narrowest key width in which the magnitudes of all ``dtypes`` order exactly."""
    unique = set(dtypes)
    if torch.float64 in unique:
        return 64
    if len(unique) == 1 and unique <= {torch.float16, torch.bfloat16}:
        return 16
    unsupported = unique - {torch.float16, torch.bfloat16, torch.float32}
    if unsupported:
        raise TypeError(f"gradient dtypes {sorted(map(str, unsupported))} are not floating point")
    return 32


def count_nonzero_bits(chunk: torch.Tensor) -> torch.Tensor:
    """``count_nonzero`` of a float chunk (±0 are zero; NaN and inf are not), without branches.

    ``torch.count_nonzero`` branches per entry, and after masking the zeros lie at random
    positions: on CPU it then costs several times a plain pass. Clearing the sign bit and clamping
    the bit pattern at 1 gives 0 or 1 per entry, summed in int32 (chunks are far below 2**31).
    """
    width = chunk.element_size() * 8
    bits = chunk.view(_INT_VIEW[width]) & _SIGN_CLEAR[width]
    total_dtype = torch.int32 if chunk.numel() < 2**31 else torch.int64
    return bits.clamp_(max=1).sum(dtype=total_dtype).to(torch.int64)


_NATIVE_MAGNITUDE = {
    (torch.float32, 32): native_rank.KIND_F32,
    (torch.bfloat16, 32): native_rank.KIND_BF16_WIDE,
    (torch.bfloat16, 16): native_rank.KIND_16,
    (torch.float16, 16): native_rank.KIND_16,
}
_NATIVE_RANDOM = {2: native_rank.KIND_RANDOM_16, 4: native_rank.KIND_RANDOM_32, 8: native_rank.KIND_RANDOM_64}


class MagnitudeKeys:
    """Key = bit pattern of ``|grad|``: for non-negative IEEE floats, bit order is value order.

    Within one key width every dtype of the group is widened exactly (bf16 by a shift, fp16
    through fp32), so mixed-dtype groups compare magnitudes exactly.
    """

    def __init__(self, dtypes: Sequence[torch.dtype]) -> None:
        self.key_bits = magnitude_key_bits(dtypes)
        self._dtype16 = next(iter(dtypes)) if self.key_bits == 16 else None
        self.cap = _INF_BITS[self._dtype16] if self._dtype16 is not None else _INF_BITS[self.key_bits]

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        bits = self.key_bits
        if bits == 16:
            return (chunk.view(torch.int16) & 0x7FFF).to(torch.int32)
        if bits == 32 and chunk.dtype == torch.bfloat16:
            return (chunk.view(torch.int16).to(torch.int32) & 0x7FFF) << 16
        if chunk.dtype != _FLOAT_VIEW[bits]:
            chunk = chunk.to(_FLOAT_VIEW[bits])
        return chunk.view(_INT_VIEW[bits]) & _SIGN_CLEAR[bits]

    @property
    def has_zero_below(self) -> bool:
        """The fast path is only right for these exact keys: a subclass that overrides ``keys`` loses it."""
        return type(self).keys is MagnitudeKeys.keys

    native_keys = has_zero_below
    """The same test: only these exact keys are what the compiled histogram (:mod:`gmt_plugins.native`)
    computes itself."""

    def native_source(self, index: int, flat: torch.Tensor) -> native_rank.NativeKeys | None:
        """How the many-tensor kernel computes these keys for ``flat`` (``None``: it cannot)."""
        kind = _NATIVE_MAGNITUDE.get((flat.dtype, self.key_bits)) if self.has_zero_below else None
        return None if kind is None else native_rank.NativeKeys(kind)

    def zero_below(self, index: int, chunk: torch.Tensor, threshold: int) -> torch.Tensor:
        """Fast path of the engine: zero the entries with key ``< threshold`` and count them.

        ``hardshrink(x, lam)`` zeroes ``|x| <= lam`` and keeps NaN/inf; ``lam`` is the largest value of
        the chunk's dtype whose key is below ``threshold``, so the result is exactly ``key < threshold``.
        """
        if threshold <= 0:
            return torch.zeros((), dtype=torch.int64, device=chunk.device)
        torch.ops.aten.hardshrink.out(chunk, self._lambda(chunk.dtype, threshold), out=chunk)
        # every entry with key < threshold is now zero, and every zero had key 0 < threshold
        return chunk.numel() - count_nonzero_bits(chunk)

    def _lambda(self, dtype: torch.dtype, threshold: int) -> float:
        cache = self.__dict__.setdefault("_lambdas", {})
        if (dtype, threshold) not in cache:
            space = self._dtype16 or _FLOAT_VIEW[self.key_bits]
            exact = torch.tensor([threshold - 1], dtype=_INT_VIEW[self.key_bits]).view(space)
            lam = exact.to(dtype)
            if lam.double() > exact.double():  # rounded up on narrowing: step down one ulp
                lam = torch.nextafter(lam, torch.zeros_like(lam))
            cache[(dtype, threshold)] = float(lam.item())
        return cache[(dtype, threshold)]

    def key_to_value(self, index: int, key: int) -> float:
        if self._dtype16 is not None:
            return torch.tensor([key], dtype=torch.int16).view(self._dtype16).item()
        return torch.tensor([key], dtype=_INT_VIEW[self.key_bits]).view(_FLOAT_VIEW[self.key_bits]).item()


# splitmix64 constants, written as signed int64 so torch can hold them.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _logical_shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic), identical on CPU and CUDA."""
    x = x * _GOLDEN
    x = (x ^ _logical_shift_right(x, 30)) * _MIX1
    x = (x ^ _logical_shift_right(x, 27)) * _MIX2
    return x ^ _logical_shift_right(x, 31)


def stable_salt(*parts: object) -> int:
    """A seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    text = "\x1f".join(map(str, parts)).encode()
    return zlib.crc32(text) | (zlib.crc32(text[::-1]) << 32) & 0x7FFF_FFFF_FFFF_FFFF


class RandomKeys:
    """Uniform random 31-bit keys from a counter-based hash of ``(salt, position)``.

    The key of an entry depends only on the salt and the entry's position, not on chunking, device
    or process, so every rank with the same seed and step draws the same mask. Non-finite gradient
    entries get the excluded key ``cap`` so they are never masked.
    """

    key_bits = 32
    cap = 1 << 31

    def __init__(self, salts: Sequence[int]) -> None:
        self._salts = list(salts)

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=chunk.device)
        mixed = splitmix64(positions + splitmix64(torch.tensor(self._salts[index], device=chunk.device)))
        keys = _logical_shift_right(mixed, 33)
        return torch.where(torch.isfinite(chunk), keys, self.cap)

    def native_source(self, index: int, flat: torch.Tensor) -> native_rank.NativeKeys | None:
        """The same hash in C (``gmt_plugins/_native/histogram.c``), for the whole flat ``flat``."""
        if type(self).keys is not RandomKeys.keys or not flat.is_floating_point() or flat.element_size() not in _NATIVE_RANDOM:
            return None
        seed = native_rank.splitmix64(self._salts[index] & (2**64 - 1))
        return native_rank.NativeKeys(_NATIVE_RANDOM[flat.element_size()], seed=seed)

    def key_to_value(self, index: int, key: int) -> None:
        return None


class HashedRandomKeys(RandomKeys):
    """:class:`RandomKeys` whose keys :func:`gmt_plugins.native_rank.random_rank_group` has already
    hashed for ranking (``selection``, for the entries ``index`` of this source in its group order):
    the kernel then masks from what that read kept instead of hashing again. The keys, and so the
    masks, are those of :class:`RandomKeys` (``keys`` is inherited: the torch twin)."""

    def __init__(self, salts: Sequence[int], selection: native_rank.Preselection) -> None:
        super().__init__(salts)
        self.selection = selection

    def native_source(self, index: int, flat: torch.Tensor) -> native_rank.NativeKeys | None:
        keys = super().native_source(index, flat)
        return None if keys is None else dataclasses.replace(keys, selection=self.selection, member=index)


class ShiftedKeys:
    """Keys of a source whose keys depend on the entry's position in the *full* tensor (e.g.
    :class:`gmt_plugins.keys.RandomKeys`), read from local shards: the engine passes positions in
    the shard, this adds the shard's flat offset, so each shard draws exactly the keys the
    unsharded tensor would."""

    def __init__(self, source: KeySource, offsets: Sequence[int]) -> None:
        self.source = source
        self.offsets = list(offsets)
        self.key_bits = source.key_bits
        self.cap = source.cap

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        return self.source.keys(index, chunk, start + self.offsets[index])

    def key_to_value(self, index: int, key: int) -> float | None:
        return self.source.key_to_value(index, key)
