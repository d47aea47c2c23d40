"""The one place that decides which backend serves an engine operation.

Every operation the strategies and the masker need is a function here. Each tries the backends in
one order, the fastest first, and falls back to the next when one declines:

1. the CUDA device path (:mod:`gmt_plugins.engine.cuda`): a whole step of ``gmt`` on one CUDA device,
   ranked and applied without host synchronisation (``DEVICE_MODE``);
2. the compiled CPU kernel (:mod:`gmt_plugins.engine.cpu`): contiguous CPU tensors whose keys it
   computes itself, when ``GMT_PLUGINS_NATIVE`` allows it and it builds;
3. the torch reference (:mod:`gmt_plugins.engine.reference`): any tensor on any device, and the twin
   every other backend is tested against.

A backend declines a call it cannot serve exactly (a device, a dtype, a key source it does not
compute, a window miss, an active reducer of sharded histograms): the result is the same whichever
backend serves, only the time differs. A ranking remembers the backend that made it
(:class:`~gmt_plugins.engine.types.Ranking`), and its apply follows it without deciding again.
Nothing outside this module reads ``GMT_PLUGINS_NATIVE`` or ``DEVICE_MODE``, or calls the loader.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gmt_plugins.distributed import ShardReducer, active_reducer
from gmt_plugins.engine import cuda, reference
from gmt_plugins.engine.cpu import histogram as cpu_histogram
from gmt_plugins.engine.cpu import id3 as cpu_id3
from gmt_plugins.engine.cpu import loader
from gmt_plugins.engine.cpu import moves as cpu_moves
from gmt_plugins.engine.cpu import rank as cpu
from gmt_plugins.engine.keys import MagnitudeKeys, ScoreKeys, StoredMask
from gmt_plugins.engine.types import CPU, CUDA, DEFAULT_CHUNK_NUMEL, TORCH, Applied, Cut, Energy, KeySource, Ranking

DEVICE_MODES = ("auto", "always", "never")
DEVICE_MODE = "auto"
"""When the CUDA device path serves ``gmt``: ``"auto"``, whole gradients that all sit on one CUDA device;
``"always"``, CPU tensors too (tests and benchmarks); ``"never"``, never."""


# --- the choice ------------------------------------------------------------------------------


ENV = "GMT_PLUGINS_NATIVE"
NATIVE_MODES = ("auto", "0", "1")


def native_mode() -> str:
    """``GMT_PLUGINS_NATIVE``: ``auto`` (the kernel where it builds), ``0`` (never) or ``1`` (required)."""
    value = os.environ.get(ENV, "auto")
    if value in NATIVE_MODES:  # the hot path: several calls per tensor per step
        return value
    value = value.strip().lower() or "auto"
    if value not in NATIVE_MODES:
        raise ValueError(f"{ENV}={value!r} is not valid; allowed values: {', '.join(NATIVE_MODES)}")
    return value


def kernel() -> ctypes.CDLL | None:
    """The loaded CPU kernel, or ``None`` when ``GMT_PLUGINS_NATIVE`` or the machine rules it out
    (``GMT_PLUGINS_NATIVE=1``: :class:`~gmt_plugins.engine.cpu.loader.NativeUnavailable` instead)."""
    chosen = native_mode()
    if chosen == "0":
        return None
    return loader.library(required=chosen == "1")


def serves_on_device(flats: Sequence[torch.Tensor], sources: Sequence[KeySource], *, ratio: float | None, reducer: ShardReducer | None) -> bool:
    """Whether the CUDA device path ranks this step: whole gradients on one device, exact magnitude
    keys, a ratio (not a count), no reducer, and ``DEVICE_MODE`` allowing that device."""
    if DEVICE_MODE not in DEVICE_MODES:
        raise ValueError(f"gmt_plugins.engine.dispatch.DEVICE_MODE must be one of {DEVICE_MODES}, got {DEVICE_MODE!r}")
    if DEVICE_MODE == "never" or not flats or ratio is None or reducer is not None:
        return False
    devices = {f.device for f in flats}
    if len(devices) != 1 or not all(cuda.exact_magnitude_keys(s) for s in sources):
        return False
    return DEVICE_MODE == "always" or next(iter(devices)).type == "cuda"


def _described(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]]) -> list[cpu.NativeKeys] | None:
    """Every flat's keys as the kernel computes them, or ``None`` when it cannot serve them all."""
    if not flats or not cpu.usable([flat for _, flat in flats]):
        return None
    keys = [cpu.describe(source, index, flat) for index, flat in flats]
    return None if any(k is None for k in keys) else keys


