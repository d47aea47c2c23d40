"""Saving masker/strategy state with a checkpoint: tensors to safetensors, everything else to JSON.

Nothing is pickled, so loading a checkpoint never executes code from it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

STEM = "gmt_state"
_TENSOR_REF = "__tensor__"


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR_REF: path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"state keys must be strings at {path or '<root>'}")
        return {k: _split(v, f"{path}.{k}" if path else k, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state value at {path!r} has type {type(value).__name__}; use tensors, numbers, strings, lists or dicts")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            return tensors[value[_TENSOR_REF]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_state(state: dict[str, Any], directory: str, *, stem: str = STEM) -> None:
    """Write ``state`` into ``directory`` as ``<stem>.json`` (+ ``<stem>.safetensors`` if it holds tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    os.makedirs(directory, exist_ok=True)
    if tensors:
        save_file(tensors, os.path.join(directory, f"{stem}.safetensors"))
    with open(os.path.join(directory, f"{stem}.json"), "w") as f:
        json.dump(skeleton, f, indent=1, sort_keys=True)


def has_state(directory: str, *, stem: str = STEM) -> bool:
    return os.path.isfile(os.path.join(directory, f"{stem}.json"))


def load_state(directory: str, *, stem: str = STEM) -> dict[str, Any]:
    """Read what :func:`save_state` wrote."""
    with open(os.path.join(directory, f"{stem}.json")) as f:
        skeleton = json.load(f)
    tensor_path = os.path.join(directory, f"{stem}.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    if os.path.isfile(tensor_path):
        from safetensors.torch import load_file

        tensors = load_file(tensor_path)
    return _join(skeleton, tensors)
