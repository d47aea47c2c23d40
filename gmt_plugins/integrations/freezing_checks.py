"""Training setups in which freezing parameters before the forward pass cannot work, refused at train begin.

Only strategies with ``freezes_before_forward`` (``lisa``, ``hft``, ``ist``) are checked: the others
never change ``requires_grad``.
"""

from __future__ import annotations

from typing import Any

from gmt_plugins.config import GMTConfig
from gmt_plugins.hookspecs import hookimpl


def _freezes(config: GMTConfig) -> bool:
    from gmt_plugins.plugins import strategy_registry

    registry = strategy_registry()
    # a strategy registered only with a custom plugin manager is not known here: GradientMasker.begin_step
    # still refuses sharded parameters itself
    return config.strategy in registry and registry.get(config.strategy).freezes_before_forward


def _uses_fsdp(args: Any) -> bool:
    fsdp = getattr(args, "fsdp", None)
    return bool(fsdp) or bool(getattr(args, "fsdp_plugin_args", None))


@hookimpl
def gmt_check_training_setup(args: Any, model: Any, optimizer: Any, config: GMTConfig) -> str | None:
    if not _freezes(config):
        return None
    name = config.strategy
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return f"strategy {name!r} freezes layers before the forward pass, which is not supported under DeepSpeed"
    if _uses_fsdp(args):
        return f"strategy {name!r} freezes layers before the forward pass, which is not supported under FSDP (args.fsdp)"
    if int(getattr(args, "world_size", 1) or 1) > 1 and getattr(args, "ddp_find_unused_parameters", None) is not True:
        return (
            f"strategy {name!r} freezes layers before the forward pass, so under DDP their parameters get no gradient; "
            "set TrainingArguments(ddp_find_unused_parameters=True)"
        )
    return None
