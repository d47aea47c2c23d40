"""Key sources: what the engine ranks. Gradient magnitude, a counter-based random hash, stored scores
and stored masks.

A key source says *what* the keys are, as plain data (a dtype, salts, score or mask tensors); it never
names a backend. :mod:`gmt_plugins.engine.dispatch` reads that data to decide whether a faster
backend computes the same keys itself; ``keys()`` is the torch definition every backend must match."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gmt_plugins.engine.types import KeySource

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
    def exact_magnitude(self) -> bool:
        """Whether the keys are exactly the magnitude bit patterns: a subclass that overrides ``keys``
        is not, and loses every fast path that computes them without calling ``keys``."""
        return type(self).keys is MagnitudeKeys.keys

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

    def salt(self, index: int) -> int:
        """The salt of tensor ``index``'s hash."""
        return self._salts[index]

    @property
    def exact_hash(self) -> bool:
        """Whether the keys are exactly this hash (a subclass that overrides ``keys`` is not)."""
        return type(self).keys is RandomKeys.keys

    def key_to_value(self, index: int, key: int) -> None:
        return None



class ShiftedKeys:
    """Keys of a source whose keys depend on the entry's position in the *full* tensor (e.g.
    :class:`gmt_plugins.engine.keys.RandomKeys`), read from local shards: the engine passes positions in
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


# Largest finite float32 bit pattern, and +inf's: scores are clamped below the latter.
FLOAT32_MAX_BITS = 0x7F7F_FFFF
SCORE_CAP = 0x7F80_0000

ScoreFn = Callable[[int, torch.Tensor, int], torch.Tensor]


class ScoreKeys:
    """Keys from a non-negative score per entry: ``score(index, chunk, start)`` returns the scores
    of the entries of ``chunk``. With ``largest=True`` the *largest* scores get the smallest keys
    (so they are selected first). Entries whose gradient is non-finite, or that ``excluded`` flags,
    get the excluded key ``cap`` and are never ranked."""

    key_bits = 32
    cap = SCORE_CAP

    def __init__(
        self,
        score: ScoreFn,
        *,
        largest: bool = False,
        excluded: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        self._score, self.largest, self.excluded = score, largest, excluded
        self.tensors: Sequence[torch.Tensor] | None = None
        """The stored score tensors, when built by :meth:`from_tensors`."""

    @classmethod
    def from_tensors(cls, scores: Sequence[torch.Tensor], **kwargs: Any) -> ScoreKeys:
        source = cls(lambda i, chunk, start: scores[i][start : start + chunk.numel()], **kwargs)
        source.tensors = scores
        return source

    @property
    def stored_smallest_first(self) -> bool:
        """Whether the keys are exactly the bit patterns of stored float32 scores, smallest first and
        nothing excluded: the form a faster backend can read straight from ``tensors``."""
        return self.tensors is not None and not self.largest and self.excluded is None and type(self).keys is ScoreKeys.keys

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        score = self._score(index, chunk, start).to(torch.float32).abs()
        # NaN scores (e.g. 0/0) rank lowest, overflow ranks highest; neither may reach the cap.
        score = torch.nan_to_num(score, nan=0.0, posinf=torch.finfo(torch.float32).max)
        bits = score.view(torch.int32)
        if self.largest:
            bits = FLOAT32_MAX_BITS - bits
        keep = torch.isfinite(chunk)
        if self.excluded is not None and self.excluded[index] is not None:
            keep &= ~self.excluded[index][start : start + chunk.numel()].to(chunk.device)
        return torch.where(keep, bits, self.cap)

    def key_to_value(self, index: int, key: int) -> float:
        bits = FLOAT32_MAX_BITS - key if self.largest else key
        return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


@dataclass(frozen=True, eq=False)
class StoredMask:
    """A strategy's stored set of *kept* (updatable) entries, as :class:`MaskKeys` reads it: ``kept``
    (flat bool, True = kept; a view of the strategy's tensor, not a copy) and, where a backend packed
    it, the masked entries 64 to a word (``bits``, 1/8 of the bytes), which that backend's stored-mask
    apply reads instead. Built by :func:`gmt_plugins.engine.dispatch.stored_mask`, which packs each set once."""

    kept: torch.Tensor
    bits: torch.Tensor | None

    def numel(self) -> int:
        return self.kept.numel()


class MaskKeys:
    """Keys for precomputed masks: per tensor a flat bool tensor (True = masked), a
    :class:`StoredMask` (its ``kept`` entries are not masked) or a bool for the whole tensor.
    ``Cut(1)`` then zeroes exactly the masked finite entries."""

    key_bits = 16
    cap = 2  # any cap is aligned for 16-bit keys

    def __init__(self, masked: Sequence[torch.Tensor | StoredMask | bool]) -> None:
        self.masked = list(masked)

    @property
    def exact_masks(self) -> bool:
        """Whether the keys are exactly those of the stored masks (a subclass may override ``keys``)."""
        return type(self).keys is MaskKeys.keys

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        masked = self.masked[index]
        if isinstance(masked, bool):
            keys = torch.full(chunk.shape, 0 if masked else 1, dtype=torch.int32, device=chunk.device)
        elif isinstance(masked, StoredMask):
            keys = masked.kept[start : start + chunk.numel()].to(chunk.device).to(torch.int32)
        else:
            keys = (~masked[start : start + chunk.numel()].to(chunk.device)).to(torch.int32)
        # Non-finite gradients get the excluded key: they stay visible to the optimizer/scaler.
        return torch.where(torch.isfinite(chunk), keys, self.cap)

    def key_to_value(self, index: int, key: int) -> None:
        return None
