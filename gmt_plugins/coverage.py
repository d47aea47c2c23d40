"""Coverage and churn of the masks: two bits of state per entry, packed eight to a byte.

``GMTConfig(track_coverage=True)`` keeps, for every gradient entry the masker sees, one bit "updated
(not masked) at least once so far" and one bit "masked at the previous step". From them each step
gives, per tensor, how many entries have been updated so far (coverage) and how many changed their
masked state since the previous step (churn).

Memory: 2 bits per entry, ``2 * ceil(n / 8)`` bytes for a tensor of ``n`` entries, on the gradient's
device: 34 MB for SmolLM2-135M's 134.5M entries, 0.3 GB for a 1.2B model. For gradient-magnitude keys
(``gmt``) on CPU the kernel masks and folds the mask in blocks of 8,192 entries, with the block's mask
on the stack (:meth:`CoverageTracker.apply_and_observe`); otherwise updating takes the step's mask as
one byte per entry of the tensor being masked (the record strict mode keeps), one buffer reused from
tensor to tensor (strict mode keeps its own). Under FSDP2 and DeepSpeed ZeRO each rank keeps the bits of its own shard or
partition, and the counts are summed over the ranks with the masked counts.

Mask stability (the Jaccard similarity of consecutive masks) needs no further read: with ``changed``
entries whose masked state differs, ``|prev AND cur| = (|prev| + |cur| - changed) / 2``. The tracker
keeps each tensor's masked count of its last step (:meth:`CoverageTracker.note_masked`) for ``|prev|``;
where that count is missing (a state saved before it was kept) it is the popcount of the previous bits.

The state is part of :meth:`GradientMasker.state_dict`, so a resumed run continues coverage, churn
and mask stability exactly where the checkpoint left them.
"""

from __future__ import annotations

from typing import Any

import torch

from gmt_plugins.engine import dispatch

class CoverageTracker:
    """The two packed bit sets of every tensor, by parameter name (see the module doc)."""

    def __init__(self) -> None:
        self.updated: dict[str, torch.Tensor] = {}
        """Bit set: updated (not masked) at least once."""
        self.previous: dict[str, torch.Tensor] = {}
        """Bit set: masked at the last step the tensor was masked."""
        self.numel: dict[str, int] = {}
        self.masked: dict[str, int] = {}
        """Entries masked at the last step the tensor was masked (what ``previous`` holds, counted)."""
        self._before: dict[str, int | None] = {}

    def observe(self, name: str, numel: int, mask: torch.Tensor | None, device: torch.device) -> tuple[int, int | None]:
        """Fold one step's mask of tensor ``name`` in: ``mask`` is a flat bool tensor of ``numel``
        entries (True = masked), or ``None`` when every entry is masked (a frozen tensor).

        Returns ``(updated, changed)``: entries updated at least once so far, and entries whose masked
        state differs from the previous step's (``None`` the first time the tensor is seen).
        """
        self._check_numel(name, numel)
        before = self._previous_count(name)
        updated, previous, count, changed = dispatch.observe_coverage(mask, numel, self.updated.get(name), self.previous.get(name), device)
        self.updated[name], self.previous[name], self.numel[name] = updated, previous, numel
        self._folded(name, before)
        return count, changed

    def apply_and_observe(
        self, name: str, source: Any, index: int, flat: torch.Tensor, cut: Any, ranking: Any = None, energy: Any = None
    ) -> tuple[dispatch.Applied, tuple[int, int | None]] | None:
        """Zero what ``cut`` selects of ``flat`` and fold its mask in, in one pass that never holds the
        mask as a byte per entry (:func:`gmt_plugins.engine.dispatch.apply_tracked`, which adds to
        ``energy`` too); the twin of an apply with a record followed by :meth:`observe`. ``None`` where
        the engine does not serve it (nothing is changed then)."""
        numel = flat.numel()
        self._check_numel(name, numel)
        before = self._previous_count(name)
        bits = dispatch.tracked_bits(self.updated.get(name), self.previous.get(name), numel)
        done = dispatch.apply_tracked(source, index, flat, cut, bits, ranking=ranking, energy=energy)
        if done is None:
            return None
        self.updated[name], self.previous[name], self.numel[name] = bits.updated, bits.previous, numel
        self._folded(name, before)
        applied, set_bits, changed = done
        return applied, (set_bits, None if bits.first else changed)

    def note_masked(self, name: str, masked: int) -> int | None:
        """Record how many entries of ``name`` the step just folded in masked; returns the count of the
        step before it (``|prev|`` of the Jaccard similarity), ``None`` the first time."""
        self.masked[name] = int(masked)
        return self._before.pop(name, None)

    def _previous_count(self, name: str) -> int | None:
        """Entries set in ``name``'s previous bits: the noted count, else counted from the bits."""
        if name not in self.previous:
            return None
        noted = self.masked.get(name)
        return noted if noted is not None else _popcount(self.previous[name])

    def _folded(self, name: str, before: int | None) -> None:
        # the noted count described the bits just replaced: the caller notes the new one
        self._before[name] = before
        self.masked.pop(name, None)

    def _check_numel(self, name: str, numel: int) -> None:
        known = self.numel.get(name)
        if known is not None and known != numel:
            raise ValueError(f"coverage state of {name!r} holds {known} entries, its gradient now has {numel}")

    def state_dict(self) -> dict[str, Any]:
        """Copies of the bit sets: the kernel updates the tracker's own bytes in place."""
        return {
            "updated": {name: bits.clone() for name, bits in self.updated.items()},
            "previous": {name: bits.clone() for name, bits in self.previous.items()},
            "numel": dict(self.numel),
            "masked": dict(self.masked),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = set(state.get("numel", {}))
        if set(state.get("updated", {})) != names or set(state.get("previous", {})) != names:
            raise ValueError("coverage state is inconsistent: its 'updated', 'previous' and 'numel' name different tensors")
        for name in names:
            expected = (int(state["numel"][name]) + 7) // 8
            for part in ("updated", "previous"):
                tensor = state[part][name]
                if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.numel() != expected:
                    raise ValueError(f"coverage state {part!r} of {name!r} is not {expected} packed bytes")
        self.updated = {name: state["updated"][name].clone() for name in names}  # the kernel writes into them
        self.previous = {name: state["previous"][name].clone() for name in names}
        self.numel = {name: int(state["numel"][name]) for name in names}
        # a state saved before the counts were kept has none: they are counted from the bits when needed
        masked = state.get("masked", {})
        if not set(masked) <= names or any(not 0 <= int(c) <= self.numel[name] for name, c in masked.items()):
            raise ValueError("coverage state 'masked' must hold, for tensors of 'numel' only, counts within their sizes")
        self.masked = {name: int(c) for name, c in masked.items()}
        self._before = {}

    def memory_bytes(self) -> int:
        """Bytes the two bit sets take now."""
        return sum(t.numel() for t in self.updated.values()) + sum(t.numel() for t in self.previous.values())


_BYTE_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)


def _popcount(packed: torch.Tensor) -> int:
    """Set bits of a packed uint8 bit set (the bits past its entries are 0)."""
    return int(_BYTE_POPCOUNT.to(packed.device)[packed.long()].sum())


def layer_of(name: str) -> str:
    """The layer a parameter belongs to, for per-layer statistics: the name cut after its first
    all-digit component (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), or, with no
    such component, before its last one (``model.embed_tokens.weight`` -> ``model.embed_tokens``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isascii() and part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name