@dataclass
class CpuState:
    """A CPU ranking's private state: every member's keys as the kernel computes them and, when the
    ranking read kept them, the keys below and inside its window (:class:`~gmt_plugins.engine.cpu.rank.Preselection`)."""

    keys: list[cpu.NativeKeys]
    selection: cpu.Preselection | None = None


# --- ranking ---------------------------------------------------------------------------------


def rank(
    source: KeySource,
    flats: Sequence[tuple[int, torch.Tensor]],
    ratio: float | None = None,
    *,
    k: int | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    reducer: ShardReducer | None = None,
    warm: dict[str, int] | None = None,
    group: str = "",
) -> Ranking:
    """The cut masking ``k`` entries (default ``floor(ratio * rankable)``) over all of ``flats``
    (``(index, flat)`` pairs: one for the tensor scope, all for the global scope), ties in order.

    ``reducer`` (default: :func:`gmt_plugins.distributed.active_reducer`) sums the histograms of
    shards over the processes (only the reference serves it). ``warm[group]`` holds the kernel's last
    boundary bin of this group, a hint that changes nothing but the time.
    """
    if (ratio is None) == (k is None):
        raise TypeError("rank() takes exactly one of ratio and k")
    if reducer is None:
        reducer = active_reducer()
    if not flats:
        return Ranking(Cut(None), 0, [], TORCH)
    if reducer is None:
        ranked = _rank_on_cpu(source, flats, ratio, k, warm, group)
        if ranked is not None:
            return ranked
    cut, counts = reference.rank(
        source, flats, ratio, k=k, chunk_numel=chunk_numel, reducer=reducer, kernel=histogram_kernel(source, flats)
    )
    return Ranking(cut, counts.rankable, counts.nonfinite, TORCH)


def _rank_on_cpu(
    source: KeySource, flats: Sequence[tuple[int, torch.Tensor]], ratio: float | None, k: int | None,
    warm: dict[str, int] | None, group: str,
) -> Ranking | None:
    keys = _described(source, flats)
    lib = kernel() if keys is not None else None
    if lib is None:
        return None
    tensors = [flat for _, flat in flats]
    if all(kk.kind in cpu._RANDOM_KINDS for kk in keys):  # noqa: SLF001 - the backend's own kinds
        hashed = cpu.random_rank_group(lib, tensors, keys, ratio=ratio, k=k)
        if hashed is not None:  # else the k-th key fell outside the expected window: the group ranking serves
            result, selection = hashed
            return _cpu_ranking(result, CpuState(keys, selection))
    hint = warm.get(group) if warm is not None and cpu.hint_helps(keys) else None
    result = cpu.rank_group(lib, tensors, keys, key_bits=source.key_bits, cap=source.cap, ratio=ratio, k=k, hint=hint)
    if warm is not None and result.boundary is not None:
        warm[group] = result.boundary
    return _cpu_ranking(result, CpuState(keys))


def _cpu_ranking(result: cpu.GroupResult, state: CpuState) -> Ranking:
    cut = Cut(result.threshold, result.ties if result.threshold is not None else 0)
    return Ranking(cut, result.rankable, list(result.nonfinite), CPU, state, result.boundary)


def histogram_kernel(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]]) -> reference.KernelHistogram | None:
    """The kernel's histogram for the reference passes, for exact magnitude keys of the CPU flats it reads."""
    if not (isinstance(source, MagnitudeKeys) and source.exact_magnitude):
        return None
    if not any(cpu_histogram.supports(flat, source.key_bits) for _, flat in flats):
        return None  # CUDA-only groups never build the kernel nor warn about it
    lib = kernel()
    if lib is None:
        return None

    def add(flat: torch.Tensor, base: int, shift: int, hist: torch.Tensor) -> bool:
        if not cpu_histogram.supports(flat, source.key_bits):
            return False
        cpu_histogram.add_histogram(lib, flat, source.key_bits, base, shift, hist)
        return True

    return add


