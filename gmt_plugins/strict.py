"""Strict mode: hold masked parameter entries bit-identical through an optimizer step."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Hashable

import torch

from gmt_plugins import native
from gmt_plugins.layout import flat_view
from gmt_plugins.selection import iter_chunks


class MaskedEntryGuard:
    """Copies the masked entries of each parameter before ``optimizer.step()`` and writes them back
    after it, so momentum, weight decay or quantized optimizer state cannot move them.

    Cost while a step is in flight: one byte per selected entry (the mask) plus the masked values;
    both are freed by :meth:`restore`. Optimizer state still evolves as for a zero gradient.
    """

    def __init__(self, *, chunk_numel: int) -> None:
        self._chunk_numel = chunk_numel
        self._held: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], ctypes.CDLL | None]] = []

    @staticmethod
    def new_mask(param: torch.Tensor) -> torch.Tensor:
        return torch.empty(param.numel(), dtype=torch.bool, device=param.device)

    @torch.no_grad()
    def capture(self, param: torch.nn.Parameter, mask: torch.Tensor, count: int) -> None:
        """Keep the ``count`` entries of ``param`` that the flat bool ``mask`` selects.

        On CPU the compiled kernel of :mod:`gmt_plugins.native` copies them in one branch-free
        pass (one value more, as scratch); otherwise, and as its twin, boolean indexing per chunk.
        """
        flat = _flat_data(param)
        kernel = native.library() if native.supports_moves(flat) else None
        if kernel is not None:
            values = [native.gather_masked(kernel, flat, mask, count)]
        else:
            values = [chunk[m] for (_, chunk), (_, m) in zip(iter_chunks(flat, self._chunk_numel), iter_chunks(mask, self._chunk_numel))]
        self._held.append((flat, mask, values, kernel))

    @torch.no_grad()
    def restore(self) -> int:
        """Write the captured entries back; returns how many entries were held."""
        held = 0
        for flat, mask, values, kernel in self._held:
            if kernel is not None:
                native.scatter_masked(kernel, flat, mask, values[0])
                held += values[0].numel() - 1
                continue
            for ((_, chunk), (_, m)), saved in zip(zip(iter_chunks(flat, self._chunk_numel), iter_chunks(mask, self._chunk_numel)), values):
                chunk[m] = saved
                held += saved.numel()
        self._held.clear()
        return held

    def split(self, key: Callable[[torch.Tensor], Hashable]) -> dict[Hashable, MaskedEntryGuard]:
        """Move the held entries into one guard per ``key(flat parameter)``, for optimizers that step
        parameter groups one at a time and must have each group restored right after its step
        (DeepSpeed ZeRO copies a group to the model as soon as it stepped)."""
        guards: dict[Hashable, MaskedEntryGuard] = {}
        for item in self._held:
            guards.setdefault(key(item[0]), MaskedEntryGuard(chunk_numel=self._chunk_numel))._held.append(item)
        self._held.clear()
        return guards

    @property
    def held_bytes(self) -> int:
        """Bytes held now: the masks and the saved values."""
        return sum(m.numel() * m.element_size() + sum(v.numel() * v.element_size() for v in values) for _, m, values, _ in self._held)

    @property
    def pending(self) -> bool:
        return bool(self._held)


def _flat_data(param: torch.Tensor) -> torch.Tensor:
    flat = flat_view(param.detach())  # memory order, as the gradient's flat view (the masker checks the strides match)
    if flat is None:
        raise ValueError("strict mode needs parameters whose entries form one dense block")
    return flat
