"""The strategy registry that plugins fill through ``gmt_register_strategies``."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gmt_plugins.config import GMTConfig
    from gmt_plugins.strategies.base import MaskStrategy


class StrategyRegistry:
    """Strategies by name. Plugins call :meth:`add`; the masker calls :meth:`create`."""

    def __init__(self) -> None:
        self._strategies: dict[str, type[MaskStrategy]] = {}

    def add(self, strategy: type[MaskStrategy]) -> type[MaskStrategy]:
        """Register ``strategy`` under its ``name`` attribute; returns it, so it works as a decorator."""
        from gmt_plugins.strategies.base import MaskStrategy

        if not (isinstance(strategy, type) and issubclass(strategy, MaskStrategy)):
            raise TypeError(f"register.add expects a MaskStrategy subclass, got {strategy!r}")
        name = getattr(strategy, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{strategy.__qualname__} must set a non-empty class attribute 'name'")
        if name in self._strategies and self._strategies[name] is not strategy:
            other = self._strategies[name]
            raise ValueError(
                f"strategy name {name!r} registered twice: by {other.__module__}.{other.__qualname__} "
                f"and by {strategy.__module__}.{strategy.__qualname__}"
            )
        self._strategies[name] = strategy
        return strategy

    def names(self) -> list[str]:
        return sorted(self._strategies)

    def get(self, name: str) -> type[MaskStrategy]:
        try:
            return self._strategies[name]
        except KeyError:
            raise ValueError(f"strategy must be one of {self.names()}, got {name!r}") from None

    def check_config(self, config: GMTConfig) -> None:
        """A ``ValueError`` naming the field when ``config`` does not suit its strategy (unknown name, an unknown
        or invalid ``strategy_options`` entry, a ``ratio_of`` it does not implement); builds no strategy."""
        strategy = self.get(config.strategy)
        check_options(strategy, config.strategy_options)
        from gmt_plugins.strategies.base import check_ratio_of

        check_ratio_of(strategy, config)

    def create(self, config: GMTConfig) -> MaskStrategy:
        return self.get(config.strategy)(config)

    def __contains__(self, name: object) -> bool:
        return name in self._strategies

    def __iter__(self):  # noqa: ANN204 - a plain iterator over (name, class) pairs
        return iter(sorted(self._strategies.items()))


def check_options(strategy: type[MaskStrategy], options: dict[str, Any]) -> Any:
    """``options`` as ``strategy``'s options object (its ``options_class``, which validates values), or a
    ``ValueError`` naming the option, the strategy and what it takes."""
    from gmt_plugins.strategies.base import parse_options

    if strategy.options_class is None:
        if options:
            raise ValueError(f"strategy_options: strategy {strategy.name!r} takes no options, got {sorted(options)}")
        return None
    try:
        return parse_options(strategy.name, strategy.options_class, options)
    except (TypeError, ValueError) as err:  # TypeError: a wrong value type the options class did not check itself
        if "strategy_options" in str(err):
            raise ValueError(str(err)) from None
        raise ValueError(f"strategy_options of strategy {strategy.name!r}: {err}") from None


def option_defaults(strategy: type[MaskStrategy]) -> dict[str, Any]:
    """``strategy``'s options and their defaults (empty when it takes none), for listings and help."""
    if strategy.options_class is None:
        return {}
    defaults = {}
    for f in dataclasses.fields(strategy.options_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = dataclasses.MISSING
    return defaults
