"""Checking a loaded masker state against the parameters it is about to drive, before any step uses it.

A strategy's state is a tree of dicts, lists, numbers and tensors. Two things in it are checked
without knowing the strategy:

* every floating-point tensor is finite: strategies keep only finite numbers (non-finite gradients are
  skipped when state is updated), so NaN or inf in a saved state is damage, and left in place it
  would silently decide masks at every later step;
* a dict of tensors with a key among the selected parameter names is a per-parameter map: every key
  must name a selected parameter, each tensor must be floating-point or bool, and, where the
  parameters are whole tensors in this process, hold as many entries as its parameter.

Errors are :class:`~gmt_plugins.state_io.StateFileError` naming the file (``source``) and the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gmt_plugins.engine import dispatch
from gmt_plugins.state_io import StateFileError

_RESUME_ELSEWHERE = "resume from another checkpoint"


def check_loaded_state(state: Any, parameters: Sequence[tuple[str, Any]], *, source: str, whole: bool) -> None:
    """Refuse ``state`` (a masker's :meth:`state_dict`, as loaded from ``source``) when it holds non-finite
    numbers, or per-parameter tensors for parameters this run does not select or of another size.

    ``whole`` says the selected parameters are the full tensors the state describes (not FSDP shards or
    DeepSpeed partitions, whose state is per rank and sized by the local slice).
    """
    for path, tensor in _tensors(state, ""):
        _check_finite(tensor, path, source)
    strategy_state = state.get("strategy_state") if isinstance(state, dict) else None
    if strategy_state is None:
        return
    sizes = {name: _whole_numel(param) if whole else None for name, param in parameters}
    for path, mapping in _maps(strategy_state, "['strategy_state']"):
        if not any(key in sizes for key in mapping):
            continue
        for key, tensor in mapping.items():
            _check_entry(key, tensor, f"{path}[{key!r}]", sizes, source)


def _check_finite(tensor: torch.Tensor, path: str, source: str) -> None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    bad = dispatch.count_nonfinite(tensor.reshape(-1))
    if bad:
        raise StateFileError(
            f"{source}: {path} holds {bad} NaN/inf value(s) among {tensor.numel()}; a strategy keeps only finite "
            f"numbers, so the saved state is damaged: {_RESUME_ELSEWHERE}"
        )


def _check_entry(key: str, tensor: torch.Tensor, path: str, sizes: dict[str, int | None], source: str) -> None:
    if key not in sizes:
        raise StateFileError(
            f"{source}: {path} is state for parameter {key!r}, which this run does not select ({len(sizes)} selected, "
            f"e.g. {sorted(sizes)[:3]}); the state was saved for another model or include/exclude patterns: "
            f"{_RESUME_ELSEWHERE}"
        )
    if not (tensor.is_floating_point() or tensor.dtype == torch.bool):
        raise StateFileError(f"{source}: {path} has dtype {tensor.dtype}; per-parameter state is floating-point or bool: {_RESUME_ELSEWHERE}")
    expected = sizes[key]
    if expected is not None and tensor.numel() != expected:
        raise StateFileError(
            f"{source}: {path} has shape {tuple(tensor.shape)} ({tensor.numel()} entries), parameter {key!r} has "
            f"{expected} entries; the state was saved for another model: {_RESUME_ELSEWHERE}"
        )


def _whole_numel(param: Any) -> int | None:
    """The parameter's entry count when it is a plain, whole tensor here; ``None`` for shards and partitions."""
    from gmt_plugins.distributed import is_dtensor

    if not isinstance(param, torch.Tensor) or is_dtensor(param) or hasattr(param, "ds_numel"):
        return None
    return param.numel()


def _tensors(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path or "<root>", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}[{i}]")


def _maps(value: Any, path: str) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Every non-empty dict whose values are all tensors, with where it sits."""
    if isinstance(value, dict):
        if value and all(isinstance(v, torch.Tensor) for v in value.values()):
            yield path, value
            return
        for key, item in value.items():
            yield from _maps(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _maps(item, f"{path}[{i}]")
