"""LISA: update a random few layers at a time (plus embeddings and head), re-drawn every K steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gmt_plugins.strategies._layers import FreezingStrategy, matches_any, name_groups
from gmt_plugins.strategies._masks import check_patterns
from gmt_plugins.strategy_api import StrategyRegistry, check_int, hookimpl, stable_salt

DEFAULT_ALWAYS_ACTIVE = ["embed", "lm_head"]


@dataclass
class LISAOptions:
    active_layers: int = 2
    """How many layers are updated at a time (the paper's gamma)."""
    interval: int = 50
    """Steps between re-draws of the active layers (the paper's K)."""
    always_active: list[str] = field(default_factory=lambda: list(DEFAULT_ALWAYS_ACTIVE))
    """Regular expressions (re.search) of parameters that are always updated, even inside a layer."""

    def __post_init__(self) -> None:
        check_int("active_layers", self.active_layers, 1)
        check_int("interval", self.interval, 1)
        self.always_active = check_patterns("always_active", self.always_active)


class LISAStrategy(FreezingStrategy):
    """Layerwise Importance Sampled AdamW (Pan et al., https://arxiv.org/abs/2403.17919).

    Layers are the groups of parameters sharing the first numeric index of their names
    (``model.layers.3``). Every ``interval`` steps, ``active_layers`` of them are drawn uniformly
    without replacement; the tensors of every other layer are frozen (all their finite gradient
    entries are zeroed, or, with ``GradientMasker.begin_step``, they are frozen before the forward
    pass and get no gradient at all). Parameters matching ``always_active`` (embeddings and head by default) are
    always updated, and so is every parameter outside the numbered layers (e.g. the final norm), as
    in the authors' implementation, which freezes only the list of transformer blocks.

    The draw depends only on ``mask_seed`` and the period ``step // interval`` (a seeded
    ``torch.Generator``), over the layers of the selected parameters (of those with gradients
    when ``begin_step`` was not called), so it is identical on every process and after a resume;
    the strategy keeps no state. ``mask_ratio`` and ``scope`` play no part (an explicit value is
    warned about).
    """

    name = "lisa"
    options_class = LISAOptions
    ignored_settings = ("mask_ratio", "scope")

    def active(self, layers: Sequence[str], *, step: int) -> set[str]:
        """The layers updated at ``step``."""
        period = step // self.options.interval
        gen = torch.Generator().manual_seed(stable_salt(self.config.mask_seed, "lisa", period))
        order = torch.randperm(len(layers), generator=gen).tolist()
        return {layers[i] for i in order[: self.options.active_layers]}

    def frozen_names(self, names: Sequence[str], *, step: int) -> set[str]:
        layers, members, _ = name_groups(names)
        active = self.active(layers, step=step)
        always = self.options.always_active
        return {names[i] for key in layers if key not in active for i in members[key] if not matches_any(names[i], always)}


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(LISAStrategy)
