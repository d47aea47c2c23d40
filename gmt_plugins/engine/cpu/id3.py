"""id3's growth step in one call of the C kernel (``gmt_id3_grow``).

At each growth step id3 adds to its updatable set the ``k`` still-masked entries with the largest
``|grad| / (eps + |theta|) ** exponent`` over all tensors. Its torch path (``ScoreKeys`` chunks,
``rank``, ``mark`` and bool algebra in :func:`gmt_plugins.engine.reference.id3_grow`) is the reference
twin; the kernel computes the same float32 scores and keys bit for bit, ranks them and writes the
chosen entries straight into the strategy's two byte masks (``updatable`` and its negation
``masked``, which the engine's stored-mask apply reads), returning per tensor how many it added and
how many gradients were not finite.

Warm start: ``k`` is a small slice of the entries (the budget spread over ``steps_to_budget``
steps), so the boundary key sits far in the tail and moves little from step to step. Given the
previous step's boundary top digit, the kernel reads every tensor once, counting the keys below a
window around it (keeping their positions) and keeping the keys inside it; when the ``k``-th key
falls inside, that read is the whole step. Otherwise it runs the radix passes and a marking pass.
The hint changes the time, never the result.

Only exponents whose torch ``pow`` the kernel reproduces exactly are served (0, 1, 2, 3: a constant,
the value, ``d*d``, ``(d*d)*d``; torch's ``pow(d, 0.5)`` is not always the correctly rounded
``sqrtf(d)``, so 1/2 is not); others, and anything but contiguous CPU float32 gradients and
parameters, take the torch path.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gmt_plugins.engine.cpu.signatures import Id3Source

# exponent -> the kernel's denominator kind (ID3_DISPATCH in the C sources)
EXPONENT_KINDS = {0.0: 0, 1.0: 1, 2.0: 2, 3.0: 3}
TABLES = 4
BINS = 1 << 16
MAX_GROUP = (1 << 32) - 1  # counts are uint32 per table
# positions kept below the warm window (64 MiB), and keys and positions inside it (192 MiB) at most:
# more falls back to the passes
MAX_LIST = 1 << 23
MAX_CANDIDATES = 1 << 24
# half-width, in top digits, of the warm window at least (a top digit spans 2**-7 of the score), and
# its reach above the boundary when only one step is known
WINDOW_MIN, WINDOW_FIRST = 6, 64



@dataclass
class GrowResult:
    """What one growth step did: per tensor the entries made updatable and the non-finite
    gradients; the threshold key and ties of the cut (``None`` when nothing was chosen), the
    rankable count, the boundary top digit (the next step's hint), whether the warm read sufficed
    and, if so, how many keys it found below its window and inside it."""

    marked: list[int]
    nonfinite: list[int]
    threshold: int | None
    ties: int
    rankable: int
    boundary: int | None
    warm: bool
    below: int = 0
    candidates: int = 0


_scratch = threading.local()




def exponent_kind(exponent: float) -> int | None:
    """The kernel's denominator kind for ``exponent``, or ``None`` when only torch computes it exactly."""
    return EXPONENT_KINDS.get(float(exponent))


def usable(grads: Sequence[torch.Tensor], thetas: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel can read every flat gradient and parameter (contiguous CPU float32) and write
    every mask (contiguous CPU bool), in a group small enough for its counters."""
    if sum(g.numel() for g in grads) > MAX_GROUP:
        return False
    floats = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (*grads, *thetas))
    bools = all(m.device.type == "cpu" and m.dtype == torch.bool and m.is_contiguous() for m in masks)
    return floats and bools and all(t.numel() == g.numel() for t, g in zip(thetas, grads))


def window(boundaries: Sequence[int]) -> tuple[int, int]:
    """The top digits the warm read keeps, from the last boundaries (oldest first); ``(-1, -2)`` for none.

    The boundary key rises as the score threshold falls (the best entries leave the pool, step by
    step), by a step that changes slowly: the window is centred on the last boundary moved by the
    last step, half as wide as that step on either side (``WINDOW_MIN`` at least). After one step
    the motion is unknown: the window then reaches ``WINDOW_FIRST`` digits above the boundary.
    Every key inside costs a copy, so the window is no wider than the motion needs.
    """
    if not boundaries:
        return -1, -2
    last = boundaries[-1]
    if len(boundaries) == 1:
        return max(last - WINDOW_MIN, 0), last + WINDOW_FIRST
    moved = last - boundaries[-2]
    half = max(WINDOW_MIN, abs(moved) // 2)
    return max(last + moved - half, 0), last + moved + half


def grow(
    lib: ctypes.CDLL,
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    updatable: Sequence[torch.Tensor],
    masked: Sequence[torch.Tensor],
    *,
    eps: float,
    exponent: float,
    k: int,
    boundaries: Sequence[int] = (),
) -> GrowResult:
    """Make the ``k`` best still-masked entries updatable, in place in ``updatable`` (True) and
    ``masked`` (False); flats of one size per tensor, ``masked == ~updatable`` on entry.
    ``boundaries``: the boundary digits of the previous steps, oldest first (see :func:`window`)."""
    kind = exponent_kind(exponent)
    if kind is None:
        raise ValueError(f"exponent must be one of {sorted(EXPONENT_KINDS)} for the id3 kernel, got {exponent!r}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not usable(grads, thetas, [*updatable, *masked]) or not all(
        u.numel() == g.numel() and m.numel() == g.numel() for g, u, m in zip(grads, updatable, masked)
    ):
        raise ValueError("grow takes contiguous CPU float32 gradients and parameters and bool masks, one size per tensor")
    count = len(grads)
    sources = (Id3Source * max(count, 1))(
        *[Id3Source(g.data_ptr(), t.data_ptr(), u.data_ptr(), m.data_ptr(), g.numel()) for g, t, u, m in zip(grads, thetas, updatable, masked)]
    )
    total = sum(g.numel() for g in grads)
    wlo, whi = window(boundaries)
    warm = wlo <= whi
    list_cap = min(k, MAX_LIST) if warm else 0
    cand_cap = min(total, BINS + 2 * k, MAX_CANDIDATES) if warm else 0
    positions, cand_keys, cand_positions = _buffers(list_cap, cand_cap)
    nonfinite = (ctypes.c_int64 * max(count, 1))()
    marked = (ctypes.c_int64 * max(count, 1))()
    out = (ctypes.c_int64 * 7)()
    lib.gmt_id3_grow(
        sources, count, eps, kind, k, wlo, whi, _hist().data_ptr(), positions.data_ptr(), list_cap,
        cand_keys.data_ptr(), cand_positions.data_ptr(), cand_cap, nonfinite, marked, out,
    )
    threshold, ties, rankable, boundary, path, below, candidates = out
    return GrowResult(
        marked=marked[:count],
        nonfinite=nonfinite[:count],
        threshold=None if threshold < 0 else threshold,
        ties=ties,
        rankable=rankable,
        boundary=None if boundary < 0 else boundary,
        warm=path == 1,
        below=below,
        candidates=candidates,
    )


def _buffers(list_cap: int, cand_cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This thread's position and candidate buffers, kept from step to step: fresh ones would cost a
    page fault per 4 KiB written, every step."""
    held = getattr(_scratch, "buffers", None)
    if held is None or held[0].numel() < list_cap or held[1].numel() < cand_cap:
        list_size = max(list_cap, 1 if held is None else held[0].numel())
        cand_size = max(cand_cap, 1 if held is None else held[1].numel())
        held = _scratch.buffers = (
            torch.empty(list_size, dtype=torch.int64), torch.empty(cand_size, dtype=torch.int32), torch.empty(cand_size, dtype=torch.int64),
        )
    return held


def _hist() -> torch.Tensor:
    """This thread's zeroed histogram tables (the kernel gives them back zeroed)."""
    hist = getattr(_scratch, "hist", None)
    if hist is None:
        hist = _scratch.hist = torch.zeros(TABLES * BINS, dtype=torch.int32)
    return hist

