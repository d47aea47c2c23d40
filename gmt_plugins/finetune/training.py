"""One ``Trainer`` run per method: same weights, same batches, same seed; only the gradient treatment differs."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmt_plugins.finetune.arguments import METHODS


@dataclass
class MethodResult:
    method: str
    lora: bool
    gmt: dict[str, Any] | None
    learning_rate: float
    steps: int
    train_seconds: float
    train_cpu_seconds: float
    """This process's CPU time (``time.process_time``) over ``trainer.train()``: on a shared machine it
    counts none of the time the process waited for a core, which wall time (``train_seconds``) does."""
    heldout: dict[str, float]
    exact_match: dict[str, Any] | None
    losses: list[tuple[int, float]]
    masked_fraction: list[tuple[int, float]]
    layer_fractions: dict[str, list[tuple[int, float]]]
    trainable_parameters: int
    # {quantity: {layer: [(step, value)]}} from the gmt/layer/* log keys, layers in model order
    layer_stats: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    # gmt/energy_kept at each logged step (track_energy): the share of the squared gradient norm the masks kept
    energy_kept: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_train_loss(self) -> float:
        tail = [loss for _, loss in self.losses[-5:]]
        return sum(tail) / len(tail) if tail else float("nan")


def resolve_model_dir(model_args: Any) -> Path:
    """``--model_name_or_path``, or the embedded SmolLM2 converted to a local folder."""
    from gmt_plugins.finetune import assets

    return Path(model_args.model_name_or_path) if model_args.model_name_or_path is not None else assets.smollm2_dir()


def load_model(model_dir: Path, model_args: Any, training: Any, *, lora: bool) -> Any:
    """The causal LM of ``model_dir`` as ``ModelConfig`` and ``SFTConfig`` describe it, LoRA-wrapped if ``lora``."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from trl import get_quantization_config

    set_seed(training.seed)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype, "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": training.trust_remote_code, "quantization_config": get_quantization_config(model_args),
        **(training.model_init_kwargs or {}),
    }
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{k: v for k, v in kwargs.items() if v is not None})
    if lora:
        from peft import get_peft_model
        from trl import get_peft_config

        model = get_peft_model(model, get_peft_config(dataclasses.replace(model_args, use_peft=True)))
    return model


def gmt_config_for(method: str, gmt: Any) -> Any:
    """The ``GMTConfig`` of a masking method (``None`` for plain SFT and LoRA): ``gmt`` with the method's overrides."""
    overrides, _ = METHODS[method]
    return None if overrides is None else dataclasses.replace(gmt, **overrides)


def quiet_progress_callback() -> type:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgressCallback(ProgressCallback):
        """The Trainer's progress bar, with the loss (and masked fraction) in its postfix instead of a dict
        printed per log (per-tensor GMT logs would flood the terminal)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                postfix = {"loss": f"{logs['loss']:.4f}"}
                if "gmt/masked_fraction" in logs:
                    postfix["masked"] = f"{logs['gmt/masked_fraction']:.3f}"
                self.training_bar.set_postfix(postfix, refresh=False)

    return QuietProgressCallback


def train_method(method: str, job: Any, model_dir: Path, tokenizer: Any, train_data: Any, eval_data: Any) -> MethodResult:
    """Train ``method`` with ``job``'s arguments (a :class:`~gmt_plugins.finetune.run.Job`) and evaluate it."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from gmt_plugins.finetune.data import PadCollator
    from gmt_plugins.finetune.evaluate import exact_match, heldout_answer_loss
    from gmt_plugins.finetune.layers import layer_fractions, layer_stats

    script, training = job.script, job.training
    lora = job.model.use_peft or METHODS[method][1]
    gmt = gmt_config_for(method, job.gmt)
    lr = script.lora_learning_rate if lora else training.learning_rate
    model = load_model(model_dir, job.model, training, lora=lora)
    numels = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    out = Path(training.output_dir) / method
    args = dataclasses.replace(training, output_dir=str(out), learning_rate=lr)
    callbacks = []
    if gmt is not None:
        from gmt_plugins import GMTCallback

        callbacks.append(GMTCallback(gmt))
    trainer = Trainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data if len(eval_data) else None,
        data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer, callbacks=callbacks,
    )
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(quiet_progress_callback())
    else:
        trainer.remove_callback(PrinterCallback)  # it would print every per-tensor key of every step
    if gmt is not None:  # --report_to tensorboard etc. then receives the gmt/* statistics too
        from gmt_plugins import place_before_reporters

        place_before_reporters(trainer)
    describe = "plain SFT" if gmt is None else f"strategy={gmt.strategy} mask_ratio={gmt.mask_ratio} scope={gmt.scope}"
    steps = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    print(f"== {method}: {describe}{' + LoRA' if lora else ''}, lr={lr:g}, {steps} "
          f"x {args.per_device_train_batch_size * args.gradient_accumulation_steps} sequences", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    history = trainer.state.log_history
    start = time.perf_counter()
    heldout = heldout_answer_loss(model, eval_data, batch_size=args.per_device_eval_batch_size, pad_id=tokenizer.pad_token_id) if len(eval_data) else {}
    em = exact_match(model, tokenizer, eval_data, limit=script.exact_match) if script.exact_match else None
    if heldout:
        print(f"   {method}: trained in {seconds:.0f} s, held-out answer loss {heldout['loss']:.4f} "
              f"(evaluated in {time.perf_counter() - start:.0f} s)", flush=True)
    if script.save_models:
        trainer.save_model(str(out / "model"))
    result = MethodResult(
        method=method, lora=lora, gmt=None if gmt is None else gmt.to_dict(), learning_rate=lr,
        steps=trainer.state.global_step, train_seconds=seconds, train_cpu_seconds=cpu_seconds, heldout=heldout, exact_match=em,
        losses=[(h["step"], h["loss"]) for h in history if "loss" in h],
        masked_fraction=[(h["step"], h["gmt/masked_fraction"]) for h in history if "gmt/masked_fraction" in h],
        layer_fractions=layer_fractions(history, numels), trainable_parameters=sum(numels.values()),
        layer_stats=layer_stats(history, numels),
        energy_kept=[(h["step"], h["gmt/energy_kept"]) for h in history if "gmt/energy_kept" in h],
    )
    del trainer, model
    return result
