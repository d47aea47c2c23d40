"""Strict mode: hold masked parameter entries bit-identical through an optimizer step."""

from __future__ import annotations

import torch

from gmt_plugins.selection import iter_chunks


class MaskedEntryGuard:
    """Copies the masked entries of each parameter before ``optimizer.step()`` and writes them back
    after it, so momentum, weight decay or quantized optimizer state cannot move them.

    Cost while a step is in flight: one byte per selected entry (the mask) plus the masked values;
    both are freed by :meth:`restore`. Optimizer state still evolves as for a zero gradient.
    """

    def __init__(self, *, chunk_numel: int) -> None:
        self._chunk_numel = chunk_numel
        self._held: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []

    @staticmethod
    def new_mask(param: torch.Tensor) -> torch.Tensor:
        return torch.empty(param.numel(), dtype=torch.bool, device=param.device)

    @torch.no_grad()
    def capture(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        flat = _flat_data(param)
        values = [chunk[m] for (_, chunk), (_, m) in zip(iter_chunks(flat, self._chunk_numel), iter_chunks(mask, self._chunk_numel))]
        self._held.append((flat, mask, values))

    @torch.no_grad()
    def restore(self) -> int:
        """Write the captured entries back; returns how many entries were held."""
        held = 0
        for flat, mask, values in self._held:
            for ((_, chunk), (_, m)), saved in zip(zip(iter_chunks(flat, self._chunk_numel), iter_chunks(mask, self._chunk_numel)), values):
                chunk[m] = saved
                held += saved.numel()
        self._held.clear()
        return held

    @property
    def pending(self) -> bool:
        return bool(self._held)


def _flat_data(param: torch.Tensor) -> torch.Tensor:
    if not param.is_contiguous():
        raise ValueError("strict mode needs contiguous parameters")
    return param.detach().view(-1)
