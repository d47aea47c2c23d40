"""Helpers of the sparse fine-tuning strategies (sara, dsee, spiel, lt_sft).

They all keep, per parameter name, a bool tensor of the entries that may be updated (``trainable``)
and turn it into a :class:`MaskPlan` that masks everything else; some also keep the pretrained
values to measure how far an entry moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gmt_plugins.engine import dispatch
from gmt_plugins.engine.keys import StoredMask
from gmt_plugins.strategies._masks import mask_plan, stored_mask
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

    See :func:`gmt_plugins.engine.dispatch.mark_top`."""
    return dispatch.mark_top(scores, k, largest=largest, excluded=excluded, chunk_numel=chunk_numel)


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

