"""Sparse differences between a fine-tuned model and its base: compute, save, load, add, apply.

A sparse fine-tuning (``lt_sft``, ``spiel``, or any strategy that leaves most entries where they
started) is fully described by the entries that moved: per tensor, their flat indices and how far
they moved. Such differences are small, can be shipped without the base model, and compose by
addition (Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual Transfer",
https://arxiv.org/abs/2110.07560: a language difference plus a task difference applied to one base).

The file format is one safetensors file: ``<name>.indices`` (int64, flat, ascending, unique) and
``<name>.values`` (float32) per tensor, and the tensor shapes as JSON in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

FORMAT = "gmt_plugins.sparse_delta/1"

Tensors = Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class TensorDelta:
    """The moved entries of one tensor: ``flat[indices] += values``."""

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        if self.indices.dtype != torch.int64 or self.indices.dim() != 1 or self.values.shape != self.indices.shape:
            raise ValueError("a TensorDelta needs 1-D int64 indices and values of the same length")

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def to_dense(self) -> torch.Tensor:
        """The difference as a dense float32 tensor (the obviously correct twin of :meth:`add_to`)."""
        dense = torch.zeros(self.numel, dtype=torch.float32)
        for i, v in zip(self.indices.tolist(), self.values.float().tolist()):
            dense[i] += v
        return dense.view(self.shape)

    @torch.no_grad()
    def add_to(self, tensor: torch.Tensor, *, scale: float = 1.0) -> None:
        """``tensor += scale * difference``, in place, computed in float32 on the moved entries only."""
        if tuple(tensor.shape) != self.shape:
            raise ValueError(f"difference has shape {self.shape}, the tensor {tuple(tensor.shape)}")
        flat = tensor.view(-1)
        index = self.indices.to(flat.device)
        flat[index] = (flat[index].float() + scale * self.values.to(flat.device, torch.float32)).to(flat.dtype)


@dataclass
class SparseDelta:
    """Sparse differences of several tensors, by name."""

    tensors: dict[str, TensorDelta] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        """Entries stored over all tensors."""
        return sum(int(t.indices.numel()) for t in self.tensors.values())

    def __add__(self, other: SparseDelta) -> SparseDelta:
        return add_sparse_deltas(self, other)


def _named(tensors: Tensors) -> dict[str, torch.Tensor]:
    if isinstance(tensors, torch.nn.Module):
        return dict(tensors.named_parameters())
    return dict(tensors)


@torch.no_grad()
def sparse_difference(
    tuned: Tensors, base: Tensors, *, names: Iterable[str] | None = None, supports: Mapping[str, torch.Tensor] | None = None
) -> SparseDelta:
    """The entries of ``tuned`` that differ from ``base`` (models or ``{name: tensor}`` dicts).

    ``names`` restricts the tensors compared (default: every tensor of ``tuned`` that ``base`` has).
    ``supports`` (bool tensors by name) stores exactly those entries instead, moved or not (the
    fixed mask of a strategy). Values are ``tuned - base`` in float32.
    """
    tuned_t, base_t = _named(tuned), _named(base)
    out = SparseDelta()
    for name in list(names) if names is not None else [n for n in tuned_t if n in base_t]:
        if name not in tuned_t or name not in base_t:
            raise KeyError(f"tensor {name!r} is missing from {'tuned' if name not in tuned_t else 'base'}")
        t, b = tuned_t[name].detach(), base_t[name].detach().to(tuned_t[name].device)
        if t.shape != b.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)} tuned but {tuple(b.shape)} in the base")
        diff = t.reshape(-1).float() - b.reshape(-1).float()
        if supports is not None and name in supports:
            chosen = supports[name].reshape(-1).to(diff.device)
        else:
            chosen = t.reshape(-1) != b.reshape(-1)
            chosen |= torch.isnan(t.reshape(-1)) != torch.isnan(b.reshape(-1))
        indices = chosen.nonzero().view(-1)
        if indices.numel() or (supports is not None and name in supports):
            out.tensors[name] = TensorDelta(tuple(t.shape), indices.cpu(), diff[indices].cpu())
    return out


def add_sparse_deltas(*deltas: SparseDelta) -> SparseDelta:
    """The sum of sparse differences (composition): union of the indices, values added in float32."""
    out = SparseDelta()
    for name in dict.fromkeys(n for d in deltas for n in d.tensors):
        parts = [d.tensors[name] for d in deltas if name in d.tensors]
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"differences of {name!r} have different shapes {sorted(shapes)}")
        indices = torch.cat([p.indices for p in parts])
        values = torch.cat([p.values.float() for p in parts])
        unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
        summed = torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, values)
        out.tensors[name] = TensorDelta(parts[0].shape, unique, summed)
    return out


@torch.no_grad()
def apply_sparse_delta(target: Tensors, delta: SparseDelta, *, scale: float = 1.0) -> None:
    """Add ``scale * delta`` into the parameters of a model (or a ``{name: tensor}`` dict), in place.

    Every tensor of ``delta`` must exist in ``target`` with the same shape (a ``KeyError`` or
    ``ValueError`` names it otherwise). ``scale=-1`` removes a difference again (up to rounding).
    """
    tensors = _named(target)
    missing = [n for n in delta.tensors if n not in tensors]
    if missing:
        raise KeyError(f"the target has no tensors {missing[:5]} that the difference changes")
    for name, part in delta.tensors.items():
        part.add_to(tensors[name].data if isinstance(tensors[name], torch.nn.Parameter) else tensors[name], scale=scale)


def save_sparse_delta(delta: SparseDelta, path: str) -> None:
    """Write ``delta`` to one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, part in delta.tensors.items():
        tensors[f"{name}.indices"] = part.indices.contiguous().cpu()
        tensors[f"{name}.values"] = part.values.float().contiguous().cpu()
    shapes = {name: list(part.shape) for name, part in delta.tensors.items()}
    save_file(tensors, path, metadata={"format": FORMAT, "shapes": json.dumps(shapes)})


def load_sparse_delta(path: str) -> SparseDelta:
    """Read what :func:`save_sparse_delta` wrote."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sparse difference written by gmt_plugins (format {metadata.get('format')!r})")
        shapes = json.loads(metadata["shapes"])
        return SparseDelta(
            {name: TensorDelta(tuple(shape), f.get_tensor(f"{name}.indices"), f.get_tensor(f"{name}.values")) for name, shape in shapes.items()}
        )
