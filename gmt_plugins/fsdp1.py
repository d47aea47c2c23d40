"""Exact masks under FSDP1 (``FullyShardedDataParallel``): original parameters inside flat parameters.

FSDP1 concatenates the parameters of each wrapped module into one ``FlatParameter`` (plus
alignment padding), splits that flat tensor into equal contiguous parts, and keeps part ``r`` on
rank ``r``. After backward each rank's ``flat_param.grad`` is its part of the reduced flat
gradient. An original parameter therefore owns, on each rank, at most one contiguous run of that
flat shard, and the run is a contiguous range ``[offset, offset + n)`` of the original tensor's
flat order: exactly what :class:`gmt_plugins.distributed.ShardInfo` describes for FSDP2. FSDP1
records both positions per original parameter (``_shard_param_infos``: the run in the shard and
the intra-parameter start), so each original parameter becomes a :class:`FlatSlice` and the
FSDP2 machinery (histograms summed over the shard group, tie budgets by flat offset, summed
counts) makes the mask that of the full tensor. Padding belongs to no parameter and is never
ranked.

This holds for ``use_orig_params=True`` (the original parameters' ``.grad`` are views of the same
flat gradient; on a rank that holds none of a parameter its ``.grad`` is ``None``, so the flat
gradient, identical in shape on every rank, is read instead) and for ``use_orig_params=False``
(only the flat parameters are visible: each is split into its original parameters here, named
as in the unwrapped model). ``NO_SHARD`` keeps whole flat gradients, all-reduced: the slices are
then whole tensors and nothing is reduced.

FSDP1 is recognised by type (``FullyShardedDataParallel`` modules, ``FlatParameter``), and its
metadata is read from the wrapped modules' handles, so the masker must be given the FSDP-wrapped
model (``GMTCallback`` is: the Trainer passes it), not a list of named parameters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.distributed import ShardInfo

_SWITCH = (
    "or train with FSDP2: TrainingArguments(fsdp='full_shard', fsdp_config={'fsdp_version': 2}), "
    "or 'fsdp_version: 2' in the accelerate config"
)


@dataclass(frozen=True, eq=False)
class FlatSlice:
    """Original parameter ``index`` of an FSDP1 flat parameter, as this rank holds it."""

    flat_param: torch.nn.Parameter
    index: int
    group: Any
    """The process group over which the flat parameter is sharded; ``None`` for ``NO_SHARD``."""

    def numel(self) -> int:
        """Entries of the full original parameter."""
        return int(self.flat_param._numels[self.index])

    def local(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor, ShardInfo | None, Any]:
        """``(gradient, parameter, shard, group)``: flat views of this rank's run of the original
        parameter in its flat parameter's local shard (empty when the rank holds none of it)."""
        flat_param, grad = self.flat_param, self.flat_param.grad
        info = flat_param._shard_param_infos[self.index]
        start, count, offset = (info.offset_in_shard, info.numel_in_shard, info.intra_param_start_idx) if info.in_shard else (0, 0, 0)
        data = flat_param.detach()
        if grad is not None and grad.shape != data.shape:
            raise ValueError(
                f"the FSDP1 flat gradient holding {name!r} has shape {tuple(grad.shape)} but its flat parameter "
                f"{tuple(data.shape)}; GMT masks the sharded gradient after backward, " + _SWITCH
            )
        if count and start + count > data.numel():
            raise RuntimeError(f"FSDP1 run of {name!r} at {start} with {count} entries exceeds the shard's {data.numel()}")
        param = data[start : start + count]
        grad = None if grad is None else grad.detach().view(-1)[start : start + count]
        shard = None if self.group is None else ShardInfo(offset=int(offset), full_numel=self.numel())
        return grad, param, shard, self.group


def _fsdp_class() -> type | None:
    # FSDP1 cannot wrap a model unless its module was imported: no import (and no cost) otherwise
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def is_flat_parameter(param: Any) -> bool:
    if _fsdp_class() is None:
        return False
    from torch.distributed.fsdp._flat_param import FlatParameter

    return isinstance(param, FlatParameter)


class Layout:
    """Every FSDP1 flat parameter of a model: which original parameters it holds, under which names."""

    def __init__(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp._common_utils import clean_tensor_name

        fsdp = _fsdp_class()
        self.slices: dict[int, tuple[str, FlatSlice]] = {}
        """``id`` of an original parameter (``use_orig_params=True``) -> its clean name and slice."""
        self.flats: dict[int, list[tuple[str, FlatSlice]]] = {}
        """``id`` of a flat parameter -> its original parameters, in flat order."""
        for prefix, module in model.named_modules():
            if not isinstance(module, fsdp) or module._flat_param is None:
                continue
            flat_param = module._flat_param
            group = None if module.sharding_strategy == ShardingStrategy.NO_SHARD else module.process_group
            base = clean_tensor_name(prefix + "." if prefix else "")
            originals = [(clean_tensor_name(base + fqn), FlatSlice(flat_param, i, group)) for i, fqn in enumerate(flat_param._fqns)]
            self.flats[id(flat_param)] = originals
            for param, named in zip(flat_param._params or (), originals):
                self.slices[id(param)] = named

    @classmethod
    def of(cls, model: torch.nn.Module) -> Layout | None:
        """The layout of ``model``'s FSDP1 modules, or ``None`` when it holds none."""
        fsdp = _fsdp_class()
        if fsdp is None or not any(isinstance(m, fsdp) for m in model.modules()):
            return None
        return cls(model)

    def expand(self, candidates: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, Any]]:
        """Replace FSDP1-managed candidates by :class:`FlatSlice`s under their original names: a flat
        parameter by all of its original parameters, an original parameter by its own slice."""
        expanded: list[tuple[str, Any]] = []
        for name, param in candidates:
            if id(param) in self.flats:
                expanded.extend(self.flats[id(param)])
            elif id(param) in self.slices:
                expanded.append(self.slices[id(param)])
            elif is_flat_parameter(param):
                raise ValueError(f"{name!r} is an FSDP1 flat parameter of no FullyShardedDataParallel module of the model given")
            else:
                expanded.append((name, param))
        return expanded


def refuse_named_flat_parameters(candidates: list[tuple[str, Any]]) -> None:
    """Named parameters (no model) cannot be mapped back to FSDP1's original parameters."""
    for name, param in candidates:
        if is_flat_parameter(param):
            raise ValueError(
                f"{name!r} is an FSDP1 FlatParameter: GradientMasker can mask FSDP1 gradients exactly only when given "
                "the FullyShardedDataParallel-wrapped model (GradientMasker(fsdp_model)), not named parameters, " + _SWITCH
            )
