"""The plugin contract of gmt_plugins.

Every hook a plugin may implement is declared here. Built-in strategies and adapters are plugins
like any third-party one: they implement these hooks with ``@hookimpl`` and are registered by
:func:`gmt_plugins.plugins.make_plugin_manager`. Third-party packages expose a module through the
``gmt_plugins`` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from gmt_plugins.config import GMTConfig
    from gmt_plugins.optimizers import OptimizerInfo
    from gmt_plugins.registry import StrategyRegistry

hookspec = pluggy.HookspecMarker("gmt_plugins")
hookimpl = pluggy.HookimplMarker("gmt_plugins")


@hookspec
def gmt_register_strategies(register: StrategyRegistry) -> None:
    """Register mask strategies by name.

    :param register: call ``register.add(StrategyClass)``; the class's ``name`` attribute is the name
        users put in ``GMTConfig(strategy=...)``.

    Called once when a plugin manager's strategy registry is first built.
    All implementations are called; registering a name twice is an error that names both classes.
    """


@hookspec(firstresult=True)
def gmt_select_parameters(
    model: torch.nn.Module, config: GMTConfig
) -> list[tuple[str, torch.nn.Parameter]] | None:
    """Return the ``(name, parameter)`` pairs whose gradients may be masked, before the config's
    ``include``/``exclude`` patterns are applied.

    :param model: the model with DDP/FSDP/DeepSpeed/``torch.compile`` wrappers already removed.
    :param config: the active configuration.

    Called once when a :class:`~gmt_plugins.masker.GradientMasker` is built from a module. Return
    ``None`` when the model is not one this plugin knows. The first non-None result wins; the
    built-in fallback (``trylast``) returns every parameter with ``requires_grad``.
    """


@hookspec(firstresult=True)
def gmt_inspect_optimizer(optimizer: Any, config: GMTConfig) -> OptimizerInfo | None:
    """Describe an optimizer: its family and whether it moves an entry whose gradient is zero.

    :param optimizer: the real optimizer (wrappers such as accelerate's ``AcceleratedOptimizer``
        already removed).
    :param config: the active configuration.

    Called once at train begin by :class:`~gmt_plugins.GMTCallback` (and by
    :func:`gmt_plugins.plugins.inspect_optimizer`). Return ``None`` for an optimizer this plugin
    does not know. The first non-None result wins; the built-in fallback describes any
    ``torch.optim.Optimizer`` from its hyperparameters.
    """


@hookspec
def gmt_check_training_setup(args: Any, model: Any, optimizer: Any, config: GMTConfig) -> str | None:
    """Veto a training setup in which masking cannot work.

    :param args: the Trainer's ``TrainingArguments`` (or a subclass such as TRL's ``SFTConfig``).
    :param model: the model as the Trainer holds it (possibly wrapped).
    :param optimizer: the optimizer as the Trainer holds it (possibly wrapped), or ``None``.
    :param config: the active configuration.

    Called once at train begin. Return a sentence saying why the setup cannot work, or ``None``.
    All results are collected; any sentence stops training with a ``ValueError`` that lists them.
    """