Group = tuple[KeySource, Sequence[tuple[int, torch.Tensor]]]


def rank_step(
    groups: Sequence[Group],
    ratio: float | None = None,
    *,
    ks: Sequence[int] | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    warm: dict[str, int] | None = None,
    names: Sequence[str] | None = None,
    defer: bool = False,
) -> list[Ranking | Callable[[], Ranking]]:
    """Rank every group of one step (one group per tensor for the tensor scope, one for the global scope).

    On a CUDA device the device path ranks the whole step at once and nothing is read back. Elsewhere
    each group is ranked by :func:`rank`; with ``defer`` (one-tensor groups only) the ranking is left to a
    callable the masker calls when it reaches the group's tensor, so that the apply reads a gradient the ranking has just
    left in cache (allowed only when no collective and no state restore depends on the order).
    """
    reducer = active_reducer()
    if defer and any(len(members) != 1 for _, members in groups):
        raise ValueError("rank_step defers only one-tensor groups (the tensor scope)")
    flats = [flat for _, members in groups for _, flat in members]
    sources = [source for source, members in groups for _ in members]
    if ks is None and serves_on_device(flats, sources, ratio=ratio, reducer=reducer):
        shared = len(groups) == 1 and len(groups[0][1]) > 1
        device_sources = [source for source, _ in groups] * len(flats) if shared else sources
        pending = cuda.rank_on_device(device_sources, flats, ratio, shared=shared, chunk_numel=chunk_numel)
        if shared:
            return [cuda.DeviceRanking(pending, 0)]
        return [cuda.DeviceRanking(pending, i) for i in range(len(flats))]
    out: list[Ranking | Callable[[], Ranking]] = []
    for g, (source, members) in enumerate(groups):
        name = names[g] if names is not None else ""

        def ranked(source: KeySource = source, members: Sequence[tuple[int, torch.Tensor]] = members, g: int = g, name: str = name) -> Ranking:
            if ks is not None:
                return rank(source, members, k=ks[g], chunk_numel=chunk_numel, reducer=reducer)
            return rank(source, members, ratio, chunk_numel=chunk_numel, reducer=reducer, warm=warm, group=name)

        out.append(ranked if defer and reducer is None else ranked())
    return out


def ema_rank_step(
    grads: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    first: Sequence[bool],
    group_sizes: Sequence[int],
    *,
    beta: float,
    ratio: float,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    defer: bool = False,
) -> list[tuple[ScoreKeys, Ranking] | Callable[[], tuple[ScoreKeys, Ranking]]]:
    """Update every EMA in place (``ema = beta * ema + (1 - beta) * grad`` where the gradient is finite;
    ``first``: the finite gradient) and rank each group (``group_sizes`` consecutive tensors) by the
    magnitude of its updated EMAs. Returns each group's keys and ranking (or, with ``defer``, a callable
    that updates and ranks the group when called).

    The kernel updates and ranks every group in one call when it serves every tensor (contiguous CPU
    float32 gradients and EMAs, no reducer); else, and for a group whose boundary fell outside the
    kernel's sampled window, each EMA is updated by :func:`ema_update` and ranked by :func:`rank`.
    """
    starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
    spans = [list(range(s, s + n)) for s, n in zip(starts, group_sizes)]
    lib = kernel() if grads and active_reducer() is None and _ema_served(grads, emas) else None

    def fallback(span: list[int], updated: bool) -> tuple[ScoreKeys, Ranking]:
        if not updated:
            for i in span:
                ema_update(emas[i], grads[i], beta, first=first[i])
        source = ScoreKeys.from_tensors([emas[i] for i in span])
        return source, rank(source, [(j, grads[i]) for j, i in enumerate(span)], ratio, chunk_numel=chunk_numel)

    def fused(span: list[int], result: cpu.GroupResult | None, selection: cpu.Preselection | None) -> tuple[ScoreKeys, Ranking]:
        if result is None or selection is None:  # outside the sampled window: the EMAs are updated, rank them
            return fallback(span, updated=True)
        source = ScoreKeys.from_tensors([emas[i] for i in span])
        keys = [cpu.NativeKeys(cpu.KIND_SCORE, score=emas[i]) for i in span]
        return source, _cpu_ranking(result, CpuState(keys, selection))

    if lib is None:
        return [(lambda span=span: fallback(span, False)) if defer else fallback(span, False) for span in spans]
    if defer:
        # one call per tensor, each when the masker reaches it: a selection's buffers serve one call at a
        # time, so each tensor is masked before the next is ranked
        def resolve(span: list[int]) -> tuple[ScoreKeys, Ranking]:
            ((result, selection),) = cpu.ema_rank_groups(
                lib, [grads[i] for i in span], [emas[i] for i in span], [first[i] for i in span], [len(span)],
                beta=beta, ratio=ratio, k=None,
            )
            return fused(span, result, selection)

        return [lambda span=span: resolve(span) for span in spans]
    ranked = cpu.ema_rank_groups(lib, list(grads), list(emas), list(first), list(group_sizes), beta=beta, ratio=ratio, k=None)
    return [fused(span, result, selection) for span, (result, selection) in zip(spans, ranked)]


