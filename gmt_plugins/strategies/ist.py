"""IST: sample the layers to update by an importance score learned during training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.strategies._layers import FreezingStrategy, layer_groups, matches_any, name_groups, whole_tensor_plan
from gmt_plugins.strategies.lisa import LISAOptions
from gmt_plugins.strategy_api import GradEntry, MaskPlan, StrategyRegistry, check_float, hookimpl, stable_salt


@dataclass
class ISTOptions(LISAOptions):
    """LISA's layer options (``active_layers``, ``interval``, ``always_active``) plus the importance EMA."""

    interval: int = 10
    """Steps between re-draws of the active layers."""
    beta: float = 0.9
    """EMA factor of the importance scores, in [0, 1)."""
    temperature: float = 1.0
    """Softmax temperature of the sampling (> 0); smaller follows the scores more greedily."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.beta = check_float("beta", self.beta, 0.0, 1.0, high_open=True)
        self.temperature = check_float("temperature", self.temperature, 0.0, math.inf, low_open=True, high_open=True)


class ISTStrategy(FreezingStrategy):
    """Importance-aware Sparse Tuning (Yao et al., "Layer-wise Importance Matters: Less Memory for
    Better Performance in Parameter-efficient Fine-tuning of Large Language Models", EMNLP 2024
    Findings, https://arxiv.org/abs/2410.11772).

    Layers are grouped as in ``lisa`` (first numeric index of the name). Every ``interval`` steps,
    ``active_layers`` layers are drawn without replacement with probabilities
    ``softmax(score / temperature)``; the tensors of the other layers are frozen. Parameters outside
    the numbered layers or matching ``always_active`` are always updated.

    The paper learns the scores from a reward measured by suppressing the selected layers' PEFT
    modules in extra forward passes; this implementation keeps it simple and uses a gradient reward
    that needs no extra forward pass: at every step, each layer's reward is
    its RMS gradient (``||g||_2 / sqrt(numel)``) divided by the mean over the layers, and the score
    is an EMA (``beta``) of the reward. Since masking happens after the backward pass, every layer's
    full gradient is seen, active or not. Scores start at 1 (the mean reward), so the first draw is
    uniform. A layer with a non-finite gradient keeps its score for that step (NaN/inf are not
    learned from, and are never zeroed).

    The draw uses a ``torch.Generator`` seeded from ``mask_seed`` and the period; the scores, the
    current period and its active layers are the state, so a resumed run draws the same layers.
    ``mask_ratio`` and ``scope`` play no part (an explicit value is warned about).

    Freezing before the forward pass (``GradientMasker.begin_step``) is as far as the reward allows:
    the reward needs every layer's gradient, so the last step of each period (``step % interval ==
    interval - 1``, the one before a new draw) is an observation step on which nothing is frozen
    before the forward pass, every layer's gradient is computed and learned from, and the inactive
    layers are masked after backward (they may then move by weight decay and momentum unless
    ``strict=True``). On every other step the inactive layers are frozen before the forward pass
    and the scores are not updated. With ``interval=1`` every step is an observation step, so
    nothing is frozen early. Without ``begin_step`` every step learns, as described above.
    """

    name = "ist"
    options_class = ISTOptions
    ignored_settings = ("mask_ratio", "scope")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.scores: dict[str, float] = {}
        self._period: int | None = None
        self._active: list[str] = []

    def _draw(self, layers: Sequence[str], period: int) -> list[str]:
        opts = self.options
        logits = torch.tensor([self.scores.get(k, 1.0) for k in layers], dtype=torch.float64) / opts.temperature
        probs = torch.softmax(logits, 0)
        gen = torch.Generator().manual_seed(stable_salt(self.config.mask_seed, "ist", period))
        picked = torch.multinomial(probs, min(opts.active_layers, len(layers)), replacement=False, generator=gen)
        return [layers[i] for i in sorted(picked.tolist())]

    def _learn(self, entries: Sequence[GradEntry], layers: Sequence[str], members: dict[str, list[int]]) -> None:
        rms: dict[str, float] = {}
        for key in layers:
            sq = sum(float(torch.linalg.vector_norm(entries[i].flat, dtype=torch.float32).item()) ** 2 for i in members[key])
            numel = sum(entries[i].flat.numel() for i in members[key])
            if math.isfinite(sq) and numel:
                rms[key] = math.sqrt(sq / numel)
        mean = sum(rms.values()) / len(rms) if rms else 0.0
        if mean <= 0.0:
            return  # all-zero gradients carry no information about importance
        beta = self.options.beta
        for key, value in rms.items():
            self.scores[key] = beta * self.scores.get(key, 1.0) + (1 - beta) * value / mean

    def _ensure_drawn(self, layers: Sequence[str], step: int) -> None:
        period = step // self.options.interval
        if period != self._period and layers:
            self._active, self._period = self._draw(layers, period), period

    def frozen_names(self, names: Sequence[str], *, step: int) -> set[str]:
        layers, members, _ = name_groups(names)
        self._ensure_drawn(layers, step)
        active, always = set(self._active), self.options.always_active
        return {names[i] for key in layers if key not in active for i in members[key] if not matches_any(names[i], always)}

    def frozen_before_forward(self, names: Sequence[str], *, step: int) -> set[str]:
        if step % self.options.interval == self.options.interval - 1:
            self._ensure_drawn(name_groups(names)[0], step)
            self._decided = None  # observation step: every layer computes its gradient
            return set()
        return super().frozen_before_forward(names, step=step)

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        if self.decided_at(step) is not None:
            return super().plan(entries, step=step)  # frozen layers have no gradient to learn from
        layers, members, _ = layer_groups(entries)
        self._ensure_drawn(layers, step)
        self._learn(entries, layers, members)
        frozen = self.frozen_names([e.name for e in entries], step=step)
        return whole_tensor_plan(entries, [e.name in frozen for e in entries], self.config.chunk_numel)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "period": self._period, "active": list(self._active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"scores", "period", "active"}
        if unknown:
            raise ValueError(f"unknown ist state keys {sorted(unknown)}")
        self.scores = {str(k): float(v) for k, v in state.get("scores", {}).items()}
        period = state.get("period")
        self._period = None if period is None else int(period)
        self._active = [str(k) for k in state.get("active", [])]


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(ISTStrategy)
