"""LT-SFT: tune everything, keep the entries that moved most, reset, tune only those."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmt_plugins.sparse_delta import SparseDelta, TensorDelta
from gmt_plugins.strategies._sparse import check_state_keys, load_float_tensors, on_device, top_count_over, trainable_plan
from gmt_plugins.strategy_api import (
    GMTConfig,
    GradEntry,
    MaskPlan,
    MaskStrategy,
    StrategyRegistry,
    check_float,
    check_int,
    hookimpl,
    load_bool_masks,
    mask_plan,
)


@dataclass
class LTSFTOptions:
    full_steps: int = 100
    """Phase 1: optimizer steps of full fine-tuning that measure how far each entry moves."""
    sparse_steps: int | None = None
    """Phase 2: steps tuning only the chosen entries; ``None`` until training ends, after which
    every entry is frozen."""
    density: float = 0.01
    """Share of all selected entries (ranked over all tensors together) kept for phase 2, in (0, 1]."""
    num_entries: int | None = None
    """The paper's ``K``: entries kept for phase 2, instead of ``density``."""

    def __post_init__(self) -> None:
        check_int("full_steps", self.full_steps, 1)
        if self.sparse_steps is not None:
            check_int("sparse_steps", self.sparse_steps, 1)
        self.density = check_float("density", self.density, 0.0, 1.0, low_open=True)
        if self.num_entries is not None:
            check_int("num_entries", self.num_entries, 1)


class LTSFTStrategy(MaskStrategy):
    """Lottery-Ticket Sparse Fine-Tuning, "Composable Sparse Fine-Tuning for Cross-Lingual
    Transfer" (Ansell et al., ACL 2022, https://arxiv.org/abs/2110.07560).

    * Steps ``0 .. full_steps - 1`` (phase 1): nothing is masked.
    * At the boundary of step ``full_steps`` (:meth:`on_step_boundary`, before that step's update):
      the ``num_entries`` (or ``floor(density * n)``) entries with the largest
      ``|theta - theta_pretrained|`` over all selected tensors are chosen, and every parameter is
      reset to its pretrained value.
    * Phase 2 (``sparse_steps`` steps, or to the end): only the chosen entries are updated; after
      it every entry is masked.

    The pretrained copy (one extra copy of the selected parameters) is kept during phase 1 only;
    afterwards just the pretrained values of the chosen entries are, which is what
    :meth:`sparse_delta` needs to export the learned difference (see
    :mod:`gmt_plugins.sparse_delta`). ``mask_ratio`` and ``scope`` are unused.

    State: ``pretrained`` (full copies in phase 1, the chosen entries' values afterwards) and
    ``trainable`` (bool per parameter name, from the boundary on).
    """

    name = "lt_sft"
    options_class = LTSFTOptions

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.pretrained: dict[str, torch.Tensor] = {}
        self.trainable: dict[str, torch.Tensor] | None = None

    def count(self, numel: int) -> int:
        opts = self.options
        return min(opts.num_entries, numel) if opts.num_entries is not None else math.floor(opts.density * numel)

    def on_step_boundary(self, params: Sequence[tuple[str, torch.nn.Parameter]], *, step: int) -> None:
        if self.trainable is not None:
            return
        for name, param in params:
            if name not in self.pretrained:
                self.pretrained[name] = param.detach().clone()
        if step >= self.options.full_steps:
            self.choose_and_reset(params)

    def choose_and_reset(self, params: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        """End of phase 1: choose the entries that moved most, then put every parameter back."""
        moved = []
        for name, param in params:
            pretrained = on_device(self.pretrained, name, param.device)
            moved.append((param.detach().float() - pretrained.float()).view(-1))
        k = self.count(sum(m.numel() for m in moved))
        chosen = top_count_over(moved, k, self.config.chunk_numel, largest=True)  # NaN movement never chosen
        self.trainable = {}
        for (name, param), mask in zip(params, chosen):
            pretrained = self.pretrained[name]
            param.data.copy_(pretrained)
            self.trainable[name] = mask.view(param.shape)
            self.pretrained[name] = pretrained.view(-1)[mask].clone()

    def phase(self, step: int) -> int:
        opts = self.options
        if step < opts.full_steps:
            return 1
        return 2 if opts.sparse_steps is None or step < opts.full_steps + opts.sparse_steps else 3

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        phase = self.phase(step)
        if phase == 1 or self.trainable is None:
            return mask_plan(entries, [False] * len(entries), self.config.chunk_numel)
        if phase == 3:
            return mask_plan(entries, [True] * len(entries), self.config.chunk_numel)
        return trainable_plan(entries, self.trainable, self.config.chunk_numel)

    @torch.no_grad()
    def sparse_delta(self, params: Sequence[tuple[str, torch.nn.Parameter]] | torch.nn.Module) -> SparseDelta:
        """The learned difference (phase 2 so far) on the chosen entries: ``theta - theta_pretrained``.

        ``params`` are the masked parameters (or a model whose ``named_parameters`` include them,
        under the same names the masker used). Save it with
        :func:`gmt_plugins.sparse_delta.save_sparse_delta`.
        """
        if self.trainable is None:
            raise RuntimeError("lt_sft has not chosen its entries yet (phase 1 is still running)")
        named = dict(params.named_parameters() if isinstance(params, torch.nn.Module) else params)
        delta = SparseDelta()
        for name, mask in self.trainable.items():
            if name not in named:
                raise KeyError(f"parameter {name!r} chosen by lt_sft is not among the given parameters")
            flat = named[name].detach().reshape(-1)
            indices = mask.reshape(-1).to(flat.device).nonzero().view(-1)
            base = self.pretrained[name].to(flat.device)
            delta.tensors[name] = TensorDelta(tuple(mask.shape), indices.cpu(), (flat[indices].float() - base.float()).cpu())
        return delta

    def state_dict(self) -> dict[str, Any]:
        return {"pretrained": dict(self.pretrained), "trainable": None if self.trainable is None else dict(self.trainable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"pretrained", "trainable"})
        self.pretrained = load_float_tensors(state.get("pretrained", {}), "pretrained")
        trainable = state.get("trainable")
        self.trainable = None if trainable is None else load_bool_masks(trainable, "trainable")


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(LTSFTStrategy)