def _ema_served(grads: Sequence[torch.Tensor], emas: Sequence[torch.Tensor]) -> bool:
    return cpu.usable(list(grads)) and all(
        cpu.contiguous_cpu_f32(g) and cpu.contiguous_cpu_f32(e) and g.numel() == e.numel() for g, e in zip(grads, emas)
    )


# --- applying --------------------------------------------------------------------------------


def apply(
    source: KeySource,
    index: int,
    flat: torch.Tensor,
    cut: Cut,
    *,
    ranking: Ranking | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    record: torch.Tensor | None = None,
    energy: Energy | None = None,
) -> Applied:
    """Zero, in place, the entries of ``flat`` (tensor ``index`` of ``source``) that ``cut`` selects;
    ``record`` (a flat bool tensor shaped like ``flat``) receives the mask, ``energy`` the sums of
    ``g ** 2`` before and after masking. A CPU ranking's apply reads the keys its ranking kept; a cut
    without a ranking (a stored mask) goes to the kernel where it computes the keys, else to the
    reference. A cut that masks nothing changes nothing: with ``energy``, the flat is read once for its sum."""
    if cut.threshold is None:
        if record is not None:
            record.zero_()
        if energy is not None:
            lib = kernel()
            total = None if lib is None else cpu.square_sum(lib, flat)
            total = reference.square_sum(flat, chunk_numel) if total is None else total
            energy.add(total, total)
        return Applied(0, 0, 0)
    if record is None or cpu.usable([record], record):
        keys = _keys_for_apply(source, index, flat, ranking)
        lib = kernel() if keys is not None else None
        if lib is not None:
            return Applied(*cpu.apply(lib, flat, keys, cut.threshold, cut.ties, record, energy))
    return reference.apply_cut(source, index, flat, cut, chunk_numel=chunk_numel, record=record, energy=energy)


def _keys_for_apply(source: KeySource, index: int, flat: torch.Tensor, ranking: Ranking | None) -> cpu.NativeKeys | None:
    if ranking is not None and ranking.backend == CPU:
        state: CpuState = ranking.state
        keys = state.keys[index]
        return keys if state.selection is None else dataclasses.replace(keys, selection=state.selection, member=index)
    described = _described(source, [(index, flat)])
    return None if described is None else described[0]


class Tracked(NamedTuple):
    """Coverage bit sets of one tensor for a fused apply: whether it is new, and its two packed sets."""

    first: bool
    updated: torch.Tensor
    previous: torch.Tensor


def apply_tracked(
    source: KeySource, index: int, flat: torch.Tensor, cut: Cut, bits: Tracked, *, ranking: Ranking | None = None,
    energy: Energy | None = None,
) -> tuple[Applied, int, int] | None:
    """:func:`apply` with the mask folded into the coverage bit sets block by block, never held as a
    byte per entry (the kernel, for magnitude keys of CPU gradients). Returns the counts, the updated
    entries and the changed entries, or ``None`` where it does not serve (nothing was changed: apply
    with a record, then :func:`observe_coverage`)."""
    if cut.threshold is None:
        return None
    keys = _keys_for_apply(source, index, flat, ranking)
    lib = kernel() if keys is not None else None
    if lib is None:
        return None
    done = cpu.apply_tracked(lib, flat, keys, cut.threshold, cut.ties, bits.updated, bits.previous, bits.first, energy)
    if done is None:
        return None
    masked, used, nonzero, updated, changed = done
    return Applied(masked, used, nonzero), updated, changed


