"""Gradient-Mask Tuning (GMT) and related selective-update methods for the Hugging Face stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gmt_plugins.config import GMTConfig
from gmt_plugins.hookspecs import hookimpl, hookspec
from gmt_plugins.masker import GradientMasker
from gmt_plugins.plugins import get_plugin_manager, make_plugin_manager, strategy_registry
from gmt_plugins.sparse_adamw import SparseAdamW, strategy_masks
from gmt_plugins.stats import MaskStats, TensorStats
from gmt_plugins.strategies.base import KeyedStrategy, MaskStrategy

if TYPE_CHECKING:
    from gmt_plugins.integrations.transformers import GMTCallback, place_before_reporters

__version__ = "0.1.0"

__all__ = [
    "GMTCallback",
    "GMTConfig",
    "GradientMasker",
    "KeyedStrategy",
    "MaskStats",
    "MaskStrategy",
    "SparseAdamW",
    "TensorStats",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "make_plugin_manager",
    "place_before_reporters",
    "strategy_masks",
    "strategy_registry",
]

_LAZY = {"GMTCallback": "gmt_plugins.integrations.transformers", "place_before_reporters": "gmt_plugins.integrations.transformers"}


def __getattr__(name: str) -> Any:
    # transformers is imported only when the callback is first asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gmt_plugins' has no attribute {name!r}")
