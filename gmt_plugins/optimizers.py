"""What an optimizer does to an entry whose gradient was zeroed (``inspect_optimizer`` asks the plugins:
it lives in :mod:`gmt_plugins.plugins`, which owns the plugin manager)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
