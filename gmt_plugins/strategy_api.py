"""Everything a strategy author needs, in one public module; the built-in strategies use it too.

A strategy turns one optimizer step's gradients into a :class:`MaskPlan`; the masker applies it, in
one place, in place (per tensor or globally, exact, ties broken by position, NaN/inf never masked).
Three ways to write one, from the least to the most code:

* **Keys**: subclass :class:`KeyedStrategy` and return a key source from ``key_source``: a
  :class:`KeySource` maps gradient chunks to non-negative integer keys, smaller keys are masked
  first, and the engine masks exactly ``floor(mask_ratio * n)`` entries. :class:`MagnitudeKeys`
  (``|grad|``, what ``gmt`` uses), :class:`RandomKeys` (a position hash, ``random``) and
  :class:`ScoreKeys` (any non-negative score per entry) are ready-made; subclass them or write your
  own (``examples/custom_strategy_plugin``).
* **Stored masks**: keep a bool tensor per parameter and return :func:`mask_plan` of them.
* **Anything else**: subclass :class:`MaskStrategy`, return one :class:`TensorPlan` (key source,
  :class:`Cut`) per :class:`GradEntry`. When the masker sets ``self.deferrable`` (see
  :attr:`MaskStrategy.deferrable`), a plan may return :class:`DeferredTensorPlan` entries, decided
  when the masker reaches their tensor (the built-in tensor scopes do, to mask each gradient while
  it is still in cache).

Options arrive through ``GMTConfig.strategy_options`` into the strategy's ``options_class``
dataclass (see :func:`parse_options`); validate them with :func:`check_int`, :func:`check_float` and
:func:`check_choice`, which raise ``ValueError`` naming the option. Seed anything random from
:func:`stable_salt` (never ``hash()`` or the global RNG: every DDP rank must draw the same).
Register the class in a ``gmt_register_strategies(register)`` :data:`hookimpl` with
``register.add(cls)`` (a :class:`StrategyRegistry`), exposed through the ``gmt_plugins``
entry-point group. The engine's internals (radix passes, the compiled kernel, shard reductions)
stay private: nothing here depends on them.
"""

from __future__ import annotations

from gmt_plugins.config import GMTConfig
from gmt_plugins.hookspecs import hookimpl
from gmt_plugins.engine.keys import MagnitudeKeys, RandomKeys, ScoreKeys, stable_salt
from gmt_plugins.engine.types import Cut, KeySource
from gmt_plugins.registry import StrategyRegistry
from gmt_plugins.strategies._masks import check_choice, check_float, check_int, load_bool_masks, mask_plan
from gmt_plugins.strategies.base import DeferredTensorPlan, GradEntry, KeyedStrategy, MaskPlan, MaskStrategy, TensorPlan, parse_options

__all__ = [
    "Cut",
    "DeferredTensorPlan",
    "GMTConfig",
    "GradEntry",
    "KeySource",
    "KeyedStrategy",
    "MagnitudeKeys",
    "MaskPlan",
    "MaskStrategy",
    "RandomKeys",
    "ScoreKeys",
    "StrategyRegistry",
    "TensorPlan",
    "check_choice",
    "check_float",
    "check_int",
    "hookimpl",
    "load_bool_masks",
    "mask_plan",
    "parse_options",
    "stable_salt",
]
