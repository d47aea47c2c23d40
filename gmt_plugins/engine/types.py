"""What every backend of the engine shares: key sources, cuts, rankings and the counts of an apply."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

DIGIT_BITS = 16
NUM_BINS = 1 << DIGIT_BITS
DEFAULT_CHUNK_NUMEL = 1 << 18

TORCH, CPU, CUDA = "torch", "cpu", "cuda"
"""The backends: the torch reference, the compiled CPU kernel, the CUDA device path."""


class KeySource(Protocol):
    """Maps gradient chunks to integer keys; smaller keys are masked first."""

    key_bits: int
    """Width of the key space: 16, 32 or 64."""

    cap: int
    """Keys ``>= cap`` are excluded (non-finite gradients). A multiple of ``2 ** (key_bits - 16)``."""

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        """Keys (int32 or int64, ``>= 0``) of the flat gradient ``chunk`` of tensor ``index``,
        whose first entry sits at flat offset ``start`` of that tensor."""
        ...

    def key_to_value(self, index: int, key: int) -> float | None:
        """The threshold as a number a person can read (``|grad|`` for GMT), or ``None``."""
        ...


@dataclass(frozen=True)
class Cut:
    """Zero the entries whose key is ``< threshold``, then up to ``ties`` entries whose key equals it.

    ``threshold=None`` means "mask nothing".
    """

    threshold: int | None
    ties: int = 0


@dataclass
class Ranked:
    """What the first histogram pass learned about a group of tensors."""

    rankable: int
    nonfinite: list[int]


@dataclass
class Ranking:
    """A group's cut, with the backend that found it and that backend's private state.

    The apply follows ``backend``: a ranking made by the CPU kernel may carry what its read kept
    (``state``: the keys below and inside its window), which the apply reads instead of the keys;
    one made on a CUDA device carries the step's cuts, still on the device. Other backends never
    look inside ``state``. Two rankings are equal when they select the same entries, whichever
    backend made them.
    """

    cut: Cut
    rankable: int
    nonfinite: list[int]
    backend: str = field(default=TORCH, compare=False)
    state: Any = field(default=None, repr=False, compare=False)
    boundary: int | None = field(default=None, compare=False)
    """The kernel's boundary bin (a speed hint for the group's next ranking)."""

    def __iter__(self):  # type: ignore[no-untyped-def] # unpacks as (cut, counts), as the reference's rank returns
        return iter((self.cut, Ranked(self.rankable, self.nonfinite)))


class Applied(NamedTuple):
    """What an apply did to one flat."""

    masked: int
    ties_used: int
    masked_nonzero: int
    """Masked entries whose gradient was nonzero (masked entries are always finite)."""


@dataclass
class Energy:
    """The sums of ``g ** 2`` (float64) over the finite entries of the gradients an apply was given
    (``energy=``): ``total`` before masking, ``kept`` after it; each apply adds to them. NaN and inf
    count as 0. The backends add the squares in different orders, so their sums agree to well within
    1e-12 relative, not bit for bit; each gives the same sums at every run."""

    total: float = 0.0
    kept: float = 0.0

    def add(self, total: float, kept: float) -> None:
        self.total += float(total)
        self.kept += float(kept)


def iter_chunks(flat: torch.Tensor, chunk_numel: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, flat.numel(), chunk_numel):
        yield start, flat[start : start + chunk_numel]
