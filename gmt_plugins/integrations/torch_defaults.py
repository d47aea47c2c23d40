"""Fallbacks for plain PyTorch: every trainable parameter, and any ``torch.optim.Optimizer``."""

from __future__ import annotations

from typing import Any

import torch

from gmt_plugins.config import GMTConfig
from gmt_plugins.hookspecs import hookimpl
from gmt_plugins.optimizers import OptimizerInfo


@hookimpl(trylast=True)
def gmt_select_parameters(model: torch.nn.Module, config: GMTConfig) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _hyper(optimizer: torch.optim.Optimizer, key: str) -> list[Any]:
    return [group.get(key) for group in optimizer.param_groups if key in group]


@hookimpl(trylast=True)
def gmt_inspect_optimizer(optimizer: Any, config: GMTConfig) -> OptimizerInfo | None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    reasons = []
    if any(m for m in _hyper(optimizer, "momentum") if m):
        reasons.append("momentum")
    if any(wd for wd in _hyper(optimizer, "weight_decay") if wd):
        reasons.append("weight decay")
    if _hyper(optimizer, "betas"):
        reasons.append("adaptive moments")
    return OptimizerInfo(family=type(optimizer).__name__, moves_masked_entries=bool(reasons), reasons=tuple(reasons))
