"""bitsandbytes adapter: recognise its optimizers (8-bit, paged) and what they do to masked entries.

bitsandbytes' 8-bit optimizers keep blockwise-quantized state; an exact zero gradient still gets
a nonzero quantized update from the second step on, so masked entries move unless
``strict=True`` holds them. Tensors under 4,096 entries silently get 32-bit state.
"""

from __future__ import annotations

from typing import Any

from gmt_plugins._import_utils import is_bitsandbytes_available
from gmt_plugins.config import GMTConfig
from gmt_plugins.hookspecs import hookimpl
from gmt_plugins.optimizers import OptimizerInfo


def is_bnb_optimizer(optimizer: Any) -> bool:
    return is_bitsandbytes_available() and type(optimizer).__module__.startswith("bitsandbytes")


def _optim_bits(optimizer: Any) -> int:
    args = getattr(optimizer, "args", None)
    bits = getattr(args, "optim_bits", None)
    if bits is None:
        bits = 8 if "8bit" in type(optimizer).__name__ else 32
    return int(bits)


@hookimpl
def gmt_inspect_optimizer(optimizer: Any, config: GMTConfig) -> OptimizerInfo | None:
    if not is_bnb_optimizer(optimizer):
        return None
    name = type(optimizer).__name__
    quantized = _optim_bits(optimizer) == 8
    reasons = ["adaptive moments" if "Adam" in name or "Lion" in name else "optimizer state"]
    if any(group.get("weight_decay") for group in optimizer.param_groups):
        reasons.append("weight decay")
    if quantized:
        reasons.append("8-bit state quantizes a zero update to a nonzero code")
    paged = "Paged" in name or bool(getattr(getattr(optimizer, "args", None), "is_paged", False))
    return OptimizerInfo(
        family=f"bitsandbytes.{name}", moves_masked_entries=True, reasons=tuple(reasons), quantized_state=quantized, paged=paged
    )
