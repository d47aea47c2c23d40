"""Building blocks shared by the selective-update strategies.

Strategies never touch gradients: they describe what to zero as a :class:`MaskPlan` whose key
sources the engine (``GradientMasker._execute`` -> ``apply_cut_counted``) reads. This module provides

* :class:`MaskKeys`: keys for stored boolean masks or whole-tensor decisions (0 = masked,
  1 = kept, ``cap`` = non-finite gradient, so NaN/inf are never zeroed);
* :func:`stored_mask`: a strategy's stored set of kept entries as :class:`MaskKeys` reads it, packed
  to bits once per set (no complement, 1/8 of the bytes read per step);
* :func:`accumulate_finite`: a running sum of the finite gradient entries (SIFT, SPT, SpIEL) in one
  C pass, :func:`reference_accumulate_finite` its torch twin;
* :class:`ScoreKeys`: keys from a float score (the bit pattern of a non-negative float32 orders
  like its value), for ranking by something other than the current gradient;
* :func:`cut_for_count` and :func:`mark`: the engine's exact radix selection of the ``k``
  smallest keys, turned into boolean masks a strategy can keep as state;
* :class:`WarmupMaskStrategy`: a mask chosen from scores accumulated over warm-up steps, then
  fixed (SIFT, SPT);
* option validation helpers.
"""

from __future__ import annotations

import dataclasses
import weakref
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gmt_plugins import native, native_rank
from gmt_plugins.config import GMTConfig
from gmt_plugins.selection import Cut, KeySource, iter_chunks, rank, select_chunk
from gmt_plugins.strategies.base import GradEntry, MaskPlan, MaskStrategy, TensorPlan, count_nonfinite  # noqa: F401 (re-exported)

# Largest finite float32 bit pattern, and +inf's: scores are clamped below the latter.
FLOAT32_MAX_BITS = 0x7F7F_FFFF
SCORE_CAP = 0x7F80_0000


# --- option validation ------------------------------------------------------------------------


def check_int(option: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"option {option!r} must be an integer >= {minimum}, got {value!r}")


def check_float(option: str, value: Any, low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"option {option!r} must be a number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def check_choice(option: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"option {option!r} must be one of {list(allowed)}, got {value!r}")


def check_patterns(option: str, value: Any) -> list[str]:
    import re

    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"option {option!r} must be a list of regular expressions, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"option {option!r}: {pattern!r} is not a valid regular expression: {err}") from None
    return list(value)


# --- key sources ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StoredMask:
    """A strategy's stored set of *kept* (updatable) entries, as :class:`MaskKeys` reads it: ``kept``
    (flat bool, True = kept; a view of the strategy's tensor, not a copy) and, for CPU sets when the
    kernel is available, the masked entries packed 64 to a word (``bits``, 1/8 of the bytes), which
    the kernel's stored-mask step reads instead. Built by :func:`stored_mask`, which packs each set once."""

    kept: torch.Tensor
    bits: torch.Tensor | None

    def numel(self) -> int:
        return self.kept.numel()


# id(set) -> (weak reference, its version counter when packed, its bits): a set changes only when a
# strategy re-selects (a new tensor), so it is packed once per selection, not once per step; an
# in-place change bumps the version and the set is packed again. Only the bits are kept here: a view
# of the set would hold the set alive (its ``_base``).
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor | None]] = {}


