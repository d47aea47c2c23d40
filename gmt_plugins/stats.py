"""What one masking step did, in a form the Trainer can log."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorStats:
    name: str
    numel: int
    masked: int
    nonfinite: int
    threshold: float | None

    @property
    def fraction(self) -> float:
        return self.masked / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class MaskStats:
    """Statistics of one :meth:`GradientMasker.apply` call.

    ``nonfinite`` counts NaN/inf gradient entries: they are never ranked and never zeroed, so the
    optimizer (and an AMP grad scaler) still sees them.
    """

    step: int
    strategy: str
    scope: str
    tensors: list[TensorStats] = field(default_factory=list)
    without_grad: list[str] = field(default_factory=list)

    @property
    def masked(self) -> int:
        return sum(t.masked for t in self.tensors)

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nonfinite(self) -> int:
        return sum(t.nonfinite for t in self.tensors)

    @property
    def fraction(self) -> float:
        return self.masked / self.total if self.total else 0.0

    def thresholds(self) -> list[float]:
        return [t.threshold for t in self.tensors if t.threshold is not None and math.isfinite(t.threshold)]

    def to_log_dict(self, *, per_tensor: bool = False, prefix: str = "gmt/") -> dict[str, float]:
        """Flat numbers for ``Trainer.log``: overall counts, threshold summary, optional per-tensor fractions."""
        logs: dict[str, float] = {
            f"{prefix}masked_fraction": self.fraction,
            f"{prefix}masked": float(self.masked),
            f"{prefix}entries": float(self.total),
            f"{prefix}nonfinite": float(self.nonfinite),
            f"{prefix}tensors_without_grad": float(len(self.without_grad)),
        }
        thresholds = self.thresholds()
        if thresholds:
            logs[f"{prefix}threshold_min"] = min(thresholds)
            logs[f"{prefix}threshold_mean"] = sum(thresholds) / len(thresholds)
            logs[f"{prefix}threshold_max"] = max(thresholds)
        if per_tensor:
            for t in self.tensors:
                logs[f"{prefix}masked_fraction/{t.name}"] = t.fraction
        return logs
