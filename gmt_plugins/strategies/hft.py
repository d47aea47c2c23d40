"""HFT: freeze a random half of the parameter matrices of every layer, re-drawn every stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gmt_plugins.strategies._layers import FreezingStrategy, name_groups
from gmt_plugins.strategy_api import StrategyRegistry, check_int, hookimpl, stable_salt


@dataclass
class HFTOptions:
    interval: int = 100
    """Steps per stage: the frozen half is re-drawn every ``interval`` optimizer steps."""

    def __post_init__(self) -> None:
        check_int("interval", self.interval, 1)


class HFTStrategy(FreezingStrategy):
    """Half Fine-Tuning (Hui et al., https://arxiv.org/abs/2404.18466).

    Parameters are grouped into layers by the first numeric index in their names (``layers.3.``);
    all parameters without an index (embeddings, final norm, head) form one more group. In every
    group, half of the tensors are frozen as whole tensors (category level: every finite gradient
    entry of a frozen tensor is zeroed, the other tensors are untouched). With an odd count ``n``
    the group freezes ``n // 2`` or ``n // 2 + 1`` tensors with equal chance, so every tensor is
    frozen with probability exactly 1/2.

    The draw depends only on ``mask_seed``, the stage ``step // interval``, and the parameter names
    (a stable hash per name, the lowest half is frozen), so it is the same on every process and
    after a resume; the strategy keeps no state. ``mask_ratio`` plays no part: the frozen fraction
    is one half by definition of the method. ``scope`` plays no part either (an explicit value of
    either is warned about). With ``GradientMasker.begin_step`` the frozen tensors are frozen before
    the forward pass and get no gradient at all.
    """

    name = "hft"
    options_class = HFTOptions
    ignored_settings = ("mask_ratio", "scope")

    def frozen_names(self, names: Sequence[str], *, step: int) -> set[str]:
        stage = step // self.options.interval
        seed = self.config.mask_seed
        layers, members, others = name_groups(names)
        out: set[str] = set()
        for key, group in [*((k, members[k]) for k in layers), ("<no layer>", others)]:
            if not group:
                continue
            order = sorted(group, key=lambda i: (stable_salt(seed, "hft", stage, names[i]), names[i]))
            n_frozen = len(group) // 2
            if len(group) % 2 and stable_salt(seed, "hft-odd", stage, key) & 1:
                n_frozen += 1
            out.update(names[i] for i in order[:n_frozen])
        return out


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(HFTStrategy)
