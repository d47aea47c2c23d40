"""GMT under DeepSpeed ZeRO stages 1, 2 and 3: the mask runs inside the engine's optimizer step.

Why there. Under DeepSpeed the engine reduces and partitions the gradients during backward, and
``engine.step()`` builds each rank's flat fp32 gradient partition, unscales it (fp16 loss
scale), clips it by the global norm, steps the wrapped optimizer on it and frees it. The Trainer
(through accelerate) calls ``engine.step()`` inside ``accelerator.backward``, so by
``on_pre_optimizer_step`` the model has stepped and every ``p.grad`` is ``None``. The only place
where the accumulated, reduced, unscaled and clipped gradient exists is inside that step.

How. :class:`ZeroMaskHook` wraps three methods of the ZeRO optimizer *instance*:

* ``step``: marks the start and the end of one optimizer step. On an fp16 overflow DeepSpeed
  returns before touching any partition: nothing is masked and no strategy state advances.
* ``unscale_and_clip_grads``: DeepSpeed calls it once per (sub-)group, right before the inner
  optimizer steps that group, after it computed the global norm over the *unmasked* gradient (as
  the Trainer clips before ``on_pre_optimizer_step``). At its first call of a step the hook
  brings every other group's final gradient forward with DeepSpeed's own code (ZeRO-3:
  ``_prepare_sub_group`` and ``unscale_and_clip_grads``; ZeRO-1/2 with CPU offload: the partitions
  already exist; ZeRO-1/2 on the device: a copy flattened and unscaled exactly as ``step`` will),
  masks all of them in one :meth:`GradientMasker.apply_partitions`, and later makes DeepSpeed's
  own call for those groups a no-op (or copies the masked values into the partition it built).
* ZeRO-3's ``_prepare_sub_group``: a no-op for sub-groups already prepared.
* ``_optimizer_step``: in strict mode, writes the group's masked fp32 master entries back right
  after the inner optimizer stepped it, before DeepSpeed copies the group to the model.

Each rank masks only its own partition: the masker gets, per selected parameter, the flat slice of
the fp32 gradient partition that this rank owns and where it sits in the parameter
(:class:`~gmt_plugins.distributed.ShardInfo`), and the engine's histograms and tie prefixes are
reduced over the data-parallel group exactly as for FSDP2 shards. Masks are therefore entry for
entry those a single process takes on the same gradient, in both scopes.

Cost: during the step every group's fp32 gradient partition is alive at once (4 bytes per
parameter / world size); ZeRO-1/2 on the device also flatten one extra copy of the groups after
the first. Collectives: as for FSDP2 (histogram all-reduces, one small all-gather on ties, one
all-reduce of the counts).

Refused by name: ZeRO stage 0, NVMe optimizer offload, Muon, ZenFlow, torch-autocast grad scaling,
and strategies that are not exact on shards (``supports_sharded_gradients``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from gmt_plugins.distributed import ShardInfo, ShardReducer
from gmt_plugins.masker import GradientMasker
from gmt_plugins.stats import MaskStats
from gmt_plugins.strategies.base import GradEntry

WHERE = "DeepSpeed ZeRO"


def _zero_classes() -> tuple[type, ...]:
    if "deepspeed" not in sys.modules:  # nothing can be a ZeRO optimizer before deepspeed was imported
        return ()
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)


def find_zero_optimizer(obj: Any) -> Any | None:
    """The ZeRO optimizer inside ``obj``: a DeepSpeed engine, accelerate's ``DeepSpeedOptimizerWrapper``
    (what the Trainer passes to callbacks) or the ZeRO optimizer itself; ``None`` if there is none."""
    classes = _zero_classes()
    if not classes:
        return None
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        if isinstance(obj, classes):
            return obj
        obj = getattr(obj, "optimizer", None)
    return None


def uses_deepspeed(args: Any, optimizer: Any) -> bool:
    """Whether a Trainer run goes through DeepSpeed (its ``TrainingArguments`` or its optimizer say so)."""
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return True
    return find_zero_optimizer(optimizer) is not None or type(optimizer).__name__ == "DeepSpeedOptimizerWrapper"


def deepspeed_setup_problem(optimizer: Any) -> str | None:
    """Why GMT cannot mask under this DeepSpeed setup, or ``None`` if it can."""
    zero = find_zero_optimizer(optimizer)
    if zero is None:
        return (
            "DeepSpeed without ZeRO (zero_optimization.stage 0) is not supported: its engine steps the optimizer "
            "inside backward with no partition hook; use zero_optimization.stage 1, 2 or 3"
        )
    return _unsupported(zero)


def _stage(zero: Any) -> int:
    return 3 if type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3" else 2 if zero.partition_gradients else 1


def _unsupported(zero: Any) -> str | None:
    stage = _stage(zero)
    if getattr(zero, "swap_optimizer", False):
        return "DeepSpeed ZeRO-3 with offload_optimizer.device 'nvme' is not supported (partitions are swapped out); use 'cpu' or 'none'"
    if getattr(zero, "use_muon", False) or type(getattr(zero, "optimizer", None)).__name__.startswith("Muon"):
        return f"DeepSpeed ZeRO-{stage} with the Muon optimizer is not supported (it rewrites gradients inside the step)"
    if getattr(zero, "zenflow", False):
        return f"DeepSpeed ZeRO-{stage} with ZenFlow is not supported (it steps partitions asynchronously)"
    if getattr(zero, "torch_autocast_gradscaler", None) is not None:
        return f"DeepSpeed ZeRO-{stage} with torch_autocast and a GradScaler is not supported; use bf16 or DeepSpeed's fp16"
    return None


class ZeroMaskHook:
    """Masks the gradient partitions of a DeepSpeed ZeRO optimizer inside its ``step``.

    Args:
        masker (`GradientMasker`):
            Built over the model the engine trains (wrappers are removed by type); its selected
            parameters are the ones masked.
        zero_optimizer:
            The engine's ZeRO optimizer (``engine.optimizer``); :func:`attach_deepspeed` finds it.
        step_index (`Callable[[], int]`, *optional*):
            The optimizer step number to pass the strategy (the Trainer's ``global_step``);
            defaults to counting the steps that were not skipped.
        check (`bool`, *optional*, defaults to `False`):
            Verify that the gradient DeepSpeed builds for each group equals the copy the hook masked
            (ZeRO-1/2 on the device); for tests.

    After each ``engine.step()`` that stepped, :attr:`last_stats` holds the step's
    :class:`~gmt_plugins.stats.MaskStats` (full-model counts, identical on every rank) and
    :meth:`pop_stats` hands them out once.
    """

    def __init__(
        self,
        masker: GradientMasker,
        zero_optimizer: Any,
        *,
        step_index: Callable[[], int] | None = None,
        check: bool = False,
    ) -> None:
        problem = _unsupported(zero_optimizer)
        if problem:
            raise ValueError(problem)
        if not masker.strategy.supports_sharded_gradients:
            raise ValueError(masker.sharded_refusal(f"DeepSpeed ZeRO-{_stage(zero_optimizer)} partitioned"))
        self.masker = masker
        self.zero = zero_optimizer
        self.stage = _stage(zero_optimizer)
        self.check = check
        self.step_index = step_index
        self.last_stats: MaskStats | None = None
        self.restored = 0
        """Strict mode: masked entries written back after the last step that masked."""
        self._fresh = False
        self._groups = self.zero.fp16_groups if self.stage == 3 else self.zero.bit16_groups
        self._layout = self._locate_parameters()
        self._originals: dict[str, Any] = {}
        self._reset_step()
        self._install()
        masker.partitioned_by = WHERE

    # -- where each selected parameter lives ----------------------------------------------------

    def _locate_parameters(self) -> list[tuple[str, int, torch.nn.Parameter] | tuple[str, None, None]]:
        """``(name, group, param)`` per selected parameter, in the masker's order."""
        group_of = {id(p): i for i, group in enumerate(self._groups) for p in group}
        layout: list[Any] = []
        for name, param in self.masker.parameters:
            group = group_of.get(id(param))
            layout.append((name, group, param) if group is not None else (name, None, None))
        if all(group is None for _, group, _ in layout):
            raise ValueError(
                f"none of the {len(layout)} parameters GMT selected is trained by the DeepSpeed ZeRO-{self.stage} "
                "optimizer; build GMT over the model the engine trains (engine.module)"
            )
        return layout

    def _process_group(self) -> Any:
        if self.stage == 3:
            groups = {id(self.zero._get_param_partition_group(p)): self.zero._get_param_partition_group(p)
                      for _, g, p in self._layout if g is not None}
        else:
            groups = {id(self.zero.real_dp_process_group[g]): self.zero.real_dp_process_group[g] for _, g, _ in self._layout if g is not None}
        if len(groups) != 1:
            raise ValueError(
                "the parameters GMT selected are partitioned over different process groups (expert parallelism?); "
                "GMT needs one data-parallel group: exclude the expert parameters with GMTConfig(exclude=...)"
            )
        return next(iter(groups.values()))

    def _entries(self, finals: dict[int, torch.Tensor]) -> tuple[list[GradEntry], list[str]]:
        entries, without_grad = [], []
        for name, group, param in self._layout:
            if group is None:
                without_grad.append(name)
                continue
            flat, master, shard = self._slice(finals[group], group, param)
            entries.append(GradEntry(len(entries), name, master, flat, shard))
        return entries, without_grad

    def _slice(self, final: torch.Tensor, group: int, param: Any) -> tuple[torch.Tensor, torch.Tensor, ShardInfo]:
        """This rank's slice of ``param`` in its group's flat fp32 gradient ``final``, the matching
        slice of the fp32 master weights, and where the slice sits in the parameter."""
        if self.stage == 3:
            _, start, partition_numel = self.zero.grad_position[self.zero.get_param_id(param)]
            offset = self.zero._get_param_partition_rank(param) * partition_numel
            numel = max(0, min(partition_numel, param.ds_numel - offset))
            master = self.zero.fp32_partitioned_groups_flat[group].narrow(0, start, numel)
            return final.narrow(0, start, numel), master, ShardInfo(offset=offset, full_numel=param.ds_numel)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # none of this parameter lies in this rank's partition
            empty = final.new_empty(0)
            return empty, empty, ShardInfo(offset=param.numel(), full_numel=param.numel())
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        return final.narrow(0, hp.start, hp.numel), mapping.hp_fragment, ShardInfo(offset=lp.start, full_numel=param.numel())

    # -- the wrapped methods --------------------------------------------------------------------

    def _install(self) -> None:
        zero = self.zero
        names = ("step", "unscale_and_clip_grads", "_optimizer_step") + (("_prepare_sub_group",) if self.stage == 3 else ())
        for name in names:
            if name in vars(zero):
                raise RuntimeError(f"the ZeRO optimizer's {name} is already wrapped (is GMT attached twice?)")
            self._originals[name] = getattr(zero, name)
        zero.step = self._step
        zero.unscale_and_clip_grads = self._unscale_and_clip_grads
        zero._optimizer_step = self._optimizer_step
        if self.stage == 3:
            zero._prepare_sub_group = self._prepare_sub_group

    def detach(self) -> None:
        """Put the ZeRO optimizer's own methods back."""
        for name in self._originals:
            vars(self.zero).pop(name, None)
        self._originals.clear()
        self.masker.partitioned_by = None

    def _reset_step(self) -> None:
        self._started = False  # whether this step's mask was taken
        self._done: set[int] = set()  # groups unscaled (and masked in place) ahead of DeepSpeed's call
        self._copies: dict[int, torch.Tensor] = {}  # ZeRO-1/2 on the device: masked copies of later groups
        self._held: dict[Any, Any] = {}  # strict mode: the masked master entries of each group

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_step()
        try:
            return self._originals["step"](*args, **kwargs)
        finally:
            leftover = set(self._copies) | set(self._held)
            self._reset_step()
            if leftover:
                raise RuntimeError(f"DeepSpeed did not step the groups {sorted(leftover)} that GMT masked")

    def _optimizer_step(self, group: int, *args: Any, **kwargs: Any) -> Any:
        result = self._originals["_optimizer_step"](group, *args, **kwargs)
        guard = self._held.pop(group, None)
        if guard is not None:  # strict: before DeepSpeed copies this group's fp32 partition to the model
            self.restored += guard.restore()
        return result

    def _prepare_sub_group(self, sub_group_id: int, *args: Any, **kwargs: Any) -> Any:
        if sub_group_id in self._done:
            return None
        return self._originals["_prepare_sub_group"](sub_group_id, *args, **kwargs)

    def _unscale_and_clip_grads(self, first: Any, total_norm: Any) -> Any:
        unscale = self._originals["unscale_and_clip_grads"]
        group = first if self.stage == 3 else self._group_of(first[0])
        if group in self._done:
            return None
        result = unscale(first, total_norm)
        if not self._started:
            self._started = True
            self._mask_step(group, total_norm)
        elif group in self._copies:
            self._take_copy(group, first[0])
        return result

    def _group_of(self, grad: torch.Tensor) -> int:
        for i, master in enumerate(self.zero.single_partition_of_fp32_groups):
            if master.grad is grad:
                return i
        raise RuntimeError("DeepSpeed unscaled a gradient partition GMT cannot place in any parameter group")

    # -- one step -------------------------------------------------------------------------------

    def _mask_step(self, first_group: int, total_norm: Any) -> None:
        finals = {first_group: self._final_grad(first_group)}
        for group in range(len(self._groups)):
            if group != first_group:
                finals[group] = self._bring_forward(group, total_norm)
        entries, without_grad = self._entries(finals)
        if self.step_index is not None:
            self.masker.step = self.step_index()
        self.last_stats = self.masker.apply_partitions(entries, without_grad, ShardReducer(self._process_group()))
        self._fresh = True
        self.restored = 0
        guard = self.masker._guard
        if guard is not None:
            masters = {self._master(g).untyped_storage().data_ptr(): g for g in range(len(self._groups))}
            self._held = guard.split(lambda flat: masters[flat.untyped_storage().data_ptr()])

    def _master(self, group: int) -> torch.Tensor:
        """The flat fp32 master weights of ``group`` this rank steps."""
        if self.stage == 3:
            return self.zero.fp32_partitioned_groups_flat[group]
        return self.zero.single_partition_of_fp32_groups[group]

    def _final_grad(self, group: int) -> torch.Tensor:
        if self.stage == 3:
            return self.zero.fp32_partitioned_groups_flat[group].grad
        return self.zero.single_partition_of_fp32_groups[group].grad

    def _bring_forward(self, group: int, total_norm: Any) -> torch.Tensor:
        """The final (unscaled, clipped) fp32 gradient of ``group`` before DeepSpeed reaches it."""
        unscale = self._originals["unscale_and_clip_grads"]
        if self.stage == 3:
            if not self.zero.offload_optimizer:
                self._originals["_prepare_sub_group"](group, set())
            unscale(group, total_norm)
            self._done.add(group)
            return self._final_grad(group)
        if self.zero.cpu_offload:  # the fp32 partitions were filled during backward
            grad = self._final_grad(group)
            unscale([grad], total_norm)
            self._done.add(group)
            return grad
        copy = self._flatten_like_step(group)
        unscale([copy], total_norm)
        self._copies[group] = copy
        return copy

    def _flatten_like_step(self, group: int) -> torch.Tensor:
        """The flat fp32 gradient partition of ``group`` built as ZeRO-1/2's ``step`` builds it."""
        zero = self.zero
        flat = zero._get_preflattened_grad_partition(group)
        if flat is None:
            import torch.distributed as dist

            process_group = zero.real_dp_process_group[group]
            if dist.get_rank(group=process_group) == dist.get_world_size(group=process_group) - 1:
                flat = zero.flatten_dense_tensors_aligned(zero.averaged_gradients[group], int(zero.partition_size[group]))
            else:
                flat = zero.flatten(zero.averaged_gradients[group])
        return flat.to(dtype=zero.single_partition_of_fp32_groups[group].dtype, copy=True)

    @torch.no_grad()
    def _take_copy(self, group: int, grad: torch.Tensor) -> None:
        copy = self._copies.pop(group)
        if self.check:
            kept = torch.where(copy == 0, torch.zeros_like(grad), grad)
            if not torch.equal(torch.nan_to_num(kept, nan=7.0), torch.nan_to_num(copy, nan=7.0)):
                raise RuntimeError(f"DeepSpeed's gradient of group {group} differs from the copy GMT masked")
        grad.copy_(copy)

    def pop_stats(self) -> MaskStats | None:
        """The statistics of the last step that masked, once; ``None`` if no step masked since."""
        if not self._fresh:
            return None
        self._fresh = False
        return self.last_stats


def attach_deepspeed(
    masker: GradientMasker, engine_or_optimizer: Any, *, step_index: Callable[[], int] | None = None, check: bool = False
) -> ZeroMaskHook:
    """Make ``engine.step()`` mask the gradient partitions with ``masker``, for plain DeepSpeed loops.

    Example:

    ```python
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    masker = GradientMasker(engine, mask_ratio=0.2)  # the engine is unwrapped by type
    hook = attach_deepspeed(masker, engine)
    for batch in loader:
        engine.backward(engine(**batch).loss)
        engine.step()  # masks at the accumulation boundary, then steps
        stats = hook.pop_stats()  # None between boundaries and on an fp16 overflow
    ```
    """
    zero = find_zero_optimizer(engine_or_optimizer)
    if zero is None:
        problem = deepspeed_setup_problem(engine_or_optimizer)
        raise ValueError(problem or "no DeepSpeed ZeRO optimizer found")
    return ZeroMaskHook(masker, zero, step_index=step_index, check=check)