def stored_mask(kept: torch.Tensor) -> StoredMask:
    """The :class:`StoredMask` of a bool tensor of kept entries (any shape), its bits cached."""
    flat = kept.reshape(-1)
    key, version = id(kept), _version(kept)
    cached = _PACKED.get(key)
    if cached is not None and cached[0]() is kept and cached[1] == version and version is not None:
        return StoredMask(flat, cached[2])
    lib = native.library() if flat.device.type == "cpu" and flat.dtype == torch.bool and flat.is_contiguous() else None
    bits = native_rank.pack_mask_bits(lib, flat, invert=True) if lib is not None else None
    if version is not None:
        _PACKED[key] = (weakref.ref(kept, lambda _, key=key: _PACKED.pop(key, None)), version, bits)
    return StoredMask(flat, bits)


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter, or ``None`` for tensors without one (inference-mode tensors, never cached)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class MaskKeys:
    """Keys for precomputed masks: per tensor a flat bool tensor (True = masked), a
    :class:`StoredMask` (its ``kept`` entries are not masked) or a bool for the whole tensor.
    ``Cut(1)`` then zeroes exactly the masked finite entries."""

    key_bits = 16
    cap = 2  # any cap is aligned for 16-bit keys

    def __init__(self, masked: Sequence[torch.Tensor | StoredMask | bool]) -> None:
        self._masked = list(masked)

    def native_source(self, index: int, flat: torch.Tensor) -> native_rank.NativeKeys | None:
        """The kernel computes these keys itself for fp32 CPU gradients and CPU bool masks."""
        masked = self._masked[index]
        if type(self).keys is not MaskKeys.keys or not native_rank.ema_usable(flat) or masked is False:
            return None
        if masked is True:
            return native_rank.NativeKeys(native_rank.KIND_MASK)
        stored = isinstance(masked, StoredMask)
        flags = masked.kept if stored else masked
        usable = flags.dtype == torch.bool and flags.device.type == "cpu" and flags.is_contiguous()
        if not usable or flags.numel() != flat.numel():
            return None
        if stored:
            return native_rank.NativeKeys(native_rank.KIND_MASK, score=flags, kept=True, bits=masked.bits)
        return native_rank.NativeKeys(native_rank.KIND_MASK, score=flags)

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        masked = self._masked[index]
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


def mask_plan(entries: Sequence[GradEntry], masked: Sequence[torch.Tensor | StoredMask | bool], chunk_numel: int) -> MaskPlan:
    """A plan zeroing, per entry, the finite entries of a flat bool mask, or those a
    :class:`StoredMask` does not keep (or of the whole tensor when ``True``; nothing when ``False``)."""
    source = MaskKeys(masked)
    plans = []
    for i, (entry, m) in enumerate(zip(entries, masked)):
        if isinstance(m, (torch.Tensor, StoredMask)) and m.numel() != entry.flat.numel():
            raise ValueError(f"stored mask of {entry.name!r} has {m.numel()} entries, its gradient {entry.flat.numel()}")
        # an all-False mask gets Cut(1) too: it zeroes nothing, and testing it first costs a pass
        plans.append(TensorPlan(source, i, Cut(None) if m is False else Cut(1), entry.nonfinite_count(chunk_numel)))
    return MaskPlan(plans)


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
        self._score, self._largest, self._excluded = score, largest, excluded
        self._tensors: Sequence[torch.Tensor] | None = None

    @classmethod
    def from_tensors(cls, scores: Sequence[torch.Tensor], **kwargs: Any) -> ScoreKeys:
        source = cls(lambda i, chunk, start: scores[i][start : start + chunk.numel()], **kwargs)
        source._tensors = scores
        return source

    def native_source(self, index: int, flat: torch.Tensor) -> native_rank.NativeKeys | None:
        """The many-tensor kernel computes these keys itself for stored float32 scores of fp32
        gradients, smallest first, nothing excluded; ``None`` otherwise (the torch keys serve)."""
        if self._tensors is None or self._largest or self._excluded is not None or type(self).keys is not ScoreKeys.keys:
            return None
        score = self._tensors[index]
        usable = flat.dtype == torch.float32 and score.dtype == torch.float32 and score.device.type == "cpu"
        if not usable or not score.is_contiguous() or score.numel() != flat.numel():
            return None
        return native_rank.NativeKeys(native_rank.KIND_SCORE, score=score)

    def keys(self, index: int, chunk: torch.Tensor, start: int) -> torch.Tensor:
        score = self._score(index, chunk, start).to(torch.float32).abs()
        # NaN scores (e.g. 0/0) rank lowest, overflow ranks highest; neither may reach the cap.
        score = torch.nan_to_num(score, nan=0.0, posinf=torch.finfo(torch.float32).max)
        bits = score.view(torch.int32)
        if self._largest:
            bits = FLOAT32_MAX_BITS - bits
        keep = torch.isfinite(chunk)
        if self._excluded is not None and self._excluded[index] is not None:
            keep &= ~self._excluded[index][start : start + chunk.numel()].to(chunk.device)
        return torch.where(keep, bits, self.cap)

    def key_to_value(self, index: int, key: int) -> float:
        bits = FLOAT32_MAX_BITS - key if self._largest else key
        return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


