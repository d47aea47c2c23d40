"""``GradientMasker``: mask the accumulated gradients of a model, for plain PyTorch loops."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pluggy
import torch

from gmt_plugins.config import GMTConfig, resolve_config
from gmt_plugins.plugins import get_plugin_manager, strategy_registry
from gmt_plugins.selection import Cut, apply_cut
from gmt_plugins.stats import MaskStats, TensorStats
from gmt_plugins.strategies.base import GradEntry, MaskPlan
from gmt_plugins.strict import MaskedEntryGuard

NamedParameters = Iterable[tuple[str, torch.nn.Parameter]]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Remove DDP / FSDP1 / DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            return model
        model = inner


class GradientMasker:
    """Masks the current ``.grad`` of the selected trainable parameters in place.

    Args:
        model_or_named_params (`torch.nn.Module` or iterable of `(str, Parameter)`):
            A model (wrappers are removed; plugins such as the PEFT adapter choose its parameters) or
            explicit named parameters.
        config (`GMTConfig`, *optional*, defaults to `GMTConfig()`):
            The configuration; keyword ``overrides`` replace its fields.
        plugin_manager (`pluggy.PluginManager`, *optional*):
            Defaults to the process-wide one from :func:`gmt_plugins.plugins.get_plugin_manager`.

    Example:

    ```python
    masker = GradientMasker(model, mask_ratio=0.2)
    for batch in loader:
        model(**batch).loss.backward()
        stats = masker.apply()
        optimizer.step()
        masker.restore_masked()  # only does something with strict=True
        optimizer.zero_grad()
    ```
    """

    def __init__(
        self,
        model_or_named_params: torch.nn.Module | NamedParameters,
        config: GMTConfig | None = None,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        **overrides: Any,
    ) -> None:
        self.config = resolve_config(config, overrides)
        self.plugin_manager = plugin_manager or get_plugin_manager()
        self.strategy = strategy_registry(self.plugin_manager).create(self.config)
        self.parameters = self._select(model_or_named_params)
        self.step = 0
        self._guard = MaskedEntryGuard(chunk_numel=self.config.chunk_numel) if self.config.strict else None

    def _select(self, source: torch.nn.Module | NamedParameters) -> list[tuple[str, torch.nn.Parameter]]:
        if isinstance(source, torch.nn.Module):
            model = unwrap_model(source)
            candidates = self.plugin_manager.hook.gmt_select_parameters(model=model, config=self.config)
        else:
            candidates = [(name, p) for name, p in source if p.requires_grad]
        selected = [(name, p) for name, p in candidates if self.config.matches(name)]
        if not selected:
            raise ValueError(
                f"no trainable parameter matches include={self.config.include} exclude={self.config.exclude}; "
                f"{len(candidates)} trainable parameter(s) were candidates"
            )
        return selected

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.parameters]

    def _entries(self) -> tuple[list[GradEntry], list[str]]:
        entries, without_grad = [], []
        for name, param in self.parameters:
            grad = param.grad
            if grad is None:
                without_grad.append(name)
                continue
            if grad.is_sparse or type(grad).__name__ == "DTensor":
                raise ValueError(f"gradient of {name!r} is a {type(grad).__name__} ({grad.layout}); only dense local gradients can be masked")
            if not grad.is_contiguous():
                raise ValueError(f"gradient of {name!r} is not contiguous; masking works on flat views")
            entries.append(GradEntry(len(entries), name, param, grad.view(-1)))
        return entries, without_grad

    @torch.no_grad()
    def apply(self) -> MaskStats:
        """Mask the gradients for the current optimizer step and return what was done."""
        if self._guard is not None and self._guard.pending:
            raise RuntimeError("restore_masked() was not called after the previous optimizer step (strict mode)")
        entries, without_grad = self._entries()
        plan = self.strategy.plan(entries, step=self.step) if entries else MaskPlan([])
        if len(plan.tensors) != len(entries):
            raise RuntimeError(f"strategy {self.strategy.name!r} planned {len(plan.tensors)} tensors for {len(entries)} gradients")
        tensors = self._execute(entries, plan)
        stats = MaskStats(self.step, self.strategy.name, self.config.scope, tensors, without_grad)
        self.step += 1
        return stats

    def _execute(self, entries: list[GradEntry], plan: MaskPlan) -> list[TensorStats]:
        """The one place where gradients are changed: zero what ``plan`` selects, in place."""
        tensors = []
        shared_ties = plan.tensors[0].cut.ties if plan.shared_ties and plan.tensors else 0
        for entry, tensor_plan, threshold in zip(entries, plan.tensors, plan.threshold_values()):
            cut = Cut(tensor_plan.cut.threshold, shared_ties) if plan.shared_ties else tensor_plan.cut
            record = MaskedEntryGuard.new_mask(entry.flat) if self._guard is not None else None
            masked, ties_used = apply_cut(
                tensor_plan.source, tensor_plan.local_index, entry.flat, cut, chunk_numel=self.config.chunk_numel, record=record
            )
            shared_ties -= ties_used
            if record is not None and masked:
                self._guard.capture(entry.param, record)
            tensors.append(TensorStats(entry.name, entry.flat.numel(), masked, tensor_plan.nonfinite, threshold))
        return tensors

    def restore_masked(self) -> int:
        """Strict mode: after ``optimizer.step()``, put the masked entries back bit for bit.

        Returns the number of entries restored (0 when strict mode is off).
        """
        return self._guard.restore() if self._guard is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "strategy": self.strategy.name, "strategy_state": self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.strategy.name:
            raise ValueError(f"state is for strategy {state.get('strategy')!r}, this masker uses {self.strategy.name!r}")
        self.step = int(state["step"])
        self.strategy.load_state_dict(state.get("strategy_state", {}))