def apply_on_device(
    rankings: Sequence[Ranking], records: Sequence[torch.Tensor | None], energies: Sequence[Energy] | None = None
) -> list[cuda.DeviceApplied]:
    """Apply a step of device rankings (every tensor of the step, from :func:`rank_step`) with one
    readback; ``energies`` (one per tensor, or ``None``) are added the sums of ``g ** 2``."""
    pending = {id(r.state): r.state for r in rankings}
    if len(pending) != 1 or any(r.backend != CUDA for r in rankings):
        raise ValueError("apply_on_device takes the device rankings of exactly one step")
    return cuda.apply_on_device(next(iter(pending.values())), records, energies)


def count_equal(source: KeySource, index: int, flat: torch.Tensor, key: int, *, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> int:
    """How many entries of ``flat`` have key ``key`` (the per-shard tie count of a sharded cut)."""
    return reference.count_equal(source, index, flat, key, chunk_numel=chunk_numel)


def mark(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]], cut: Cut, chunk_numel: int) -> list[torch.Tensor]:
    """Flat bool masks of the entries ``cut`` selects (the ``ties`` budget spent over ``flats`` in
    order, as the global scope does). Nothing is modified: the kernel marks by applying to a scratch copy."""
    keys = _described(source, flats) if cut.threshold is not None else None
    lib = kernel() if keys is not None else None
    if lib is None:
        return reference.mark(source, flats, cut, chunk_numel)
    out = [torch.zeros(flat.numel(), dtype=torch.bool) for _, flat in flats]
    ties_left = cut.ties
    for (_, flat), kk, mask in zip(flats, keys, out):
        _, used, _ = cpu.apply(lib, flat.clone(), kk, cut.threshold, ties_left, mask)
        ties_left -= used
    return out


def mark_top(
    scores: Sequence[torch.Tensor], k: int, *, largest: bool, excluded: Sequence[torch.Tensor | None] | None, chunk_numel: int
) -> list[torch.Tensor]:
    """Flat bool masks of the ``k`` largest (or smallest) ``|score|`` entries over ``scores`` ranked
    together (ties in list, then flat order), among those ``excluded`` does not flag; non-finite scores
    are never chosen. On the kernel the keys are first written out as float32 scores ranked smallest
    first, so that ranking and marking run in C; the :class:`ScoreKeys` passes are the twin."""
    keyed = score_keys(scores, largest=largest, excluded=excluded)
    if keyed is not None:
        source, flats = ScoreKeys.from_tensors(keyed), list(enumerate(keyed))
    else:
        source = ScoreKeys.from_tensors(scores, largest=largest, excluded=excluded)
        flats = list(enumerate(scores))
    cut = rank(source, flats, k=k, chunk_numel=chunk_numel).cut if flats and k > 0 else Cut(None)
    return mark(source, flats, cut, chunk_numel)


def score_keys(
    scores: Sequence[torch.Tensor], *, largest: bool, excluded: Sequence[torch.Tensor | None] | None
) -> list[torch.Tensor] | None:
    """Float32 tensors whose smallest-first keys are those of ``ScoreKeys.from_tensors(scores, largest=...,
    excluded=...)``, written by the kernel; ``None`` where it does not serve every tensor."""
    flags = list(excluded) if excluded is not None else [None] * len(scores)
    usable = all(cpu.contiguous_cpu_f32(s) for s in scores) and all(
        f is None or (f.dtype == torch.bool and f.device.type == "cpu" and f.is_contiguous() and f.numel() == s.numel())
        for s, f in zip(scores, flags)
    )
    lib = kernel() if scores and usable else None
    if lib is None:
        return None
    return [cpu.score_keys_f32(lib, s, None if f is None else f.reshape(-1), largest=largest) for s, f in zip(scores, flags)]


