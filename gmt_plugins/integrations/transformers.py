"""``GMTCallback``: Gradient-Mask Tuning inside any transformers ``Trainer`` (TRL's included)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gmt_plugins.config import GMTConfig, resolve_config
from gmt_plugins.masker import GradientMasker
from gmt_plugins.optimizers import OptimizerInfo, inspect_optimizer
from gmt_plugins.plugins import get_plugin_manager, strategy_registry
from gmt_plugins.state_io import STEM, has_state, load_state, save_state
from gmt_plugins.stats import MaskStats

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"


class LogWindow:
    """Running sums of the steps since the last log, so memory does not grow between logs."""

    def __init__(self, *, per_tensor: bool) -> None:
        self.per_tensor = per_tensor
        self.steps = 0
        self.fraction_sums: dict[str, float] = {}
        self.nonfinite = 0
        self.last: dict[str, float] = {}

    def add(self, stats: MaskStats) -> None:
        self.last = stats.to_log_dict(per_tensor=self.per_tensor)
        for key, value in self.last.items():
            if "masked_fraction" in key:
                self.fraction_sums[key] = self.fraction_sums.get(key, 0.0) + value
        self.nonfinite += stats.nonfinite
        self.steps += 1

    def summary(self) -> dict[str, float]:
        if not self.steps:
            return {}
        logs = dict(self.last)
        for key, total in self.fraction_sums.items():
            logs[key] = total / self.steps
        logs["gmt/nonfinite"] = float(self.nonfinite)
        logs["gmt/steps"] = float(self.steps)
        return logs


def has_per_rank_state(folders: list[str]) -> bool:
    """Whether a checkpoint holds per-rank GMT state (written under FSDP2)."""
    import glob

    return any(glob.glob(os.path.join(folder, f"{STEM}.rank*.json")) for folder in folders)


class GMTCallback(TrainerCallback):
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

    Mask statistics (``gmt/masked_fraction``, ``gmt/threshold_*``, ``gmt/nonfinite``, ...) are added to the
    Trainer's logs, so they reach ``trainer.state.log_history`` and every ``report_to`` integration.

    Args:
        config (`GMTConfig`, *optional*, defaults to `GMTConfig()`):
            The masking configuration.
        **overrides:
            Fields of [`GMTConfig`] that replace those of `config`, e.g. `mask_ratio=0.3`, `strict=True`.

    Example:

    ```python
    from gmt_plugins import GMTCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, callbacks=[GMTCallback(mask_ratio=0.2)])
    trainer.train()
    ```
    """

    def __init__(self, config: GMTConfig | None = None, **overrides: Any) -> None:
        plugin_manager = overrides.pop("plugin_manager", None)
        self.config = resolve_config(config, overrides)
        self.plugin_manager = plugin_manager or get_plugin_manager()
        strategy_registry(self.plugin_manager).get(self.config.strategy)  # unknown names fail here, not at train time
        self.masker: GradientMasker | None = None
        self.optimizer_info: OptimizerInfo | None = None
        self.last_stats = None
        self._window = LogWindow(per_tensor=self.config.log_per_tensor)
        self._handler_found = False

    # -- setup -------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._move_to_front()

    def _move_to_front(self) -> None:
        """Run before the reporting callbacks, so the stats added to ``logs`` in ``on_log`` reach them.

        A callback's ``on_log`` receives the same ``logs`` dict, in list order; the Trainer puts user callbacks
        after the ``report_to`` ones. The handler is not passed to callbacks, so it is found as the caller.
        """
        frame = sys._getframe(1)
        for _ in range(4):
            if frame is None:
                break
            handler = frame.f_locals.get("self")
            callbacks = getattr(handler, "callbacks", None)
            if isinstance(callbacks, list) and any(cb is self for cb in callbacks):
                callbacks[:] = [self] + [cb for cb in callbacks if cb is not self]
                self._handler_found = True
                return
            frame = frame.f_back
        logger.warning(
            "GMTCallback could not place itself before the reporting callbacks; GMT statistics will reach "
            "trainer.state.log_history but not the report_to integrations."
        )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self._handler_found:  # added with trainer.add_callback() after the Trainer was built
            self._move_to_front()
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        problems = [
            p for p in self.plugin_manager.hook.gmt_check_training_setup(args=args, model=model, optimizer=optimizer, config=self.config) if p
        ]
        if problems:
            raise ValueError("GMTCallback cannot work with this training setup: " + "; ".join(problems))
        if model is None:
            raise ValueError("GMTCallback needs the model at train begin, but the Trainer passed none")
        self.masker = GradientMasker(model, self.config, plugin_manager=self.plugin_manager)
        if optimizer is not None:
            self.optimizer_info = inspect_optimizer(optimizer, self.config, plugin_manager=self.plugin_manager)
            self._explain_optimizer(self.optimizer_info)
        if state.global_step > 0:
            self._resume(args, state)
        logger.info(
            "GMT: strategy=%s mask_ratio=%s scope=%s over %d tensors (%d entries)",
            self.config.strategy, self.config.mask_ratio, self.config.scope,
            len(self.masker.parameters), sum(p.numel() for _, p in self.masker.parameters),
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
        if self.masker is not None:
            self.masker.unfreeze()  # a later train() selects parameters by requires_grad again

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.masker is None:
            raise RuntimeError("GMTCallback.on_pre_optimizer_step before on_train_begin")
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
        self._window = LogWindow(per_tensor=self.config.log_per_tensor)
        # The reporting callbacks after this one read the same dict; log_history holds a copy made before on_log.
        logs.update(stats)
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and "loss" in entry:
            entry.update(stats)

    # -- checkpoints -------------------------------------------------------------------------

    def _state_stem(self) -> str:
        """Under FSDP2 each rank's strategy state covers its own shards, so each rank keeps its own file."""
        if self.masker is not None and self.masker.sharded:
            import torch.distributed as dist

            return f"{STEM}.rank{dist.get_rank()}"
        return STEM

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.masker is None or not (state.is_world_process_zero or self.masker.sharded):
            return
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if os.path.isdir(folder):
            save_state({**self.masker.state_dict(), "config": self.config.to_dict(), "sharded": self.masker.sharded}, folder, stem=self._state_stem())

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        candidates = [os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, args.resume_from_checkpoint)
        stem = STEM
        if has_per_rank_state(candidates):
            import torch.distributed as dist

            stem = f"{STEM}.rank{dist.get_rank()}"
        folder = next((c for c in candidates if has_state(c, stem=stem)), None)
        if folder is None:
            if self.masker.strategy.state_dict():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but no GMT state was found in {candidates}; the strategy "
                    f"{self.config.strategy!r} keeps state, so pass TrainingArguments(resume_from_checkpoint=<folder>)"
                )
            logger.info("GMT: no saved state found; strategy %r is stateless, resuming at step %d", self.config.strategy, state.global_step)
            return
        saved = load_state(folder, stem=stem)
        if saved.get("config", {}).get("strategy") not in (None, self.config.strategy):
            raise ValueError(f"checkpoint {folder} was trained with strategy {saved['config']['strategy']!r}, not {self.config.strategy!r}")
        saved.pop("config", None)
        saved.pop("sharded", None)
        self.masker.load_state_dict(saved)
        if self.masker.step != state.global_step:
            raise ValueError(f"GMT state in {folder} is for step {self.masker.step}, the Trainer resumes at {state.global_step}")
