"""Training setups in which a pre-optimizer-step mask cannot work, refused at train begin."""

from __future__ import annotations

from typing import Any

from gmt_plugins.config import GMTConfig
from gmt_plugins.hookspecs import hookimpl
from gmt_plugins.optimizers import unwrap_optimizer

FUSED_UPDATE_OPTIMIZERS = ("lomo", "adalomo")


@hookimpl
def gmt_check_training_setup(args: Any, model: Any, optimizer: Any, config: GMTConfig) -> str | None:
    from gmt_plugins.integrations.deepspeed import deepspeed_setup_problem, uses_deepspeed

    if uses_deepspeed(args, optimizer):
        return deepspeed_setup_problem(optimizer)
    optim = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", "")) or "")
    if optim in FUSED_UPDATE_OPTIMIZERS:
        return f"optim={optim!r} fuses the update into backward (LOMO/AdaLomo): parameters change before any mask"
    if optim.endswith("layerwise"):
        return f"optim={optim!r} steps each layer inside backward hooks: parameters change before any mask"
    real = unwrap_optimizer(optimizer)
    name = type(real).__name__
    if name in ("LOMO", "AdaLomo") or name == "LayerWiseDummyOptimizer":
        return f"the optimizer {name} updates parameters inside backward: parameters change before any mask"
    return None