# --- stored masks ----------------------------------------------------------------------------

# id(set) -> (weak reference, its version counter when packed, its bits): a set changes only when a
# strategy re-selects (a new tensor), so it is packed once per selection, not once per step; an
# in-place change bumps the version and the set is packed again. Only the bits are kept here: a view
# of the set would hold the set alive (its ``_base``).
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor | None]] = {}


def stored_mask(kept: torch.Tensor) -> StoredMask:
    """The :class:`StoredMask` of a bool tensor of kept entries (any shape), packed to bits once per set
    where the kernel reads bits (CPU sets)."""
    flat = kept.reshape(-1)
    key, version = id(kept), _version(kept)
    cached = _PACKED.get(key)
    if cached is not None and cached[0]() is kept and cached[1] == version and version is not None:
        return StoredMask(flat, cached[2])
    lib = kernel() if flat.device.type == "cpu" and flat.dtype == torch.bool and flat.is_contiguous() else None
    bits = cpu.pack_mask_bits(lib, flat, invert=True) if lib is not None else None
    if version is not None:
        _PACKED[key] = (weakref.ref(kept, lambda _, key=key: _PACKED.pop(key, None)), version, bits)
    return StoredMask(flat, bits)


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter, or ``None`` for tensors without one (inference-mode tensors, never cached)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


# --- gradient reads and state updates --------------------------------------------------------


