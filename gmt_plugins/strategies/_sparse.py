"""Helpers of the sparse fine-tuning strategies (sara, dsee, spiel, lt_sft).

They all keep, per parameter name, a bool tensor of the entries that may be updated (``trainable``)
and turn it into a :class:`MaskPlan` that masks everything else; some also keep the pretrained
values to measure how far an entry moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gmt_plugins import native, native_rank
from gmt_plugins.strategies._masks import (
    FLOAT32_MAX_BITS,
    SCORE_CAP,
    ScoreKeys,
    StoredMask,
    cut_for_count,
    mark,
    mask_plan,
    stored_mask,
)
from gmt_plugins.strategies.base import GradEntry, MaskPlan


def on_device(store: dict[str, torch.Tensor], name: str, device: torch.device) -> torch.Tensor:
    """``store[name]`` on ``device`` (moved once and kept there: a resumed state loads on the CPU)."""
    tensor = store[name]
    if tensor.device != device:
        tensor = store[name] = tensor.to(device)
    return tensor


def trainable_plan(entries: Sequence[GradEntry], trainable: dict[str, torch.Tensor], chunk_numel: int) -> MaskPlan:
    """Mask every finite entry outside ``trainable``; a parameter without a stored set is frozen.

    The sets are read as :class:`~gmt_plugins.strategies._masks.StoredMask`, packed once per set."""
    masks: list[StoredMask | bool] = []
    for e in entries:
        if e.name not in trainable:
            masks.append(True)
            continue
        masks.append(stored_mask(on_device(trainable, e.name, e.flat.device)))
    return mask_plan(entries, masks, chunk_numel)


def load_float_tensors(state: Any, key: str) -> dict[str, torch.Tensor]:
    """Validate a ``{name: floating tensor}`` dict from a loaded state."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in state.values()):
        raise ValueError(f"state {key!r} must map parameter names to floating-point tensors")
    return dict(state)


def check_state_keys(strategy: str, state: dict[str, Any], known: set[str]) -> None:
    unknown = set(state) - known
    if unknown:
        raise ValueError(f"unknown {strategy} state keys {sorted(unknown)}")



def top_count(
    score: torch.Tensor, k: int, chunk_numel: int, *, largest: bool, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat bool mask of the ``k`` largest (or smallest) ``|score|`` entries of the flat ``score``,
    among those ``excluded`` does not flag; fewer when fewer are rankable (non-finite scores are
    never chosen). Exact radix selection by the engine (ties in flat order); see
    :func:`reference_top_count` for its twin."""
    return top_count_over([score], k, chunk_numel, largest=largest, excluded=None if excluded is None else [excluded])[0]


def top_count_over(
    scores: Sequence[torch.Tensor],
    k: int,
    chunk_numel: int,
    *,
    largest: bool,
    excluded: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """:func:`top_count` over several flat score tensors ranked together (ties in list, then flat order).

    For CPU float32 scores the keys are written out once as float32 scores the kernel ranks smallest
    first (:func:`key_scores`), so that ranking and marking run in C; the torch passes of the
    :class:`ScoreKeys` with ``largest`` and ``excluded`` are the twin."""
    keyed = key_scores(scores, largest=largest, excluded=excluded)
    if keyed is not None:
        source = ScoreKeys.from_tensors(keyed)
        flats = list(enumerate(keyed))
    else:
        source = ScoreKeys.from_tensors(scores, largest=largest, excluded=excluded)
        flats = list(enumerate(scores))
    return mark(source, flats, cut_for_count(source, flats, k, chunk_numel), chunk_numel)


def key_scores(
    scores: Sequence[torch.Tensor], *, largest: bool, excluded: Sequence[torch.Tensor | None] | None
) -> list[torch.Tensor] | None:
    """Float32 tensors whose :class:`ScoreKeys` (smallest first, nothing excluded) are the keys of
    ``ScoreKeys.from_tensors(scores, largest=largest, excluded=excluded)`` over ``scores``: the key's
    bit pattern itself (``FLOAT32_MAX_BITS - bits`` for ``largest``), +inf where the score is not
    finite or ``excluded`` flags it (the excluded key). ``None`` unless the kernel is available and
    every tensor is a contiguous CPU float32 score (and bool flags)."""
    flags = list(excluded) if excluded is not None else [None] * len(scores)
    usable = all(native_rank.ema_usable(s) for s in scores) and all(
        f is None or (f.dtype == torch.bool and f.device.type == "cpu" and f.is_contiguous() and f.numel() == s.numel())
        for s, f in zip(scores, flags)
    )
    lib = native.library() if scores and usable else None
    if lib is None:
        return None
    return [native_rank.score_keys_f32(lib, s, None if f is None else f.reshape(-1), largest=largest) for s, f in zip(scores, flags)]


def reference_key_scores(score: torch.Tensor, excluded: torch.Tensor | None, *, largest: bool) -> torch.Tensor:
    """Torch twin of :func:`key_scores` for one tensor."""
    bits = score.float().reshape(-1).view(torch.int32) & 0x7FFF_FFFF
    rankable = bits < SCORE_CAP
    if excluded is not None:
        rankable &= ~excluded.reshape(-1)
    key = FLOAT32_MAX_BITS - bits if largest else bits
    return torch.where(rankable, key, SCORE_CAP).view(torch.float32)


def reference_top_count(score: torch.Tensor, k: int, *, largest: bool, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Slow twin of :func:`top_count`: a stable sort of ``|score|`` (ties in flat order)."""
    values = score.detach().float().abs().cpu()
    candidates = torch.isfinite(score.detach().cpu())
    if excluded is not None:
        candidates &= ~excluded.cpu()
    positions = [i for i in range(values.numel()) if candidates[i]]
    positions.sort(key=lambda i: (-values[i].item() if largest else values[i].item(), i))
    out = torch.zeros(values.numel(), dtype=torch.bool)
    out[positions[:k]] = True
    return out.to(score.device)

