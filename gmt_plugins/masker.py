"""``GradientMasker``: mask the accumulated gradients of a model, for plain PyTorch loops."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import pluggy
import torch

from gmt_plugins import fsdp1
from gmt_plugins._checks import named_parameters_source, user_stacklevel, warn_if_no_gradient
from gmt_plugins.config import UNSET, GMTConfig, resolve_config
from gmt_plugins.coverage import CoverageTracker
from gmt_plugins.distributed import ShardReducer, is_dtensor, local_shard, reducing
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.types import CUDA, Applied, Cut, Energy
from gmt_plugins.layout import flat_view, same_layout
from gmt_plugins.plugins import get_plugin_manager, strategy_registry
from gmt_plugins.stats import MaskStats, TensorStats
from gmt_plugins.strategies.base import GradEntry, MaskPlan, MaskStrategy, TensorPlan
from gmt_plugins.strict import MaskedEntryGuard
from gmt_plugins.wrappers import unwrap_model

NamedParameters = Iterable[tuple[str, torch.nn.Parameter]]


class GradientMasker:
    """Masks the current ``.grad`` of the selected trainable parameters in place.

    Args:
        model_or_named_params (`torch.nn.Module` or iterable of `(str, Parameter)`):
            A model (wrappers are removed; plugins such as the PEFT adapter choose its parameters) or
            explicit named parameters.
        config (`GMTConfig`, *optional*, defaults to `GMTConfig()`):
            The configuration.
        plugin_manager (`pluggy.PluginManager`, *optional*):
            Defaults to the process-wide one from :func:`gmt_plugins.plugins.get_plugin_manager`.

    Every field of [`GMTConfig`] is also a keyword argument (`mask_ratio`, `scope`, `strategy`, `strategy_options`,
    `mask_seed`, `include`, `exclude`, `strict`, `log_per_tensor`, `log_layers`, `track_coverage`, `track_energy`, `ratio_of`,
    `chunk_numel`: same names, types and checks) that replaces the field of `config`, e.g. `mask_ratio=0.3`,
    `strict=True`; a field not passed keeps `config`'s value.

    Strategies that freeze whole tensors (``lisa``, ``hft``, ``ist``) save compute and optimizer
    work when :meth:`begin_step` is called before the first forward pass of every optimizer step
    (with gradient accumulation: once, before the first micro-batch); without it they only mask.

    Example:

    ```python
    masker = GradientMasker(model, mask_ratio=0.2)
    for batch in loader:
        masker.begin_step()  # freezes what the strategy freezes for this step (a no-op for gmt)
        model(**batch).loss.backward()
        stats = masker.apply()
        optimizer.step()
        masker.restore_masked()  # only does something with strict=True
        optimizer.zero_grad()  # set_to_none=True, the default: frozen tensors must keep .grad None
    masker.unfreeze()  # after training: requires_grad back on every selected parameter
    ```
    """

    def __init__(
        self,
        model_or_named_params: torch.nn.Module | NamedParameters,
        config: GMTConfig | None = None,
        *,
        mask_ratio: float = UNSET,
        scope: Literal["tensor", "global"] = UNSET,
        strategy: str = UNSET,
        strategy_options: dict | str | None = UNSET,
        mask_seed: int = UNSET,
        include: list[str] | None = UNSET,
        exclude: list[str] | None = UNSET,
        strict: bool = UNSET,
        log_per_tensor: bool = UNSET,
        log_layers: bool = UNSET,
        track_coverage: bool = UNSET,
        track_energy: bool = UNSET,
        ratio_of: Literal["all", "nonzero"] = UNSET,
        chunk_numel: int = UNSET,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        self.config = resolve_config(config, dict(
            mask_ratio=mask_ratio, scope=scope, strategy=strategy, strategy_options=strategy_options, mask_seed=mask_seed,
            include=include, exclude=exclude, strict=strict, log_per_tensor=log_per_tensor,
            log_layers=log_layers, track_coverage=track_coverage, track_energy=track_energy, ratio_of=ratio_of, chunk_numel=chunk_numel,
        ))
        model_or_named_params = named_parameters_source(model_or_named_params)  # a TypeError saying what is accepted
        self.plugin_manager = plugin_manager or get_plugin_manager()
        self.strategy = strategy_registry(self.plugin_manager).create(self.config)
        self.parameters = self._select(model_or_named_params)
        self._module = unwrap_model(model_or_named_params) if isinstance(model_or_named_params, torch.nn.Module) else None
        self._frozen: tuple[int, frozenset[str]] | None = None
        self._input_hook: Any = None
        self.step = 0
        self.sharded = False
        """Whether the last ``apply`` saw FSDP2 shards: the strategy's state is then per rank."""
        self._guard = MaskedEntryGuard(chunk_numel=self.config.chunk_numel) if self.config.strict else None
        self.partitioned_by: str | None = None
        """Set by an integration that masks inside the optimizer step (``"DeepSpeed ZeRO"``)."""
        self.coverage = CoverageTracker() if self.config.track_coverage else None
        """With ``track_coverage``: the packed per-entry bits behind coverage and churn (see :mod:`gmt_plugins.coverage`)."""
        self._record_buffers: dict[torch.device, torch.Tensor] = {}
        self.last_stats: MaskStats | None = None
        """The statistics of the last :meth:`apply` (or partitioned step)."""

    def _select(self, source: torch.nn.Module | NamedParameters) -> list[tuple[str, torch.nn.Parameter | fsdp1.FlatSlice]]:
        if isinstance(source, torch.nn.Module):
            layout = fsdp1.Layout.of(source)  # before unwrapping: the root FSDP1 module holds parameters too
            model = unwrap_model(source)
            candidates = self.plugin_manager.hook.gmt_select_parameters(model=model, config=self.config)
            if layout is not None:
                candidates = layout.expand(candidates)
        else:
            candidates = [(name, p) for name, p in source if p.requires_grad]
            fsdp1.refuse_named_flat_parameters(candidates)
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

    # -- freezing before the forward pass ----------------------------------------------------

    def begin_step(self) -> frozenset[str]:
        """Freeze, for the whole of optimizer step ``self.step``, what the strategy freezes before
        the forward pass (:meth:`MaskStrategy.frozen_before_forward`); unfreeze the rest. Returns the
        frozen names.

        Call it before the step's first forward pass (``GMTCallback`` does, in ``on_step_begin``).
        Frozen parameters get ``requires_grad=False`` and ``.grad=None``: backward computes no
        weight gradient for them, and PyTorch optimizers skip parameters whose ``.grad`` is None
        (no weight decay, no momentum), so they stay bit-identical. Zero gradients with
        ``set_to_none=True`` (the default) so that ``.grad`` stays None between steps.
        """
        frozen = frozenset(self.strategy.frozen_before_forward(self.names, step=self.step))
        unknown = frozen - set(self.names)
        if unknown:
            raise RuntimeError(f"strategy {self.strategy.name!r} froze unselected parameters {sorted(unknown)[:3]}")
        if frozen and any(is_dtensor(p) for _, p in self.parameters):
            raise ValueError(
                f"strategy {self.strategy.name!r} freezes parameters before the forward pass, which is not supported "
                "for FSDP2-sharded parameters; call apply() without begin_step() to only mask"
            )
        previous = self._frozen[1] if self._frozen is not None else frozenset()
        for name, param in self.parameters:
            if name in frozen:
                param.requires_grad_(False)
                param.grad = None
            elif name in previous:
                param.requires_grad_(True)
        self._frozen = (self.step, frozen)
        self._keep_inputs_differentiable(bool(frozen))
        return frozen

    def unfreeze(self) -> None:
        """Give the tensors :meth:`begin_step` froze ``requires_grad=True`` again (after training, or
        to stop freezing)."""
        frozen = self._frozen[1] if self._frozen is not None else frozenset()
        for name, param in self.parameters:
            if name in frozen:
                param.requires_grad_(True)
        self._frozen = None
        self._keep_inputs_differentiable(False)

    def _keep_inputs_differentiable(self, needed: bool) -> None:
        """Under reentrant gradient checkpointing a block whose inputs do not require grad computes no
        gradient for its own (trainable) parameters; with the input embeddings frozen that would be
        every block. As transformers' ``enable_input_require_grads`` does, make the embeddings' output
        require grad, but only while frozen embeddings and checkpointing make it necessary."""
        if not needed and self._input_hook is None:  # the common case (gmt freezes nothing): no module walk
            return
        module = self._module
        embeddings = module.get_input_embeddings() if module is not None and hasattr(module, "get_input_embeddings") else None
        checkpointing = module is not None and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
        weight = getattr(embeddings, "weight", None)
        needed = needed and checkpointing and isinstance(weight, torch.Tensor) and not weight.requires_grad
        if needed and self._input_hook is None:
            self._input_hook = embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        elif not needed and self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None

    def _frozen_stats(self, without_grad: list[str]) -> tuple[list[TensorStats], list[str]]:
        """Tensors frozen by :meth:`begin_step` for this step count as wholly masked, not as missing."""
        if self._frozen is None or self._frozen[0] != self.step:
            return [], without_grad
        frozen = self._frozen[1]
        local = {name: p.to_local() if is_dtensor(p) else p for name, p in self.parameters if name in frozen}
        stats = [
            self._tracked(TensorStats(name, local[name].numel(), local[name].numel(), 0, None), local[name].device)
            for name in without_grad if name in frozen
        ]
        return stats, [name for name in without_grad if name not in frozen]

    def _tracked(self, stats: TensorStats, device: torch.device) -> TensorStats:
        """The stats of a frozen tensor (every entry masked) with coverage and churn (``track_coverage``)."""
        if self.coverage is None:
            return stats
        updated, changed = self.coverage.observe(stats.name, stats.numel, None, device)
        before = self.coverage.note_masked(stats.name, stats.masked)
        return dataclasses.replace(stats, updated=updated, changed=changed, previous_masked=before)

    def _entries(self) -> tuple[list[GradEntry], list[str], ShardReducer | None]:
        """The gradients to mask, and the reducer over the shards when they are FSDP2 or FSDP1 shards."""
        entries, without_grad = [], []
        groups, whole = [], []
        for name, param in self.parameters:
            if isinstance(param, fsdp1.FlatSlice):
                grad, param, shard, group = param.local(name)
            else:
                grad, shard, group = param.grad, None, None
                if grad is not None and is_dtensor(grad):
                    grad, shard, group = local_shard(name, grad)
                    param = param.to_local() if is_dtensor(param) else param
            if grad is None:
                without_grad.append(name)
                continue
            if shard is not None:
                groups.append((name, group))
            else:
                whole.append(name)
            if grad.is_sparse:
                raise ValueError(f"gradient of {name!r} is a {type(grad).__name__} ({grad.layout}); only dense gradients can be masked")
            flat = flat_view(grad)  # memory order: channels_last gradients are masked in place too
            if flat is None or (self._guard is not None and not same_layout(param, grad)):
                raise ValueError(
                    f"gradient of {name!r} (strides {grad.stride()}, parameter {param.stride()}) is not a dense block "
                    "laid out like its parameter; masking works on flat views"
                )
            entries.append(GradEntry(len(entries), name, param, flat, shard))
        if not groups:
            return entries, without_grad, None
        if whole:
            raise ValueError(
                f"gradients of {groups[0][0]!r} and others are FSDP shards but those of {whole[:3]} are whole tensors; "
                "GMT masks either all-sharded or all-whole gradients (shard every selected parameter with fully_shard)"
            )
        if any(g is not groups[0][1] for _, g in groups):
            raise ValueError("the selected gradients are sharded over different process groups; GMT needs one group")
        if not self.strategy.supports_sharded_gradients:
            raise ValueError(self.sharded_refusal("sharded (FSDP2/FSDP1)"))
        return entries, without_grad, ShardReducer(groups[0][1])

    @torch.no_grad()
    def apply(self) -> MaskStats:
        """Mask the gradients for the current optimizer step and return what was done."""
        if self._guard is not None and self._guard.pending:
            raise RuntimeError("restore_masked() was not called after the previous optimizer step (strict mode)")
        if self.partitioned_by is not None:
            raise RuntimeError(
                f"this masker masks inside {self.partitioned_by}'s optimizer step, engine.step() (the gradients are gone by the time "
                "apply() could run); read the statistics from the attached hook instead of calling apply()"
            )
        entries, without_grad, reducer = self._entries()
        warn_if_no_gradient(self, len(entries), without_grad)
        return self._apply(entries, without_grad, reducer)

    @torch.no_grad()
    def apply_partitions(self, entries: list[GradEntry], without_grad: list[str], reducer: ShardReducer) -> MaskStats:
        """Mask gradient partitions that an integration collected itself (DeepSpeed ZeRO's flat fp32
        partitions, see :mod:`gmt_plugins.integrations.deepspeed`): every entry is a flat local slice
        with its :class:`~gmt_plugins.distributed.ShardInfo`, and every rank of ``reducer``'s group
        passes the same parameters in the same order (empty slices included)."""
        if not self.strategy.supports_sharded_gradients:
            raise ValueError(self.sharded_refusal("partitioned"))
        return self._apply(entries, without_grad, reducer)

    def sharded_refusal(self, how: str) -> str:
        """The message that refuses a strategy whose plan is not exact on shards."""
        return (
            f"strategy {self.strategy.name!r} does not support {how} gradients: its masks depend on more than "
            "elementwise keys of each shard. Use DDP, or a strategy with supports_sharded_gradients "
            "(gmt, random, gmt_momentum)"
        )

    def _apply(self, entries: list[GradEntry], without_grad: list[str], reducer: ShardReducer | None) -> MaskStats:
        self.sharded = reducer is not None
        held = self._state_to_keep(entries, reducer)
        # Parameter changes a strategy makes at a step boundary (resets) come before this step's plan.
        self.strategy.on_step_boundary(self.parameters, step=self.step)
        # a plan may leave each tensor's ranking to _execute when no state is put back after it
        self.strategy.deferrable = held is None and reducer is None
        try:
            if reducer is None:
                plan = self.strategy.plan(entries, step=self.step) if entries else MaskPlan([])
            else:
                with reducing(reducer):
                    plan = self.strategy.plan(entries, step=self.step)
        finally:
            self.strategy.deferrable = False
        if held is not None:
            self.strategy.load_state_dict(held)
        if len(plan.tensors) != len(entries):
            raise RuntimeError(f"strategy {self.strategy.name!r} planned {len(plan.tensors)} tensors for {len(entries)} gradients")
        tensors = self._execute(entries, plan) if reducer is None else self._execute_sharded(entries, plan, reducer)
        frozen, without_grad = self._frozen_stats(without_grad)
        stats = MaskStats(self.step, self.strategy.name, self.config.scope, tensors + frozen, without_grad)
        self.step += 1
        self.last_stats = stats
        return stats

    def _state_to_keep(self, entries: list[GradEntry], reducer: ShardReducer | None) -> dict[str, Any] | None:
        """A copy of the strategy's state when this step's gradients hold inf/NaN, to put back after planning.

        An AMP ``GradScaler`` skips exactly those steps, and an inf would poison an EMA for good: a stateful
        strategy's state therefore never moves on them. One read of the gradients, for strategies that keep
        state (they override ``state_dict``) only; the state is copied only on such a step (``state_dict`` may
        itself copy, as ``gmt_momentum``'s does). The test is the same on every rank, so are the collectives.
        """
        if type(self.strategy).state_dict is MaskStrategy.state_dict or not entries:
            return None
        device = entries[0].flat.device
        nonfinite = int(_any_nonfinite([e for e in entries if e.flat.numel()], device, self.config.chunk_numel))
        if reducer is not None:  # every rank skips the step: keep every rank's state
            nonfinite = reducer.sum_counts([nonfinite], device)[0]
        if not nonfinite:
            return None
        state = self.strategy.state_dict()
        return _cloned(state) if state else None

    def _mask(self, entry: GradEntry, tensor_plan: TensorPlan, cut: Cut) -> tuple[Applied, Coverage | None, Energy | None]:
        """The one place where gradients are changed: zero what ``cut`` selects of ``entry``, in place
        (and, in strict mode, keep the masked parameter entries). Returns the counts of the apply pass,
        with ``track_coverage`` this shard's ``(updated, changed, previous_masked)``, and with
        ``track_energy`` its sums of ``g ** 2`` before and after masking, taken by the same pass."""
        source, index, ranking = tensor_plan.source, tensor_plan.local_index, tensor_plan.ranking
        energy = Energy() if self.config.track_energy else None
        if self._guard is None and self.coverage is not None and cut.threshold is not None:
            # masked and folded into the coverage bits in one pass where the engine serves it
            fused = self.coverage.apply_and_observe(entry.name, source, index, entry.flat, cut, ranking, energy)
            if fused is not None:
                applied, (updated, changed) = fused
                return applied, (updated, changed, self.coverage.note_masked(entry.name, applied.masked)), energy
        if self._guard is not None:  # strict mode keeps each tensor's record until restore_masked()
            record = MaskedEntryGuard.new_mask(entry.flat)
        elif self.coverage is not None:  # folded in at once: one reused buffer, no fresh pages per tensor
            record = self._scratch_record(entry.flat)
        else:
            record = None
        applied = dispatch.apply(
            source, index, entry.flat, cut, ranking=ranking, chunk_numel=self.config.chunk_numel, record=record, energy=energy
        )
        if self._guard is not None and applied.masked:
            self._guard.capture(entry.param, record, applied.masked)
        coverage = None
        if self.coverage is not None:
            updated, changed = self.coverage.observe(entry.name, entry.flat.numel(), record, entry.flat.device)
            coverage = (updated, changed, self.coverage.note_masked(entry.name, applied.masked))
        return applied, coverage, energy

    def _scratch_record(self, flat: torch.Tensor) -> torch.Tensor:
        """A bool buffer of ``flat.numel()`` entries on ``flat``'s device for a record that is consumed
        before the next tensor's (coverage without strict mode), kept between steps: a fresh
        allocation per tensor costs the page faults of a new mapping every step (134.5 MB on SmolLM2)."""
        scratch = self._record_buffers.get(flat.device)
        if scratch is None or scratch.numel() < flat.numel():
            scratch = self._record_buffers[flat.device] = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
        return scratch[: flat.numel()]

    def _execute(self, entries: list[GradEntry], plan: MaskPlan) -> list[TensorStats]:
        """Apply ``plan`` to whole (unsharded) gradients; the global scope spends one tie budget in order.

        A step ranked on a CUDA device is applied there as a whole, with one readback."""
        first = plan.tensors[0].ranking if plan.tensors else None
        if first is not None and first.backend == CUDA:
            return self._execute_on_device(entries, plan)
        tensors = []
        shared_ties = plan.tensors[0].cut.ties if plan.shared_ties and plan.tensors else 0
        # tensor by tensor, each plan read when its tensor is masked (a deferred plan ranks then)
        for entry, tensor_plan in zip(entries, plan.tensors):
            cut = Cut(tensor_plan.cut.threshold, shared_ties) if plan.shared_ties else tensor_plan.cut
            threshold = None if cut.threshold is None else tensor_plan.source.key_to_value(tensor_plan.local_index, cut.threshold)
            applied, coverage, energy = self._mask(entry, tensor_plan, cut)
            shared_ties -= applied.ties_used
            updated, changed, before = coverage if coverage is not None else (None, None, None)
            tensors.append(TensorStats(
                entry.name, entry.flat.numel(), applied.masked, tensor_plan.nonfinite, threshold, applied.masked_nonzero, updated, changed,
                before, *_sums(energy),
            ))
        return tensors

    def _execute_on_device(self, entries: list[GradEntry], plan: MaskPlan) -> list[TensorStats]:
        """``_execute`` of a step the device path ranked (strict mode and ``track_coverage`` add their own reads)."""
        wanted = self._guard is not None or self.coverage is not None
        records = [MaskedEntryGuard.new_mask(e.flat) if wanted else None for e in entries]
        energies = [Energy() for _ in entries] if self.config.track_energy else None
        done = dispatch.apply_on_device([p.ranking for p in plan.tensors], records, energies)
        tensors = []
        for i, (entry, applied, record) in enumerate(zip(entries, done, records)):
            if self._guard is not None and applied.masked:
                self._guard.capture(entry.param, record, applied.masked)
            updated, changed, before = None, None, None
            if self.coverage is not None:
                updated, changed = self.coverage.observe(entry.name, entry.flat.numel(), record, entry.flat.device)
                before = self.coverage.note_masked(entry.name, applied.masked)
            tensors.append(TensorStats(
                entry.name, entry.flat.numel(), applied.masked, applied.nonfinite, applied.threshold,
                applied.masked_nonzero, updated, changed, before, *_sums(None if energies is None else energies[i]),
            ))
        return tensors

    def _execute_sharded(self, entries: list[GradEntry], plan: MaskPlan, reducer: ShardReducer) -> list[TensorStats]:
        """``_execute`` for FSDP2 shards: the cuts are global (``rank`` reduced them); each shard spends
        the part of the tie budget its position in flat order gives it, and the counts are summed."""
        chunk = self.config.chunk_numel
        cuts = [p.cut for p in plan.tensors]
        if plan.shared_ties and cuts:
            cuts = [Cut(c.threshold, cuts[0].ties) for c in cuts]
        straddling = [c.threshold is not None and c.ties > 0 for c in cuts]
        if any(straddling):  # the cuts are the same on every rank, so every rank takes this branch
            equal = [
                dispatch.count_equal(p.source, p.local_index, e.flat, c.threshold, chunk_numel=chunk) if s else 0
                for e, p, c, s in zip(entries, plan.tensors, cuts, straddling)
            ]
            ties = [c.ties for c in cuts]
            budgets = reducer.tie_budgets(ties, plan.shared_ties, equal, [e.offset for e in entries], entries[0].flat.device)
            cuts = [Cut(c.threshold, b) if s else c for c, b, s in zip(cuts, budgets, straddling)]
        done = [self._mask(entry, tensor_plan, cut) for entry, tensor_plan, cut in zip(entries, plan.tensors, cuts)]
        # one all-reduce for every count: masked, masked_nonzero and (track_coverage) updated, changed
        # and previous_masked
        n = len(entries)
        local = [a.masked for a, _, _ in done] + [a.masked_nonzero for a, _, _ in done]
        if self.coverage is not None:
            # every rank saw every tensor before or none did, so `changed` and `previous_masked` are None on
            # all ranks or on none: -1 stands for None, and a sum of -1s stays negative
            local += [c[0] for _, c, _ in done]
            local += [-1 if c[1] is None else c[1] for _, c, _ in done] + [-1 if c[2] is None else c[2] for _, c, _ in done]
        summed = reducer.sum_counts(local, entries[0].flat.device)
        masked_all, nonzero_all = summed[:n], summed[n : 2 * n]
        updated_all = summed[2 * n : 3 * n] if self.coverage is not None else [None] * n
        changed_all = [None if c < 0 else c for c in summed[3 * n : 4 * n]] if self.coverage is not None else [None] * n
        before_all = [None if c < 0 else c for c in summed[4 * n :]] if self.coverage is not None else [None] * n
        energies: list[list[float | None]] = [[None, None]] * n
        if self.config.track_energy:  # the shards' float64 sums in one more all-reduce
            sums = torch.tensor([[e.total, e.kept] for _, _, e in done], dtype=torch.float64, device=entries[0].flat.device)
            energies = reducer.sum_(sums).tolist()
        return [
            TensorStats(e.name, e.shard.full_numel, m, p.nonfinite, t, z, u, c, b, *energy)
            for e, p, m, t, z, u, c, b, energy in zip(
                entries, plan.tensors, masked_all, plan.threshold_values(), nonzero_all, updated_all, changed_all, before_all,
                energies,
            )
        ]

    def restore_masked(self) -> int:
        """Strict mode: after ``optimizer.step()``, put the masked entries back bit for bit.

        Returns the number of entries restored (0 when strict mode is off).
        """
        return self._guard.restore() if self._guard is not None else 0

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "strategy": self.strategy.name, "strategy_state": self.strategy.state_dict()}
        if self.coverage is not None:
            state["coverage"] = self.coverage.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.strategy.name:
            raise ValueError(f"state is for strategy {state.get('strategy')!r}, this masker uses {self.strategy.name!r}")
        self.step = int(state["step"])
        self.strategy.load_state_dict(state.get("strategy_state", {}))
        if self.coverage is not None:
            if "coverage" in state:
                self.coverage.load_state_dict(state["coverage"])
            elif self.step:
                warnings.warn(
                    f"track_coverage=True, but the state of step {self.step} holds no coverage (it was saved without "
                    "track_coverage): coverage and churn count from this step on",
                    UserWarning,
                    stacklevel=user_stacklevel(),  # the user's line: load_state_dict() or trainer.train()
                )


Coverage = tuple[int, int | None, int | None]
"""With ``track_coverage``, a tensor's ``(updated, changed, previous_masked)`` at one step."""


def _sums(energy: Energy | None) -> tuple[float | None, float | None]:
    """``TensorStats``' ``(energy, kept_energy)`` from an apply's sums (``None`` without ``track_energy``)."""
    return (None, None) if energy is None else (energy.total, energy.kept)


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _any_nonfinite(entries: list[GradEntry], device: torch.device, chunk_numel: int) -> bool:
    """Whether any gradient entry is NaN or inf. Where the engine counts them in one read, the count
    is kept for the plan (``GradEntry.nonfinite_count``), which would otherwise read them again."""
    return dispatch.any_nonfinite([e.flat for e in entries], lambda i: entries[i].nonfinite_count(chunk_numel))
