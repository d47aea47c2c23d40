"""PEFT adapter: with a ``PeftModel`` only the trainable adapter tensors are masked.

LoRA A/B matrices, DoRA magnitude vectors, ``modules_to_save`` copies and trainable-token deltas
are trainable; the frozen base (including the frozen ``original_module`` of ``modules_to_save``)
is never selected, so its weights and gradients are never touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmt_plugins._import_utils import is_peft_available
from gmt_plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from gmt_plugins.config import GMTConfig


def is_peft_model(model: object) -> bool:
    if not is_peft_available() or not type(model).__module__.startswith("peft"):
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


@hookimpl
def gmt_select_parameters(model: torch.nn.Module, config: GMTConfig) -> list[tuple[str, torch.nn.Parameter]] | None:
    if not is_peft_model(model):
        return None
    selected = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not selected:
        raise ValueError("the PeftModel has no trainable parameters (is it in inference mode?)")
    return selected
