"""Slow, obviously correct twins of the engine, used only by tests.

Masks are computed by sorting Python lists of ``(value, position)`` pairs: no bit tricks, no
histograms, no chunks.
"""

from __future__ import annotations

import math

import torch


def _order_and_mask(values: list[float], finite: list[bool], ratio: float, ratio_of: str = "all") -> list[bool]:
    candidates = [i for i, ok in enumerate(finite) if ok]
    if ratio_of == "all":
        k = math.floor(ratio * len(candidates))
        chosen = sorted(candidates, key=lambda i: (values[i], i))[:k]
    else:  # "nonzero": the k smallest nonzero entries, and every zero
        nonzero = [i for i in candidates if values[i] != 0]
        k = math.floor(ratio * len(nonzero))
        chosen = [i for i in candidates if values[i] == 0] + sorted(nonzero, key=lambda i: (values[i], i))[:k]
    mask = [False] * len(values)
    for i in chosen:
        mask[i] = True
    return mask


def reference_masks(
    grads: list[torch.Tensor], ratio: float, scope: str, scores: list[torch.Tensor] | None = None, ratio_of: str = "all"
) -> list[torch.Tensor]:
    """Boolean masks (shaped like each gradient) of the entries GMT zeroes.

    ``scores`` (default ``|grad|``) ranks the entries; non-finite gradient entries are never masked.
    ``ratio_of="nonzero"``: ``ratio`` counts the nonzero scores only, and the zero ones are masked too.
    """
    if scores is None:
        scores = [g.detach().abs() for g in grads]
    values = [s.flatten().double().tolist() for s in scores]
    finite = [torch.isfinite(g.detach().flatten().double()).tolist() for g in grads]
    if scope == "tensor":
        flat_masks = [_order_and_mask(v, f, ratio, ratio_of) for v, f in zip(values, finite)]
    else:
        joined = _order_and_mask(sum(values, []), sum(finite, []), ratio, ratio_of)
        flat_masks, offset = [], 0
        for v in values:
            flat_masks.append(joined[offset : offset + len(v)])
            offset += len(v)
    return [torch.tensor(m, dtype=torch.bool).reshape(g.shape) for m, g in zip(flat_masks, grads)]


def reference_apply(grads: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.where(m, torch.zeros_like(g), g) for g, m in zip(grads, masks)]
