"""The strategy registry that plugins fill through ``gmt_register_strategies``."""

from __future__ import annotations

from typing import TYPE_CHECKING

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

    def create(self, config: GMTConfig) -> MaskStrategy:
        return self.get(config.strategy)(config)

    def __contains__(self, name: object) -> bool:
        return name in self._strategies

    def __iter__(self):  # noqa: ANN204 - a plain iterator over (name, class) pairs
        return iter(sorted(self._strategies.items()))