class PreselectedScoreKeys(ScoreKeys):
    """:class:`ScoreKeys` of stored scores that :func:`gmt_plugins.native_rank.ema_rank_group` has
    already ranked (``selection``, for this source's tensors in order): the kernel then masks from
    the bits and window keys that read kept instead of reading the scores again. The keys, and so
    the masks, are those of :meth:`ScoreKeys.from_tensors` (``keys`` is inherited: the torch twin)."""

    def __init__(self, scores: Sequence[torch.Tensor], selection: native_rank.Preselection) -> None:
        super().__init__(lambda i, chunk, start: scores[i][start : start + chunk.numel()])
        self._tensors = scores
        self.selection = selection

    def native_source(self, index: int, flat: torch.Tensor) -> native_rank.NativeKeys | None:
        keys = super().native_source(index, flat)
        return None if keys is None else dataclasses.replace(keys, selection=self.selection, member=index)


# --- selection into masks ---------------------------------------------------------------------


def cut_for_count(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]], k: int, chunk_numel: int) -> Cut:
    """The cut selecting exactly ``min(k, rankable)`` smallest keys over ``flats`` (ties in order).

    Like :func:`gmt_plugins.selection.rank`, but for a count rather than a ratio (a ratio cannot
    express every count exactly in floating point).
    """
    if not flats or k <= 0:
        return Cut(None)
    return rank(source, flats, k=k, chunk_numel=chunk_numel)[0]


def mark(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]], cut: Cut, chunk_numel: int) -> list[torch.Tensor]:
    """Flat bool masks of the entries ``cut`` selects (the ``ties`` budget is spent over ``flats``
    in order, as the engine does for the global scope). Nothing is modified.

    When the kernel computes every flat's keys, one C apply per flat marks them (on a scratch copy,
    recording what it zeroes); the chunked torch loop is its twin."""
    out = [torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device) for _, flat in flats]
    if cut.threshold is None:
        return out
    ties_left = cut.ties
    described = _described(source, flats)
    if described is not None:
        lib, keys = described
        for (_, flat), k, mask in zip(flats, keys, out):
            _, used, _ = native_rank.apply(lib, flat.clone(), k, cut.threshold, ties_left, mask)
            ties_left -= used
        return out
    for (index, flat), mask in zip(flats, out):
        for start, chunk in iter_chunks(flat, chunk_numel):
            selected, n_equal = select_chunk(source.keys(index, chunk, start), cut.threshold, ties_left)
            ties_left -= n_equal
            mask[start : start + chunk.numel()] = selected
    return out


def _described(source: KeySource, flats: Sequence[tuple[int, torch.Tensor]]) -> tuple[Any, list[native_rank.NativeKeys]] | None:
    """The kernel and every flat's keys as it computes them, or ``None`` when it cannot serve them all."""
    describe = getattr(source, "native_source", None)
    if describe is None or not flats or not native_rank.usable([flat for _, flat in flats]):
        return None
    keys = [describe(index, flat) for index, flat in flats]
    lib = native.library() if all(k is not None for k in keys) else None
    return None if lib is None else (lib, keys)


def groups(n: int, scope: str) -> list[list[int]]:
    """Entry indices ranked together: all of them for the global scope, one by one otherwise."""
    return [list(range(n))] if scope == "global" else [[i] for i in range(n)]


def lowest_fraction(scores: Sequence[torch.Tensor], ratio: float, scope: str, chunk_numel: int) -> list[torch.Tensor]:
    """Flat bool masks of the ``floor(ratio * n)`` lowest ``scores`` (per tensor or over all of them)."""
    source = ScoreKeys.from_tensors(scores)
    out: list[torch.Tensor] = [torch.empty(0)] * len(scores)
    for group in groups(len(scores), scope):
        # The scores themselves stand in for the gradient chunks: every finite score is ranked.
        flats = [(i, scores[i]) for i in group]
        cut, _ = rank(source, flats, ratio, chunk_numel=chunk_numel)
        for i, m in zip(group, mark(source, flats, cut, chunk_numel)):
            out[i] = m
    return out