def count_nonfinite(flat: torch.Tensor, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> int:
    """NaN/inf entries of ``flat``: one C read for contiguous CPU float32 tensors, else chunk by chunk."""
    lib = kernel() if cpu.contiguous_cpu_f32(flat) else None
    if lib is not None:
        return cpu.count_nonfinite_f32(lib, flat)
    return reference.count_nonfinite(flat, chunk_numel)


def count_zeros(flat: torch.Tensor, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> int:
    """Entries of ``flat`` that are +0 or -0."""
    return reference.count_zeros(flat, chunk_numel)


def any_nonfinite(flats: Sequence[torch.Tensor], counted: Callable[[int], int]) -> bool:
    """Whether any entry of ``flats`` is NaN or inf. Contiguous CPU float32 flats are counted by
    ``counted(i)`` (the caller keeps the count for its plan); the others by one max-abs reduction each,
    with a single host synchronisation."""
    found = False
    peaks = []
    for i, flat in enumerate(flats):
        if cpu.contiguous_cpu_f32(flat) and kernel() is not None:
            found = counted(i) > 0 or found
            continue
        peaks.append(torch.linalg.vector_norm(flat, ord=float("inf")).float().to(flats[0].device))
    return found or (bool(peaks) and not bool(torch.isfinite(torch.stack(peaks)).all()))


def ema_update(ema: torch.Tensor, grad: torch.Tensor, beta: float, *, first: bool) -> None:
    """``ema = beta * ema + (1 - beta) * grad`` in place where ``grad`` is finite (``first``: the finite
    gradient); ``ema`` is a flat float32 tensor shaped like ``grad``."""
    lib = kernel() if cpu.contiguous_cpu_f32(grad) and cpu.contiguous_cpu_f32(ema) and ema.numel() == grad.numel() else None
    if lib is not None:
        cpu.ema_f32(lib, ema, grad, beta, first=first)
        return
    reference.ema_update(ema, grad, beta, first=first)


def accumulate_finite(sums: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor], *, square: bool = False) -> list[torch.Tensor]:
    """Each sum plus the finite entries of its flat gradient (squared with ``square``) as float32, NaN/inf
    counting as 0; a new sum where it is ``None``, else the sum updated in place."""
    lib = kernel()
    out = []
    for acc, grad in zip(sums, grads):
        if lib is None or not cpu.contiguous_cpu_f32(grad) or not (acc is None or cpu.contiguous_cpu_f32(acc)):
            out.append(reference.accumulate_finite(acc, grad, square=square))
            continue
        total = torch.empty_like(grad) if acc is None else acc
        cpu.accumulate_finite_f32(lib, total, grad, first=acc is None, square=square)
        out.append(total)
    return out


@dataclass
class Grown:
    """What one id3 growth step did: per tensor the entries made updatable, the non-finite gradient
    counts the growth read (``None`` where the reference grew, which does not count them) and the
    kernel's boundary digit (a hint for the next step)."""

    added: list[int]
    nonfinite: list[int] | None
    boundary: int | None


def id3_grow(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    updatable: Sequence[torch.Tensor],
    masked: Sequence[torch.Tensor],
    *,
    eps: float,
    exponent: float,
    k: int,
    boundaries: Sequence[int],
    chunk_numel: int,
) -> Grown:
    """Make the ``k`` still-masked entries with the largest ``|grad| / (eps + |theta|) ** exponent`` updatable:
    set in the flat bool ``updatable`` and cleared in ``masked`` (its negation) in place."""
    served = cpu_id3.exponent_kind(exponent) is not None and cpu_id3.usable(grads, thetas, [*updatable, *masked])
    lib = kernel() if served else None
    if lib is None:
        added = reference.id3_grow(grads, thetas, updatable, masked, eps=eps, exponent=exponent, k=k, chunk_numel=chunk_numel)
        return Grown(added, None, None)
    result = cpu_id3.grow(lib, grads, thetas, updatable, masked, eps=eps, exponent=exponent, k=k, boundaries=boundaries)
    return Grown(result.marked, result.nonfinite, result.boundary)


# --- coverage --------------------------------------------------------------------------------


def observe_coverage(
    mask: torch.Tensor | None, numel: int, updated: torch.Tensor | None, previous: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int | None]:
    """Fold one step's mask (``None``: every entry masked) into the packed bit sets of one tensor;
    returns the new sets (the kernel writes CPU sets in place), the updated and the changed counts."""
    cpu_mask = mask is None or (mask.device.type == "cpu" and mask.dtype == torch.bool and mask.is_contiguous() and mask.numel() == numel)
    lib = kernel() if device.type == "cpu" and cpu_mask else None
    if lib is None:
        return reference.observe_coverage(mask, numel, updated, previous, device)
    nbytes = (numel + 7) // 8
    first = previous is None
    updated, previous = _own_bytes(updated, nbytes), _own_bytes(previous, nbytes)
    count, changed = cpu.coverage_observe(lib, mask, numel, updated, previous, first)
    return updated, previous, count, None if first else changed


def _own_bytes(packed: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    """A contiguous CPU uint8 tensor of ``nbytes`` the kernel may write: the caller's own ``packed``, else zeros."""
    if packed is None:
        return torch.zeros(nbytes, dtype=torch.uint8)
    return packed.to("cpu").contiguous()


def tracked_bits(updated: torch.Tensor | None, previous: torch.Tensor | None, numel: int) -> Tracked:
    """The bit sets of one tensor as :func:`apply_tracked` writes them."""
    nbytes = (numel + 7) // 8
    return Tracked(previous is None, _own_bytes(updated, nbytes), _own_bytes(previous, nbytes))


# --- strict mode -----------------------------------------------------------------------------


class Held(NamedTuple):
    """Masked parameter entries copied out before an optimizer step, by the backend that copied them."""

    flat: torch.Tensor
    mask: torch.Tensor
    values: list[torch.Tensor]
    by_kernel: bool


def gather_masked(flat: torch.Tensor, mask: torch.Tensor, count: int, chunk_numel: int) -> Held:
    """Copy out the ``count`` entries of ``flat`` that the flat bool ``mask`` selects."""
    lib = kernel() if cpu_moves.supports_moves(flat) else None
    if lib is not None:
        return Held(flat, mask, [cpu_moves.gather_masked(lib, flat, mask, count)], True)
    return Held(flat, mask, reference.gather_masked(flat, mask, chunk_numel), False)


def scatter_masked(held: Held, chunk_numel: int) -> int:
    """Write entries copied by :func:`gather_masked` back; returns how many."""
    if held.by_kernel:
        lib = kernel()
        if lib is None:
            raise RuntimeError("the kernel that copied these entries out is no longer loaded")
        cpu_moves.scatter_masked(lib, held.flat, held.mask, held.values[0])
        return held.values[0].numel() - 1
    return reference.scatter_masked(held.flat, held.mask, held.values, chunk_numel)

