"""What one masking step did, in a form the Trainer can log."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gmt_plugins.coverage import layer_of


@dataclass(frozen=True)
class TensorStats:
    """One tensor at one step. Under FSDP2/DeepSpeed the counts are those of the full tensor (every
    rank's shard summed), identical on every rank.

    ``masked_nonzero`` counts the masked entries whose gradient was finite and nonzero (a tensor
    frozen before the forward pass has no gradient: 0). ``updated`` (entries updated, i.e. not masked,
    at least once so far) and ``changed`` (entries whose masked state differs from the previous step's)
    are kept with ``track_coverage`` only; ``changed`` is ``None`` the first time a tensor is masked.
    ``previous_masked`` (with ``track_coverage``) is the count masked at the previous step, ``None``
    when ``changed`` is.

    ``energy`` and ``kept_energy`` (with ``track_energy``, else ``None``) are the sums of ``g ** 2``
    over the finite gradient entries before and after masking (float64), taken by the pass that masks
    the tensor; NaN and inf count in neither. A tensor frozen before the forward pass has no gradient
    and has neither. Their last bits depend on the order the backend (or the shards) added the squares
    in, so ``==`` leaves them out.
    """

    name: str
    numel: int
    masked: int
    nonfinite: int
    threshold: float | None
    masked_nonzero: int = 0
    updated: int | None = None
    changed: int | None = None
    previous_masked: int | None = None
    energy: float | None = field(default=None, compare=False)
    kept_energy: float | None = field(default=None, compare=False)

    @property
    def fraction(self) -> float:
        return self.masked / self.numel if self.numel else 0.0

    @property
    def energy_kept(self) -> float | None:
        """The share of the squared gradient norm left after masking (``None`` without ``track_energy``)."""
        return _energy_kept([self])

    @property
    def mask_jaccard(self) -> float | None:
        """The Jaccard similarity of this step's mask with the previous step's (``None`` without both)."""
        return _jaccard([self])


@dataclass(frozen=True)
class MaskStats:
    """Statistics of one :meth:`GradientMasker.apply` call.

    ``nonfinite`` counts NaN/inf gradient entries: they are never ranked and never zeroed, so the
    optimizer (and an AMP grad scaler) still sees them. ``masked_nonzero`` counts the masked entries
    whose gradient was finite and nonzero: ``masked - masked_nonzero`` entries were zero already, and
    masking them changed nothing. ``coverage``, ``never_updated``, ``churn`` and ``mask_jaccard`` need
    ``track_coverage=True``, ``energy_kept`` needs ``track_energy=True`` (else ``None``).
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
    def masked_nonzero(self) -> int:
        return sum(t.masked_nonzero for t in self.tensors)

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nonfinite(self) -> int:
        return sum(t.nonfinite for t in self.tensors)

    @property
    def fraction(self) -> float:
        return self.masked / self.total if self.total else 0.0

    @property
    def masked_nonzero_fraction(self) -> float:
        return self.masked_nonzero / self.total if self.total else 0.0

    @property
    def energy_kept(self) -> float | None:
        """The share of the squared gradient norm (finite entries) the masks leave: ``kept / before`` summed
        over the tensors that had a gradient (1.0 when every gradient is zero; ``None`` without
        ``track_energy``)."""
        return _energy_kept(self.tensors)

    @property
    def tracked(self) -> bool:
        """Whether coverage was tracked (``track_coverage``) at this step."""
        return bool(self.tensors) and all(t.updated is not None for t in self.tensors)

    @property
    def never_updated(self) -> int | None:
        """Entries (of the tensors masked at this step) never updated so far."""
        return self.total - sum(t.updated for t in self.tensors) if self.tracked else None  # type: ignore[misc] # tracked: no None

    @property
    def coverage(self) -> float | None:
        """Fraction of the entries (of the tensors masked at this step) updated at least once so far."""
        return _ratio(self.total - self.never_updated, self.total) if self.tracked else None  # type: ignore[operator] # tracked

    @property
    def churn(self) -> float | None:
        """Fraction of the entries whose masked state differs from the previous step's, over the tensors
        that were masked at the previous step too (``None`` when none was)."""
        return _churn(self.tensors) if self.tracked else None

    @property
    def mask_jaccard(self) -> float | None:
        """The Jaccard similarity ``|prev AND cur| / |prev OR cur|`` of this step's masks with the previous
        step's, the tensors masked at both steps taken together (1.0 when both are empty; ``None``
        when none was masked before)."""
        return _jaccard(self.tensors) if self.tracked else None

    def thresholds(self) -> list[float]:
        return [t.threshold for t in self.tensors if t.threshold is not None and math.isfinite(t.threshold)]

    def layers(self) -> dict[str, list[TensorStats]]:
        """The tensors grouped by layer (:func:`gmt_plugins.coverage.layer_of`), in first-seen order."""
        grouped: dict[str, list[TensorStats]] = {}
        for t in self.tensors:
            grouped.setdefault(layer_of(t.name), []).append(t)
        return grouped

    def to_log_dict(self, *, per_tensor: bool = False, per_layer: bool = False, prefix: str = "gmt/") -> dict[str, float]:
        """Flat numbers for ``Trainer.log``: overall counts, the energy kept (with ``track_energy``), threshold
        summary, coverage, churn and mask stability (when tracked), optional per-layer numbers (with each
        layer's share of the entries updated) and per-tensor fractions."""
        logs: dict[str, float] = {
            f"{prefix}masked_fraction": self.fraction,
            f"{prefix}masked": float(self.masked),
            f"{prefix}masked_nonzero": float(self.masked_nonzero),
            f"{prefix}masked_nonzero_fraction": self.masked_nonzero_fraction,
            f"{prefix}entries": float(self.total),
            f"{prefix}nonfinite": float(self.nonfinite),
            f"{prefix}tensors_without_grad": float(len(self.without_grad)),
        }
        energy_kept = self.energy_kept
        if energy_kept is not None:
            logs[f"{prefix}energy_kept"] = energy_kept
        if self.tracked:
            logs[f"{prefix}coverage"] = float(self.coverage)  # type: ignore[arg-type] # tracked
            logs[f"{prefix}never_updated"] = float(self.never_updated)  # type: ignore[arg-type] # tracked
            churn = self.churn
            if churn is not None:
                logs[f"{prefix}churn"] = churn
            jaccard = self.mask_jaccard
            if jaccard is not None:
                logs[f"{prefix}mask_jaccard"] = jaccard
        thresholds = self.thresholds()
        if thresholds:
            logs[f"{prefix}threshold_min"] = min(thresholds)
            logs[f"{prefix}threshold_mean"] = sum(thresholds) / len(thresholds)
            logs[f"{prefix}threshold_max"] = max(thresholds)
        if per_layer:
            updated = self.total - self.masked
            for layer, tensors in self.layers().items():
                logs.update(_layer_logs(f"{prefix}layer/{layer}/", tensors, updated))
        if per_tensor:
            for t in self.tensors:
                logs[f"{prefix}masked_fraction/{t.name}"] = t.fraction
        return logs


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _churn(tensors: list[TensorStats]) -> float | None:
    seen = [t for t in tensors if t.changed is not None]
    return _ratio(sum(t.changed for t in seen), sum(t.numel for t in seen)) if seen else None  # type: ignore[misc] # filtered


def _energy_kept(tensors: list[TensorStats]) -> float | None:
    summed = [t for t in tensors if t.energy is not None and t.kept_energy is not None]
    if not summed:
        return None
    before = sum(t.energy for t in summed)  # type: ignore[misc] # filtered
    return sum(t.kept_energy for t in summed) / before if before > 0 else 1.0  # type: ignore[misc] # filtered


def _jaccard(tensors: list[TensorStats]) -> float | None:
    """From counts alone: ``changed = |prev XOR cur|``, so ``|prev AND cur| = (|prev| + |cur| - changed) / 2``."""
    seen = [t for t in tensors if t.changed is not None and t.previous_masked is not None]
    if not seen:
        return None
    both = sum((t.previous_masked + t.masked - t.changed) // 2 for t in seen)  # type: ignore[operator] # filtered
    either = sum(t.previous_masked + t.masked for t in seen) - both  # type: ignore[operator] # filtered
    return both / either if either else 1.0


def _layer_logs(prefix: str, tensors: list[TensorStats], updated: int) -> dict[str, float]:
    """One layer's numbers; ``updated``: the entries updated (not masked) at this step, over all layers."""
    numel = sum(t.numel for t in tensors)
    masked = sum(t.masked for t in tensors)
    logs = {
        f"{prefix}masked_fraction": _ratio(masked, numel),
        f"{prefix}masked_nonzero_fraction": _ratio(sum(t.masked_nonzero for t in tensors), numel),
        f"{prefix}update_share": _ratio(numel - masked, updated),
    }
    energy_kept = _energy_kept(tensors)
    if energy_kept is not None:
        logs[f"{prefix}energy_kept"] = energy_kept
    if all(t.updated is not None for t in tensors):
        logs[f"{prefix}coverage"] = _ratio(sum(t.updated for t in tensors), numel)  # type: ignore[misc] # checked
        churn = _churn(tensors)
        if churn is not None:
            logs[f"{prefix}churn"] = churn
        jaccard = _jaccard(tensors)
        if jaccard is not None:
            logs[f"{prefix}mask_jaccard"] = jaccard
    return logs
