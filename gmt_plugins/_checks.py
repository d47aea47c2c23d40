"""Checks of how :class:`~gmt_plugins.masker.GradientMasker` is called, with messages that say what to do."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch

# Frames in these folders are library code between the user's line and a warning: a warning points past them.
_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)
_FRAMEWORKS = ("transformers", "trl", "accelerate", "pluggy")


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function point at the first frame
    outside gmt_plugins, torch and the training frameworks that call it (the user's own line)."""
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and _is_library(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def _is_library(filename: str) -> bool:
    if filename.startswith(_LIBRARY_DIRS) or filename.startswith("<frozen"):
        return True
    parts = filename.split(os.sep)
    return any(name in parts[-4:-1] for name in _FRAMEWORKS) and "site-packages" in parts


def named_parameters_source(source: Any) -> torch.nn.Module | list[tuple[str, Any]]:
    """``source`` as the masker takes it: a module, or a list of ``(name, parameter)`` pairs; a ``TypeError``
    saying what is accepted otherwise (a bare tensor list, a dict, a string ...)."""
    if isinstance(source, torch.nn.Module):
        return source
    accepted = (
        "GradientMasker takes a torch.nn.Module or an iterable of (name, parameter) pairs, e.g. "
        "GradientMasker(model) or GradientMasker(model.named_parameters())"
    )
    if isinstance(source, (torch.Tensor, str, bytes, dict)) or not isinstance(source, Iterable):
        hint = " (for a dict, pass dict.items())" if isinstance(source, dict) else ""
        raise TypeError(f"{accepted}; got {type(source).__name__}{hint}")
    pairs = list(source)
    for i, item in enumerate(pairs):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"{accepted}; entry {i} is {_describe(item)}, not a (str, Parameter) pair")
    return pairs


def _describe(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"a bare {type(item).__name__} of shape {tuple(item.shape)}"
    if isinstance(item, tuple):
        return f"a tuple of {len(item)} ({', '.join(type(x).__name__ for x in item)})"
    return f"a {type(item).__name__}"


def warn_if_no_gradient(masker: Any, found: int, without_grad: list[str]) -> None:
    """Warn once per masker when a masking call finds no gradient on any selected parameter: it then masks
    nothing, which is never what the caller meant."""
    frozen = masker._frozen[1] if masker._frozen is not None else frozenset()  # the strategy took their .grad
    if found or all(name in frozen for name in without_grad) or getattr(masker, "_warned_no_gradient", False):
        return
    masker._warned_no_gradient = True
    warnings.warn(
        f"GradientMasker found no gradient on any of its {len(without_grad)} selected parameter(s) (every .grad is "
        "None), so nothing was masked. apply() masks the gradients of the current step: call it after "
        "loss.backward() and before optimizer.step() and optimizer.zero_grad() (which sets .grad to None); if "
        "the optimizer already stepped, or a hook consumed the gradients (optimizer-in-backward), there is "
        "nothing left to mask",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
