"""``GMTCallback``: Gradient-Mask Tuning inside any transformers ``Trainer`` (TRL's included)."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import pluggy

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from gmt_plugins.config import UNSET, GMTConfig, resolve_config
from gmt_plugins.integrations.checkpoint import (
    CHECKPOINT_PREFIX,
    RECORD_KEY,
    build_record,
    check_record,
    checkpoint_folder,
    load_record,
    rank_stem,
)
from gmt_plugins.masker import GradientMasker
from gmt_plugins.optimizers import OptimizerInfo
from gmt_plugins.plugins import get_plugin_manager, inspect_optimizer, strategy_registry
from gmt_plugins.state_check import check_loaded_state
from gmt_plugins.state_io import STEM, has_state, load_state, save_state
from gmt_plugins.stats import MaskStats

logger = logging.getLogger(__name__)


class LogWindow:
    """Running sums of the steps since the last log, so memory does not grow between logs.

    Per-step fractions (``masked_fraction``, ``masked_nonzero_fraction``, ``churn``, ``mask_jaccard``,
    ``update_share``, ``energy_kept``, overall and per layer or tensor) are averaged over the steps that logged them; counts and cumulative numbers
    (``coverage``, ``never_updated``, thresholds) are the last step's; ``nonfinite`` is summed.
    """

    AVERAGED = ("masked_fraction", "masked_nonzero_fraction", "churn", "mask_jaccard", "update_share", "energy_kept")

    def __init__(self, *, per_tensor: bool, per_layer: bool = False) -> None:
        self.per_tensor = per_tensor
        self.per_layer = per_layer
        self.steps = 0
        self.fraction_sums: dict[str, float] = {}
        self.fraction_counts: dict[str, int] = {}
        self.nonfinite = 0
        self.last: dict[str, float] = {}

    def add(self, stats: MaskStats) -> None:
        self.last = stats.to_log_dict(per_tensor=self.per_tensor, per_layer=self.per_layer)
        for key, value in self.last.items():
            if any(part in self.AVERAGED for part in key.split("/")):
                self.fraction_sums[key] = self.fraction_sums.get(key, 0.0) + value
                self.fraction_counts[key] = self.fraction_counts.get(key, 0) + 1
        self.nonfinite += stats.nonfinite
        self.steps += 1

    def summary(self) -> dict[str, float]:
        if not self.steps:
            return {}
        logs = dict(self.last)
        for key, total in self.fraction_sums.items():
            logs[key] = total / self.fraction_counts[key]
        logs["gmt/nonfinite"] = float(self.nonfinite)
        logs["gmt/steps"] = float(self.steps)
        return logs


def has_per_rank_state(folders: list[str]) -> bool:
    """Whether a checkpoint holds per-rank GMT state (written under FSDP2)."""
    import glob

    return any(glob.glob(os.path.join(folder, f"{STEM}.rank*.json")) for folder in folders)


class GMTCallback(TrainerCallback, ExportableState):
    r"""
    A [`~transformers.TrainerCallback`] that applies Gradient-Mask Tuning (GMT).

    GMT was introduced in [Gradient-Mask Tuning Elevates the Upper Limits of LLM
    Performance](https://huggingface.co/papers/2406.15330). Once per optimizer step, after gradient
    accumulation (and, under DDP, after the all-reduce), the accumulated gradient
    $\Gamma = \frac{1}{N}\sum_{n=1}^{N} \nabla L(\Theta, B_n)$ is masked:

    $$
    \theta \leftarrow \theta - \eta \cdot \mathcal{M}(\Gamma), \quad
    \mathcal{M}(\Gamma)_{ij} = \begin{cases} 0 & |\Gamma_{ij}| < T_k \\ \Gamma_{ij} & \text{otherwise} \end{cases}
    $$

    where $T_k$ leaves exactly ``floor(mask_ratio * n)`` entries below it, per tensor (``scope="tensor"``) or
    over all selected parameters (``scope="global"``).

    Ordering: the mask runs in ``on_pre_optimizer_step``, which the Trainer fires *after* gradient clipping.
    ``max_grad_norm`` therefore clips the unmasked gradient and the logged ``grad_norm`` is the pre-mask norm;
    masking only removes entries, so the stepped gradient's norm never exceeds ``max_grad_norm``.

    With ``strict=True`` every masked entry is held bit-identical through the optimizer step (AdamW momentum and
    weight decay, and bitsandbytes' 8-bit state, otherwise still move an entry whose gradient is zero).

    Mask statistics (``gmt/masked_fraction``, ``gmt/masked_nonzero``, ``gmt/threshold_*``, ``gmt/nonfinite``, ...;
    with ``track_coverage=True`` also ``gmt/coverage``, ``gmt/never_updated``, ``gmt/churn`` and ``gmt/mask_jaccard``,
    with ``track_energy=True`` ``gmt/energy_kept``, with ``log_layers=True`` per-layer ``gmt/layer/<layer>/...``; see docs/method.md) are added to the Trainer's logs,
    so they reach ``trainer.state.log_history``; they reach the ``report_to`` integrations once
    [`place_before_reporters`] has put the callback ahead of them.

    Checkpoints: the callback is an ``ExportableState``. Its state (step, config, the strategy's state) is saved in
    ``trainer_state.json`` under ``stateful_callbacks``, with tensors in ``gmt_state.safetensors`` beside it, and
    ``trainer.train(resume_from_checkpoint=...)`` restores it by any route. A checkpoint written with another
    strategy, mask ratio, parameter set or (FSDP2) world size is refused with a ``ValueError`` naming the field.

    Args:
        config (`GMTConfig`, *optional*, defaults to `GMTConfig()`):
            The masking configuration.
        plugin_manager (`pluggy.PluginManager`, *optional*):
            Defaults to the process-wide one from `gmt_plugins.get_plugin_manager()`.

    Every field of [`GMTConfig`] is also a keyword argument (`mask_ratio`, `scope`, `strategy`, `strategy_options`,
    `mask_seed`, `include`, `exclude`, `strict`, `log_per_tensor`, `log_layers`, `track_coverage`, `track_energy`, `ratio_of`,
    `chunk_numel`: same names, types and checks) that replaces the field of `config`, e.g. `mask_ratio=0.3`,
    `strict=True`; a field not passed keeps `config`'s value.

    Example:

    ```python
    from gmt_plugins import GMTCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, callbacks=[GMTCallback(mask_ratio=0.2)])
    place_before_reporters(trainer)  # optional: gmt/* statistics in TensorBoard, W&B, ...
    trainer.train()
    ```
    """

    def __init__(
        self,
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
        self.plugin_manager = plugin_manager or get_plugin_manager()
        # unknown names and bad options fail here, not at train time (the plugin manager may not be the process-wide one)
        strategy_registry(self.plugin_manager).check_config(self.config)
        self.masker: GradientMasker | None = None
        self.optimizer_info: OptimizerInfo | None = None
        self.last_stats = None
        self._window = LogWindow(per_tensor=self.config.log_per_tensor, per_layer=self.config.log_layers)
        self._deepspeed = None
        self.before_reporters = False
        """Set by :func:`place_before_reporters`: the ``report_to`` callbacks then see the GMT statistics."""
        self._args: TrainingArguments | None = None
        self._state: TrainerState | None = None

    # -- setup -------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        problems = [
            p for p in self.plugin_manager.hook.gmt_check_training_setup(args=args, model=model, optimizer=optimizer, config=self.config) if p
        ]
        if problems:
            raise ValueError("GMTCallback cannot work with this training setup: " + "; ".join(problems))
        if model is None:
            raise ValueError("GMTCallback needs the model at train begin, but the Trainer passed none")
        self.masker = GradientMasker(model, self.config, plugin_manager=self.plugin_manager)
        self._attach_deepspeed(args, state, optimizer)
        if optimizer is not None:
            self.optimizer_info = inspect_optimizer(optimizer, self.config, plugin_manager=self.plugin_manager)
            self._explain_optimizer(self.optimizer_info)
        if state.global_step > 0:
            self._resume(args, state)
        self._args, self._state = args, state  # state() needs them when the Trainer saves a checkpoint
        self._warn_if_reporters_miss_stats(args)
        logger.info(
            "GMT: strategy=%s mask_ratio=%s scope=%s over %d tensors (%d entries)",
            self.config.strategy, self.config.mask_ratio, self.config.scope,
            len(self.masker.parameters), sum(getattr(p, "ds_numel", p.numel()) for _, p in self.masker.parameters),  # ZeRO-3: data is partitioned
        )

    def _attach_deepspeed(self, args: TrainingArguments, state: TrainerState, optimizer: Any) -> None:
        """Under DeepSpeed ZeRO the mask runs inside ``engine.step()`` (see :mod:`gmt_plugins.integrations.deepspeed`)."""
        from gmt_plugins.integrations.deepspeed import attach_deepspeed, uses_deepspeed

        if self._deepspeed is not None:  # a second train() on the same callback: the new engine gets a new hook
            self._deepspeed.detach()
            self._deepspeed = None
        if uses_deepspeed(args, optimizer):
            self._deepspeed = attach_deepspeed(self.masker, optimizer, step_index=lambda: state.global_step)

    def _warn_if_reporters_miss_stats(self, args: TrainingArguments) -> None:
        report_to = getattr(args, "report_to", None) or []
        reporters = [r for r in ([report_to] if isinstance(report_to, str) else report_to) if r != "none"]
        if reporters and not self.before_reporters:
            logger.warning(
                "GMT statistics reach trainer.state.log_history, but not the report_to integrations %s: the Trainer calls "
                "them before the callbacks you pass. Call gmt_plugins.integrations.transformers.place_before_reporters(trainer) "
                "after building the trainer to move GMTCallback first.", reporters,
            )

    def _explain_optimizer(self, info: OptimizerInfo) -> None:
        if self.config.strict or not info.moves_masked_entries:
            return
        message = (
            f"GMT: {info.family} still moves masked entries ({', '.join(info.reasons)}); the mask zeroes their "
            "gradient, not their update. Use GMTCallback(strict=True) to hold them bit-identical."
        )
        # An 8-bit state moves every masked entry from the second step on: worth a warning.
        (logger.warning if info.quantized_state else logger.info)(message)

    # -- the step ----------------------------------------------------------------------------

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Before the first micro-batch of every optimizer step: freeze what the strategy freezes for
        the whole step (``lisa``, ``hft``, ``ist``; nothing for the others)."""
        if self.masker is None:
            raise RuntimeError("GMTCallback.on_step_begin before on_train_begin")
        self.masker.step = state.global_step
        self.masker.begin_step()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # A later train() builds a new TrainerState, which calls state(): that must not write into an old checkpoint.
        self._args = self._state = None
        if self.masker is not None:
            self.masker.unfreeze()  # a later train() selects parameters by requires_grad again

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.masker is None:
            raise RuntimeError("GMTCallback.on_pre_optimizer_step before on_train_begin")
        if self._deepspeed is not None:  # masked inside engine.step(); None when an fp16 overflow skipped it
            self.last_stats = self._deepspeed.pop_stats()
            if self.last_stats is None:
                return
        else:
            self.masker.step = state.global_step
            self.last_stats = self.masker.apply()
        self._window.add(self.last_stats)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.masker is not None:
            self.masker.restore_masked()

    # -- logging -----------------------------------------------------------------------------

    def log_dict(self) -> dict[str, float]:
        """Statistics since the last log: fractions averaged over the steps, NaN/inf counts summed, the
        thresholds of the last step."""
        return self._window.summary()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or not self._window.steps or "loss" not in logs:
            return
        stats = self.log_dict()
        self._window = LogWindow(per_tensor=self.config.log_per_tensor, per_layer=self.config.log_layers)
        # The reporting callbacks after this one read the same dict; log_history holds a copy made before on_log.
        logs.update(stats)
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and "loss" in entry:
            entry.update(stats)


    # -- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The callback's entry in ``TrainerState.stateful_callbacks`` (``trainer_state.json``).

        ``Trainer._save_checkpoint`` calls this after the model and optimizer are saved and before it writes
        ``trainer_state.json`` or pushes the checkpoint, so the tensors written here are part of both. Before
        training (the Trainer also calls it when building its state) there is nothing to save yet.
        """
        exported: dict[str, Any] = {"args": self.config.to_dict(), "attributes": {}}
        if self.masker is None or self._args is None or self._state is None:
            return exported
        state, args = self._state, self._args
        folder = run_checkpoint(args, state)
        exported["attributes"][RECORD_KEY] = build_record(
            self.masker.state_dict(), config=self.config, names=self.masker.names, folder=folder,
            world_size=args.world_size, sharded=self.masker.sharded,
        )
        return exported

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Under FSDP2 every rank keeps the state of its own shards; ``state()`` runs on the saving rank only."""
        if self.masker is None or not self.masker.sharded:
            return
        import torch.distributed as dist

        folder = run_checkpoint(args, state)
        save_state({**self.masker.state_dict(), "world_size": args.world_size}, folder, stem=rank_stem(dist.get_rank()))

    def _resume_candidates(self, args: TrainingArguments, state: TrainerState) -> list[str]:
        """Folders that may be the checkpoint the Trainer resumed from (it does not tell its callbacks)."""
        name = f"{CHECKPOINT_PREFIX}-{state.global_step}"
        candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        candidates.append(run_checkpoint(args, state))
        candidates.append(os.path.join(args.output_dir, name))
        return list(dict.fromkeys(candidates))

    def _saved_record(self, state: TrainerState) -> dict[str, Any] | None:
        entry = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(entry, list):
            raise ValueError("the checkpoint holds the state of several GMTCallbacks; a Trainer takes one GMTCallback")
        if not isinstance(entry, dict):
            return None
        return entry.get("attributes", {}).get(RECORD_KEY)

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.masker is not None
        candidates = self._resume_candidates(args, state)
        record = self._saved_record(state)
        if record is None:
            saved, source = self._legacy_state(candidates)
        else:
            check_record(record, config=self.config, names=self.masker.names, world_size=args.world_size, global_step=state.global_step)
            saved, source = self._sharded_state(record, candidates) if record["sharded"] else load_record(record, candidates)
        if saved is None:
            if self.masker.strategy.state_dict():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but the checkpoint's trainer_state.json holds no GMT state and "
                    f"none of {candidates} holds gmt_state.json; the strategy {self.config.strategy!r} keeps state, so it "
                    "cannot continue. Resume from a checkpoint saved with GMTCallback, or start a new run"
                )
            logger.info(
                "GMT: no saved state found; strategy %r is stateless, resuming at step %d", self.config.strategy, state.global_step
            )
            return
        whole = not (record or {}).get("sharded") and self.masker.partitioned_by is None
        check_loaded_state(saved, self.masker.parameters, source=source, whole=whole)
        self.masker.load_state_dict(saved)
        if self.masker.step != state.global_step:
            raise ValueError(
                f"GMT state is for step {self.masker.step}, the Trainer resumes at {state.global_step}; the checkpoint is inconsistent"
            )

    def _sharded_state(self, record: dict[str, Any], candidates: list[str]) -> tuple[dict[str, Any], str]:
        import torch.distributed as dist

        stem = rank_stem(dist.get_rank())
        folder = next((c for c in candidates if has_state(c, stem=stem)), None)
        if folder is None:
            raise FileNotFoundError(
                f"the checkpoint holds per-rank GMT state, but none of {candidates} holds {stem}.json; name the checkpoint "
                "folder in TrainingArguments(resume_from_checkpoint=...)"
            )
        saved = load_state(folder, stem=stem)
        if saved.pop("world_size", record["world_size"]) != record["world_size"] or saved.get("step") != record["step"]:
            raise ValueError(
                f"{os.path.join(folder, stem)}.json is not from the same save as trainer_state.json (its step or world size differ)"
            )
        return saved, os.path.join(folder, f"{stem}.safetensors")

    def _legacy_state(self, candidates: list[str]) -> tuple[dict[str, Any] | None, str]:
        """Checkpoints written before the state moved into trainer_state.json: ``gmt_state.json`` beside it."""
        folder = next((c for c in candidates if has_state(c)), None)
        if folder is None:
            return None, ""
        saved = load_state(folder)
        strategy = saved.pop("config", {}).get("strategy")
        if strategy not in (None, self.config.strategy):
            raise ValueError(
                f"{folder}/gmt_state.json was written by strategy {strategy!r}, this run uses {self.config.strategy!r}; "
                "resume with the same strategy"
            )
        saved.pop("sharded", None)
        return saved, os.path.join(folder, f"{STEM}.safetensors")


def run_checkpoint(args: TrainingArguments, state: TrainerState) -> str:
    """The ``checkpoint-<global_step>`` folder in the Trainer's run directory."""
    return checkpoint_folder(
        args.output_dir, state.global_step, trial_name=state.trial_name, hyper_param_search=state.is_hyper_param_search
    )


def place_before_reporters(trainer: Any) -> GMTCallback:
    """Move the trainer's ``GMTCallback`` to the front of its callbacks, so ``report_to`` integrations see its statistics.

    The Trainer calls ``on_log`` in list order with one ``logs`` dict, and it puts the ``report_to`` callbacks
    (TensorBoard, W&B, ...) before the ones you pass. ``GMTCallback`` adds its numbers to that dict and to
    ``trainer.state.log_history``; the reporters see them only when it runs first. The other callbacks keep
    their order. Call it after building the trainer (and after ``trainer.add_callback(GMTCallback(...))``).

    Example:

    ```python
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, callbacks=[GMTCallback(mask_ratio=0.2)])
    place_before_reporters(trainer)
    trainer.train()
    ```
    """
    callbacks = trainer.callback_handler.callbacks
    found = [cb for cb in callbacks if isinstance(cb, GMTCallback)]
    if len(found) != 1:
        raise ValueError(f"place_before_reporters needs exactly one GMTCallback in trainer.callback_handler.callbacks, found {len(found)}")
    callbacks[:] = [found[0]] + [cb for cb in callbacks if cb is not found[0]]
    found[0].before_reporters = True
    return found[0]
