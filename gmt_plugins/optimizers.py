"""What an optimizer does to an entry whose gradient was zeroed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy

    from gmt_plugins.config import GMTConfig


@dataclass(frozen=True)
class OptimizerInfo:
    """``moves_masked_entries`` says whether a zero gradient can still change the parameter;
    ``reasons`` says why (momentum, weight decay, adaptive state, quantized state)."""

    family: str
    moves_masked_entries: bool
    reasons: tuple[str, ...] = ()
    quantized_state: bool = False
    paged: bool = False


def unwrap_optimizer(optimizer: Any) -> Any:
    """Remove wrappers such as accelerate's ``AcceleratedOptimizer`` (the real one is ``.optimizer``)."""
    seen = set()
    while id(optimizer) not in seen and type(optimizer).__module__.startswith("accelerate"):
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def inspect_optimizer(
    optimizer: Any, config: GMTConfig, *, plugin_manager: pluggy.PluginManager | None = None
) -> OptimizerInfo:
    from gmt_plugins.plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    info = pm.hook.gmt_inspect_optimizer(optimizer=unwrap_optimizer(optimizer), config=config)
    return info if info is not None else OptimizerInfo(family=type(optimizer).__name__, moves_masked_entries=True, reasons=("unknown optimizer",))
