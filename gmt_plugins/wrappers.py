"""Removing the wrappers that DDP, FSDP1, DeepSpeed, ``DataParallel`` and ``torch.compile`` put around a model.

Each wrapper is recognised by its type, never by an attribute name: a model may well have an ordinary
submodule called ``module`` (or ``_orig_mod``) next to others, and all of them must be masked.
"""

from __future__ import annotations

import sys

import torch

_DEEPSPEED_ENGINE = ("deepspeed.runtime.engine", "DeepSpeedEngine")
_COMPILED = ("torch._dynamo.eval_frame", "OptimizedModule")


def _has_base(model: object, module: str, name: str) -> bool:
    # By name along the MRO, so that neither deepspeed nor torch._dynamo has to be imported to ask.
    return any(cls.__module__ == module and cls.__qualname__ == name for cls in type(model).__mro__)


def _fsdp1_class() -> type | None:
    if "torch.distributed.fsdp" not in sys.modules:  # nothing can be wrapped in FSDP1 before it is imported
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def wrapped_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module ``model`` wraps, if ``model`` is one of the known wrappers; else ``None``."""
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return model.module
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and isinstance(model, fsdp1):
        return model.module
    if _has_base(model, *_DEEPSPEED_ENGINE):
        return model.module
    if _has_base(model, *_COMPILED):
        return model._orig_mod
    return None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Remove DDP / FSDP1 / DeepSpeed / ``DataParallel`` / ``torch.compile`` wrappers, however nested."""
    while True:
        inner = wrapped_module(model)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            return model
        model = inner
