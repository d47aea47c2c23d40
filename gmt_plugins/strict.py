"""Strict mode: hold masked parameter entries bit-identical through an optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from gmt_plugins.engine import dispatch
from gmt_plugins.layout import flat_view


class MaskedEntryGuard:
    """Copies the masked entries of each parameter before ``optimizer.step()`` and writes them back
    after it, so momentum, weight decay or quantized optimizer state cannot move them.

    Cost while a step is in flight: one byte per selected entry (the mask) plus the masked values;
    both are freed by :meth:`restore`. Optimizer state still evolves as for a zero gradient.
    """

    def __init__(self, *, chunk_numel: int) -> None:
        self._chunk_numel = chunk_numel
        self._held: list[dispatch.Held] = []

    @staticmethod
    def new_mask(param: torch.Tensor) -> torch.Tensor:
        return torch.empty(param.numel(), dtype=torch.bool, device=param.device)

    @torch.no_grad()
    def capture(self, param: torch.nn.Parameter, mask: torch.Tensor, count: int) -> None:
        """Keep the ``count`` entries of ``param`` that the flat bool ``mask`` selects (one branch-free
        pass of the kernel on CPU, boolean indexing per chunk elsewhere)."""
        self._held.append(dispatch.gather_masked(_flat_data(param), mask, count, self._chunk_numel))

    @torch.no_grad()
    def restore(self) -> int:
        """Write the captured entries back; returns how many entries were held."""
        held = sum(dispatch.scatter_masked(item, self._chunk_numel) for item in self._held)
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
