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

The state is part of :meth:`GradientMasker.state_dict`, so a resumed run continues coverage and churn
exactly where the checkpoint left them.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from gmt_plugins import native

_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_POPCOUNT: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return _WEIGHTS[device]


def _popcount_table(device: torch.device) -> torch.Tensor:
    if device not in _POPCOUNT:
        table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
        _POPCOUNT[device] = table.to(device)
    return _POPCOUNT[device]


# Byte j of a little-endian word lands on bit 56 + j: 0x01 bytes never carry into each other.
_GATHER = 0x0102040810204080
_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor of ``n`` entries as ``ceil(n / 8)`` bytes: entry ``i`` is bit ``i % 8`` of
    byte ``i // 8``; the bits past ``n`` are 0.

    Eight bools are one 64-bit word; one multiply gathers their low bits into the top byte (little-endian
    layouts; elsewhere, and as the reference twin, :func:`pack_bits_reference`).
    """
    n = mask.numel()
    if n % 8:
        mask = torch.cat([mask, mask.new_zeros((-n) % 8)])
    if sys.byteorder != "little":
        return pack_bits_reference(mask)
    words = mask.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)  # the top byte: the shift's sign bits fall away


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` by weighted sums of bytes."""
    n = mask.numel()
    if n % 8:
        mask = torch.cat([mask, mask.new_zeros((-n) % 8)])
    return (mask.view(-1, 8).to(torch.uint8) * _weights(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: a flat bool tensor of ``n`` entries."""
    return ((packed.unsqueeze(1) & _weights(packed.device)) != 0).view(-1)[:n]


def popcount(packed: torch.Tensor) -> int:
    """Set bits of a uint8 tensor: bit-parallel counts on 64-bit words (the bytes padded to a multiple of 8)."""
    n = packed.numel()
    if not n:
        return 0
    if n % 8:
        packed = torch.cat([packed, packed.new_zeros((-n) % 8)])
    x = packed.contiguous().view(torch.int64)
    x = x - ((x >> 1) & _M1)  # arithmetic shifts: the masks clear the sign bits they bring in
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return int((((x * _H01) >> 56) & 0xFF).sum().item())


def popcount_reference(packed: torch.Tensor) -> int:
    """:func:`popcount` by a table of the 256 byte values."""
    return int(_popcount_table(packed.device)[packed.long()].sum().item()) if packed.numel() else 0


class CoverageTracker:
    """The two packed bit sets of every tensor, by parameter name (see the module doc)."""

    def __init__(self) -> None:
        self.updated: dict[str, torch.Tensor] = {}
        """Bit set: updated (not masked) at least once."""
        self.previous: dict[str, torch.Tensor] = {}
        """Bit set: masked at the last step the tensor was masked."""
        self.numel: dict[str, int] = {}

    def observe(self, name: str, numel: int, mask: torch.Tensor | None, device: torch.device) -> tuple[int, int | None]:
        """Fold one step's mask of tensor ``name`` in: ``mask`` is a flat bool tensor of ``numel``
        entries (True = masked), or ``None`` when every entry is masked (a frozen tensor).

        Returns ``(updated, changed)``: entries updated at least once so far, and entries whose masked
        state differs from the previous step's (``None`` the first time the tensor is seen).
        """
        self._check_numel(name, numel)
        lib = native.library() if device.type == "cpu" and (mask is None or _native_mask(mask, numel)) else None
        if lib is not None:
            return self._observe_native(lib, name, numel, mask)
        return self._observe_torch(name, numel, mask, device)

    def _observe_native(self, lib: Any, name: str, numel: int, mask: torch.Tensor | None) -> tuple[int, int | None]:
        """:meth:`observe` in one pass of the compiled kernel (``gmt_coverage_observe``)."""
        first, updated, previous = self._kernel_bits(name, numel)
        out = torch.zeros(2, dtype=torch.int64)
        lib.gmt_coverage_observe(
            None if mask is None else mask.data_ptr(), numel, updated.data_ptr(), previous.data_ptr(), int(first), out.data_ptr()
        )
        self.updated[name], self.previous[name], self.numel[name] = updated, previous, numel
        return int(out[0]), None if first else int(out[1])

    def apply_and_observe(
        self, lib: Any, name: str, flat: torch.Tensor, keys: Any, threshold: int, ties: int
    ) -> tuple[tuple[int, int, int], tuple[int, int | None]] | None:
        """Zero what a cut selects of the CPU gradient ``flat`` (magnitude keys ``keys``, a
        :class:`~gmt_plugins.native_rank.NativeKeys`) and fold its mask in, in one kernel call that
        never holds the mask as a byte per entry (``gmt_apply_tracked``); the twin of
        ``apply_cut_counted`` with a record followed by :meth:`observe`. Returns ``((masked,
        ties_used, masked_nonzero), (updated, changed))``, or ``None`` when the kernel does not serve
        these keys (nothing is changed then)."""
        from gmt_plugins import native_rank

        numel = flat.numel()
        self._check_numel(name, numel)
        first, updated, previous = self._kernel_bits(name, numel)
        done = native_rank.apply_tracked(lib, flat, keys, threshold, ties, updated, previous, first)
        if done is None:
            return None
        self.updated[name], self.previous[name], self.numel[name] = updated, previous, numel
        masked, used, nonzero, set_bits, changed = done
        return (masked, used, nonzero), (set_bits, None if first else changed)

    def _check_numel(self, name: str, numel: int) -> None:
        known = self.numel.get(name)
        if known is not None and known != numel:
            raise ValueError(f"coverage state of {name!r} holds {known} entries, its gradient now has {numel}")

    def _kernel_bits(self, name: str, numel: int) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """Whether ``name`` is new, and its two bit sets as CPU bytes the kernel may write in place."""
        nbytes = (numel + 7) // 8
        return name not in self.previous, _own_bytes(self.updated.get(name), nbytes), _own_bytes(self.previous.get(name), nbytes)

    def _observe_torch(self, name: str, numel: int, mask: torch.Tensor | None, device: torch.device) -> tuple[int, int | None]:
        """:meth:`observe` by torch operations on packed bytes: any device, and the twin of the kernel."""
        packed_mask = pack_bits(mask) if mask is not None else _all_set(numel, device)
        updated = self.updated.get(name)
        kept = _all_set(numel, device) & ~packed_mask  # padding bits stay 0
        updated = kept if updated is None else updated.to(device) | kept
        previous = self.previous.get(name)
        changed = None if previous is None else popcount(previous.to(device) ^ packed_mask)
        self.updated[name], self.previous[name], self.numel[name] = updated, packed_mask, numel
        return popcount(updated), changed

    def state_dict(self) -> dict[str, Any]:
        """Copies of the bit sets: the kernel updates the tracker's own bytes in place."""
        return {
            "updated": {name: bits.clone() for name, bits in self.updated.items()},
            "previous": {name: bits.clone() for name, bits in self.previous.items()},
            "numel": dict(self.numel),
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

    def memory_bytes(self) -> int:
        """Bytes the two bit sets take now."""
        return sum(t.numel() for t in self.updated.values()) + sum(t.numel() for t in self.previous.values())


def _native_mask(mask: torch.Tensor, numel: int) -> bool:
    return mask.device.type == "cpu" and mask.dtype == torch.bool and mask.is_contiguous() and mask.numel() == numel


def _own_bytes(packed: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    """A contiguous CPU uint8 tensor of ``nbytes`` the kernel may write: the tracker's own ``packed``
    (``state_dict`` and ``load_state_dict`` copy, so nobody else holds it), else zeros."""
    if packed is None:
        return torch.zeros(nbytes, dtype=torch.uint8)
    return packed.to("cpu").contiguous()


def _all_set(numel: int, device: torch.device) -> torch.Tensor:
    """Packed bits with the first ``numel`` set and the padding clear."""
    packed = torch.full(((numel + 7) // 8,), 255, dtype=torch.uint8, device=device)
    if numel % 8:
        packed[-1] = (1 << (numel % 8)) - 1
    return packed


def layer_of(name: str) -> str:
    """The layer a parameter belongs to, for per-layer statistics: the name cut after its first
    all-digit component (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), or, with no
    such component, before its last one (``model.embed_tokens.weight`` -> ``model.embed_tokens``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isascii() and part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name
