"""DSEE's sparse half: a fixed mask of the entries a low-rank approximation of the weight misses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gmt_plugins.strategies._layers import matches_any
from gmt_plugins.strategies._masks import check_patterns
from gmt_plugins.strategies._sparse import check_state_keys, top_count, trainable_plan
from gmt_plugins.strategies.lift import low_rank
from gmt_plugins.strategy_api import (
    GMTConfig,
    GradEntry,
    MaskPlan,
    MaskStrategy,
    StrategyRegistry,
    check_choice,
    check_float,
    check_int,
    hookimpl,
    load_bool_masks,
    stable_salt,
)

VECTOR_CHOICES = ("freeze", "update")


@dataclass
class DSEEOptions:
    rank: int = 16
    """Rank of the approximation ``W_r`` subtracted from each weight before ranking ``|W - W_r|``."""
    density: float = 0.001
    """Share of each weight matrix that is trained, in (0, 1]; ignored when ``num_sparse`` is set."""
    num_sparse: int | None = None
    """Entries trained per weight matrix (the paper's ``num_sparse``), instead of ``density``."""
    dense: list[str] = field(default_factory=lambda: ["lora_"])
    """Regular expressions of parameters trained fully (the low-rank half: PEFT's LoRA matrices)."""
    vectors: str = "freeze"
    """1-D parameters (biases, norms) not matching ``dense``: ``freeze`` or ``update`` fully."""

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        self.density = check_float("density", self.density, 0.0, 1.0, low_open=True)
        if self.num_sparse is not None:
            check_int("num_sparse", self.num_sparse, 1)
        self.dense = check_patterns("dense", self.dense)
        check_choice("vectors", self.vectors, VECTOR_CHOICES)


class DSEEStrategy(MaskStrategy):
    """DSEE, "Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models" (Chen et
    al., https://arxiv.org/abs/2111.00160), its unstructured sparse part.

    At the first step, every weight matrix ``W`` (a parameter with 2 or more dimensions, seen as
    ``shape[0] x rest``) not matching ``dense`` is split into a rank-``rank`` approximation ``W_r``
    (randomized truncated SVD seeded from ``mask_seed`` and the name; exact when ``rank`` reaches
    ``min(shape)``) and a residual ``W - W_r``. The ``num_sparse`` (or ``floor(density * n)``)
    entries of largest ``|W - W_r|`` are the only ones of ``W`` trained, for the whole run. The
    gradient plays no part; ``mask_ratio`` and ``scope`` are unused.

    The low-rank half of DSEE is a LoRA adapter: parameters matching ``dense`` (default: names with
    ``lora_``) are trained fully. With a ``PeftModel`` only ``requires_grad`` parameters are
    selected, so the base weights the sparse half should update must be unfrozen (for instance
    ``base_layer.weight`` of the LoRA target modules); a run in which no matrix gets a sparse mask
    is an error rather than plain LoRA in disguise.

    State: ``trainable`` (bool tensor per parameter name).
    """

    name = "dsee"
    options_class = DSEEOptions

    def __init__(self, config: GMTConfig) -> None:
        super().__init__(config)
        self.trainable: dict[str, torch.Tensor] = {}

    def count(self, numel: int) -> int:
        opts = self.options
        return min(opts.num_sparse, numel) if opts.num_sparse is not None else math.floor(opts.density * numel)

    def residual(self, entry: GradEntry) -> torch.Tensor:
        """``|W - W_r|`` of a weight matrix, flat float32."""
        weight = entry.param.detach().to(torch.float32)
        matrix = weight.reshape(weight.shape[0], -1)
        generator = torch.Generator().manual_seed(stable_salt(self.config.mask_seed, "dsee", entry.name))
        return (matrix - low_rank(matrix, self.options.rank, generator)).reshape(-1).abs()

    def choose(self, entry: GradEntry) -> torch.Tensor:
        """The bool mask (shaped like the parameter) of the entries of ``entry`` that are trained."""
        shape, device = entry.param.shape, entry.flat.device
        if matches_any(entry.name, self.options.dense):
            return torch.ones(shape, dtype=torch.bool, device=device)
        if entry.param.dim() < 2:
            return torch.full(shape, self.options.vectors == "update", dtype=torch.bool, device=device)
        score = self.residual(entry)
        return top_count(score, self.count(score.numel()), self.config.chunk_numel, largest=True).view(shape)

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        fresh = [e for e in entries if e.name not in self.trainable]
        for e in fresh:
            self.trainable[e.name] = self.choose(e)
        if fresh and not any(e.param.dim() >= 2 and not matches_any(e.name, self.options.dense) for e in entries):
            raise ValueError(
                f"strategy 'dsee' found no weight matrix outside its dense patterns {self.options.dense} among the "
                f"{len(entries)} selected parameters, so its sparse half would train nothing. With a PeftModel, set "
                "requires_grad=True on the base weights the sparse update should reach (e.g. 'base_layer.weight')"
            )
        return trainable_plan(entries, self.trainable, self.config.chunk_numel)

    def state_dict(self) -> dict[str, Any]:
        return {"trainable": dict(self.trainable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"trainable"})
        self.trainable = load_bool_masks(state.get("trainable", {}), "trainable")


@hookimpl
def gmt_register_strategies(register: StrategyRegistry) -> None:
    register.add(DSEEStrategy)
