"""Built-in mask strategies; each module is a plugin with a ``gmt_register_strategies`` hookimpl."""

from gmt_plugins.strategies.base import GradEntry, KeyedStrategy, MaskPlan, MaskStrategy, TensorPlan, parse_options

__all__ = ["GradEntry", "KeyedStrategy", "MaskPlan", "MaskStrategy", "TensorPlan", "parse_options"]
