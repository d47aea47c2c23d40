"""Building the plugin manager: built-ins first, then the ``gmt_plugins`` entry points."""

from __future__ import annotations

import importlib
import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

from gmt_plugins import hookspecs
from gmt_plugins.optimizers import OptimizerInfo, unwrap_optimizer
from gmt_plugins.registry import StrategyRegistry

if TYPE_CHECKING:
    from gmt_plugins.config import GMTConfig

ENTRY_POINT_GROUP = "gmt_plugins"
BLOCK_ENV = "GMT_PLUGINS_BLOCK"

DEFAULT_PLUGINS = (
    "gmt_plugins.strategies.gmt",
    "gmt_plugins.strategies.random",
    "gmt_plugins.strategies.hft",
    "gmt_plugins.strategies.sift",
    "gmt_plugins.strategies.id3",
    "gmt_plugins.strategies.lift",
    "gmt_plugins.strategies.spt",
    "gmt_plugins.strategies.lisa",
    "gmt_plugins.strategies.ist",
    "gmt_plugins.strategies.gmt_momentum",
    "gmt_plugins.strategies.sara",
    "gmt_plugins.strategies.dsee",
    "gmt_plugins.strategies.spiel",
    "gmt_plugins.strategies.lt_sft",
    "gmt_plugins.integrations.torch_defaults",
    "gmt_plugins.integrations.peft",
    "gmt_plugins.integrations.bitsandbytes",
    "gmt_plugins.integrations.trainer_checks",
    "gmt_plugins.integrations.freezing_checks",
)

_default: pluggy.PluginManager | None = None
_registries: weakref.WeakKeyDictionary[pluggy.PluginManager, StrategyRegistry] = weakref.WeakKeyDictionary()


def blocked_from_env() -> list[str]:
    """Plugin names listed, comma-separated, in ``GMT_PLUGINS_BLOCK``."""
    return [name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()]


def make_plugin_manager(*, load_entrypoints: bool = True, blocked: Iterable[str] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-in plugins and (optionally) the installed ones.

    ``blocked`` (default: ``GMT_PLUGINS_BLOCK``) names plugins never registered: built-ins by
    module name, third-party ones by entry-point name.
    """
    pm = pluggy.PluginManager("gmt_plugins")
    pm.add_hookspecs(hookspecs)
    for name in blocked_from_env() if blocked is None else blocked:
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        if not pm.is_blocked(module_name):
            pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _default
    if _default is None:
        _default = make_plugin_manager()
    return _default


def reset_plugin_manager() -> None:
    """Forget the process-wide plugin manager (after installing or blocking plugins)."""
    global _default
    _default = None


def strategy_registry(pm: pluggy.PluginManager | None = None) -> StrategyRegistry:
    """The strategies registered with ``pm`` (default: the process-wide manager)."""
    pm = pm or get_plugin_manager()
    registry = _registries.get(pm)
    if registry is None:
        registry = StrategyRegistry()
        pm.hook.gmt_register_strategies(register=registry)
        _registries[pm] = registry
    return registry


def inspect_optimizer(optimizer: Any, config: GMTConfig, *, plugin_manager: pluggy.PluginManager | None = None) -> OptimizerInfo:
    """What ``optimizer`` (accelerate wrappers removed) does to masked entries: the first plugin that
    recognises it answers (``gmt_inspect_optimizer``); an optimizer none recognises is assumed to move them."""
    pm = plugin_manager or get_plugin_manager()
    info = pm.hook.gmt_inspect_optimizer(optimizer=unwrap_optimizer(optimizer), config=config)
    return info if info is not None else OptimizerInfo(family=type(optimizer).__name__, moves_masked_entries=True, reasons=("unknown optimizer",))