def load_bool_masks(state: Any, key: str) -> dict[str, torch.Tensor]:
    """Validate a ``{name: bool tensor}`` dict from a loaded state."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in state.values()):
        raise ValueError(f"state {key!r} must map parameter names to bool tensors")
    return dict(state)


# --- gradient sums (SIFT, SPT, SpIEL) ---------------------------------------------------------

def accumulate_finite(acc: torch.Tensor | None, grad: torch.Tensor, *, square: bool = False) -> torch.Tensor:
    """``acc`` plus the finite entries of the flat ``grad`` (squared with ``square``) as float32, NaN/inf
    counting as 0; a new sum when ``acc`` is ``None``, else ``acc`` updated in place. One C read of
    ``grad`` for contiguous CPU fp32 tensors; :func:`reference_accumulate_finite` otherwise (its twin)."""
    return accumulate_finite_each([acc], [grad], square=square)[0]


def accumulate_finite_each(
    sums: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor], *, square: bool = False
) -> list[torch.Tensor]:
    """:func:`accumulate_finite` of each sum with its gradient (the kernel looked up once for all)."""
    lib = native.library()
    out = []
    for acc, grad in zip(sums, grads):
        if lib is None or not native_rank.ema_usable(grad) or not (acc is None or native_rank.ema_usable(acc)):
            out.append(reference_accumulate_finite(acc, grad, square=square))
            continue
        total = torch.empty_like(grad) if acc is None else acc
        native_rank.accumulate_finite_f32(lib, total, grad, first=acc is None, square=square)
        out.append(total)
    return out


def reference_accumulate_finite(acc: torch.Tensor | None, grad: torch.Tensor, *, square: bool = False) -> torch.Tensor:
    """Torch twin of :func:`accumulate_finite`: a finite copy of ``grad`` (squared), added to ``acc``."""
    finite = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)  # a copy: grad is not changed
    if square:
        finite.square_()
    return finite if acc is None else acc.add_(finite)


# --- a mask fixed after warm-up (SIFT, SPT) ---------------------------------------------------


class WarmupMaskStrategy(MaskStrategy):
    """Accumulate a score over ``options.warmup_steps`` steps, then fix the mask for good.

    During warm-up nothing is updated (every finite gradient entry is masked): those steps only
    measure, so that every parameter outside the chosen set ends training exactly where it started
    (the sparse-increment property of SIFT and SPT). At the last warm-up step the
    ``floor(mask_ratio * n)`` lowest-scoring entries (per tensor, or over all tensors for a global
    ranking) are masked from that step on, that step included. Tensors that had no gradient at
    that step are not in the chosen set and stay frozen.

    State: ``seen`` (warm-up steps accumulated), ``scores`` (float32 per parameter name, only
    during warm-up) and ``updatable`` (bool per parameter name, shaped like it; ``None`` before).
    """

    global_only: ClassVar[bool] = False

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.seen = 0
        self.scores: dict[str, torch.Tensor] = {}
        self.updatable: dict[str, torch.Tensor] | None = None

    @abstractmethod
    def accumulate(self, score: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        """The score after one more step with the flat gradient ``grad`` (read only: learn from its finite
        entries, see :func:`accumulate_finite`); ``score`` is ``None`` at first."""

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        chunk = self.config.chunk_numel
        if self.updatable is None:
            for e in entries:
                self.scores[e.name] = self.accumulate(self.scores.get(e.name), e.flat)
            self.seen += 1
            if self.seen < self.options.warmup_steps:
                return mask_plan(entries, [True] * len(entries), chunk)
            scope = "global" if self.global_only else self.config.scope
            scores = [self.scores[e.name] for e in entries]
            masked = lowest_fraction(scores, self.config.mask_ratio, scope, chunk)
            self.updatable = {e.name: (~m).view(e.param.shape) for e, m in zip(entries, masked)}
            self.scores = {}
        masks: list[StoredMask | bool] = []
        for e in entries:
            kept = self.updatable.get(e.name)
            if kept is not None and kept.device != e.flat.device:
                kept = self.updatable[e.name] = kept.to(e.flat.device)
            masks.append(True if kept is None else stored_mask(kept))
        return mask_plan(entries, masks, chunk)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "scores": dict(self.scores), "updatable": None if self.updatable is None else dict(self.updatable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"seen", "scores", "updatable"}
        if unknown:
            raise ValueError(f"unknown {self.name} state keys {sorted(unknown)}")
        self.seen = int(state.get("seen", 0))
        scores = state.get("scores", {})
        if not isinstance(scores, dict) or not all(isinstance(v, torch.Tensor) for v in scores.values()):
            raise ValueError(f"{self.name} state 'scores' must map parameter names to tensors")
        self.scores = {k: v.float() for k, v in scores.items()}
        updatable = state.get("updatable")
        self.updatable = None if updatable is None else load_bool_masks(updatable, "updatable")


@dataclass
class WarmupOptions:
    warmup_steps: int = 1
    """Optimizer steps whose gradients choose the mask; nothing is updated before the last one."""

    def __post_init__(self) -> None:
        check_int("warmup_steps", self.warmup_steps, 1)
