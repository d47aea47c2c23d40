"""Plain SFT vs Gradient-Mask Tuning, side by side, with the Hugging Face ``Trainer``.

Every method starts from the same weights, sees the same batches in the same order (same seed) and
is evaluated on the same held-out answers; only the treatment of the accumulated gradient differs.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gmt_plugins.finetune import FinetuneError

# name -> (GMTConfig overrides or None for no masking, force LoRA)
METHODS: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "sft": (None, False),
    "gmt": ({}, False),
    "gmt-tensor": ({"scope": "tensor", "strategy": "gmt"}, False),
    "gmt-global": ({"scope": "global", "strategy": "gmt"}, False),
    "random": ({"strategy": "random"}, False),
    "lora": (None, True),
}
FULL_LR, LORA_LR = 3e-5, 3e-4


@dataclass
class FinetuneSettings:
    """Everything the job needs; the CLI fills it from flags (see ``gmt-plugins finetune --help``)."""

    model: str | None = None  # local HF folder; None = embedded SmolLM2-135M-Instruct
    data: str | None = None  # JSONL; None = embedded GSM8K train split
    eval_data: str | None = None  # JSONL; None = the held-out split of --data (or of GSM8K)
    methods: list[str] = field(default_factory=lambda: ["sft", "gmt"])
    strategy: str = "gmt"
    mask_ratio: float = 0.2
    scope: str = "tensor"
    strict: bool = False
    lora: bool = False
    lora_r: int = 8
    optim: str = "adamw_torch"
    steps: int = 20
    learning_rate: float | None = None  # None: 3e-5 full fine-tuning, 3e-4 LoRA
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_length: int = 128
    batch_size: int = 1
    grad_accum: int = 2
    eval_size: int = 48
    eval_batch_size: int = 8
    exact_match: int = 0  # held-out problems to answer by greedy generation (0 = off)
    baseline: bool = True  # evaluate the untrained model too
    seed: int = 0
    output_dir: str = "gmt-finetune-output"
    save_models: bool = False
    plot: bool = True
    progress: bool = True

    def learning_rate_for(self, lora: bool) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return LORA_LR if lora else FULL_LR


@dataclass
class MethodResult:
    method: str
    lora: bool
    gmt: dict[str, Any] | None
    learning_rate: float
    steps: int
    train_seconds: float
    heldout: dict[str, float]
    exact_match: dict[str, Any] | None
    losses: list[tuple[int, float]]
    masked_fraction: list[tuple[int, float]]
    layer_fractions: dict[str, list[tuple[int, float]]]
    trainable_parameters: int

    @property
    def final_train_loss(self) -> float:
        tail = [loss for _, loss in self.losses[-5:]]
        return sum(tail) / len(tail) if tail else float("nan")


# -- inputs -----------------------------------------------------------------------------------------


def validate(settings: FinetuneSettings) -> None:
    """Cheap checks before anything heavy is loaded; each failure is one :class:`FinetuneError` line."""
    from gmt_plugins.config import GMTConfig
    from gmt_plugins.plugins import strategy_registry

    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown or not settings.methods:
        raise FinetuneError(f"unknown method(s) {unknown or settings.methods}; choose from {', '.join(METHODS)}")
    if len(set(settings.methods)) != len(settings.methods):
        raise FinetuneError(f"methods listed twice: {settings.methods}")
    names = strategy_registry().names()
    if settings.strategy not in names:
        raise FinetuneError(f"unknown strategy {settings.strategy!r}; registered strategies: {', '.join(names)}")
    try:
        GMTConfig(mask_ratio=settings.mask_ratio, scope=settings.scope, strategy=settings.strategy)
    except ValueError as err:
        raise FinetuneError(str(err)) from None
    for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "lora_r"):
        if getattr(settings, name) < 1:
            raise FinetuneError(f"{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    for name in ("eval_size", "exact_match", "warmup_steps"):
        if getattr(settings, name) < 0:
            raise FinetuneError(f"{name.replace('_', '-')} must be >= 0, got {getattr(settings, name)}")
    if settings.learning_rate is not None and not settings.learning_rate > 0:
        raise FinetuneError(f"learning-rate must be positive, got {settings.learning_rate}")
    from transformers.training_args import OptimizerNames

    optims = [o.value for o in OptimizerNames]
    if settings.optim not in optims:
        raise FinetuneError(f"unknown optim {settings.optim!r}; transformers knows: {', '.join(optims)}")
    from transformers.trainer_utils import SchedulerType

    schedulers = [t.value for t in SchedulerType]
    if settings.lr_scheduler not in schedulers:
        raise FinetuneError(f"unknown lr-scheduler {settings.lr_scheduler!r}; transformers knows: {', '.join(schedulers)}")
    if settings.model is not None:
        folder = Path(settings.model)
        if not folder.is_dir():
            raise FinetuneError(f"model folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise FinetuneError(f"{folder} is not a Hugging Face model folder (no config.json)")
    for name in ("data", "eval_data"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise FinetuneError(f"{name.replace('_', '-')} file not found: {path}")
    if any(METHODS[m][1] for m in settings.methods) or settings.lora:
        from gmt_plugins._import_utils import is_peft_available

        if not is_peft_available():
            raise FinetuneError('LoRA needs peft: pip install "gmt-plugins[peft]"')


def resolve_model_dir(settings: FinetuneSettings) -> Path:
    from gmt_plugins.finetune import assets

    return Path(settings.model) if settings.model is not None else assets.smollm2_dir()


def load_rows(settings: FinetuneSettings) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, description)."""
    from gmt_plugins.finetune import assets
    from gmt_plugins.finetune.data import detect_format, load_jsonl

    if settings.data is None:
        train, heldout = assets.gsm8k_split()
        source = f"embedded GSM8K ({assets.gsm8k_path()}), hash split {len(train)} train / {len(heldout)} held out"
    else:
        rows = load_jsonl(settings.data)
        fmt = detect_format(rows, settings.data)
        if settings.eval_data is None:
            key = {"question/answer": "question", "prompt/completion": "prompt", "text": "text"}[fmt]
            train, heldout = assets.split_rows(rows, key)
            if not train or not heldout:
                raise FinetuneError(f"{settings.data} has {len(rows)} rows: too few to hold 20% out; pass --eval-data")
            source = f"{settings.data}, hash split {len(train)} train / {len(heldout)} held out"
        else:
            train = rows
            source = f"{settings.data} ({len(train)} rows)"
    if settings.eval_data is not None:
        heldout = load_jsonl(settings.eval_data)
        detect_format(heldout, settings.eval_data)
        source += f", held out: {settings.eval_data} ({len(heldout)} rows)"
    return train, heldout, source


# -- training ---------------------------------------------------------------------------------------


def _quiet_progress_callback():
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


def load_model(model_dir: Path, *, lora: bool, lora_r: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model


def train_method(
    method: str, settings: FinetuneSettings, model_dir: Path, tokenizer: Any, train_data: Any, eval_data: Any
) -> MethodResult:
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from gmt_plugins.finetune.data import PadCollator
    from gmt_plugins.finetune.evaluate import exact_match, heldout_answer_loss

    overrides, force_lora = METHODS[method]
    lora = settings.lora or force_lora
    gmt = None
    if overrides is not None:
        gmt = {"strategy": settings.strategy, "mask_ratio": settings.mask_ratio, "scope": settings.scope, **overrides}
        gmt.update(mask_seed=settings.seed, strict=settings.strict, log_per_tensor=True)
    lr = settings.learning_rate_for(lora)
    model = load_model(model_dir, lora=lora, lora_r=settings.lora_r, seed=settings.seed)
    numels = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    out = Path(settings.output_dir) / method
    args = TrainingArguments(
        output_dir=str(out), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=lr, lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay, optim=settings.optim, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        seed=settings.seed, data_seed=settings.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=not settings.progress,
    )
    callbacks = []
    if gmt is not None:
        from gmt_plugins import GMTCallback

        callbacks.append(GMTCallback(**gmt))
    trainer = Trainer(
        model=model, args=args, train_dataset=train_data, data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=callbacks,
    )
    if settings.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_quiet_progress_callback())
    else:
        trainer.remove_callback(PrinterCallback)  # it would print every per-tensor key of every step
    describe = "plain SFT" if gmt is None else f"strategy={gmt['strategy']} mask_ratio={gmt['mask_ratio']} scope={gmt['scope']}"
    print(f"== {method}: {describe}{' + LoRA' if lora else ''}, lr={lr:g}, {settings.steps} steps "
          f"x {settings.batch_size * settings.grad_accum} sequences", flush=True)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    start = time.perf_counter()
    heldout = heldout_answer_loss(model, eval_data, batch_size=settings.eval_batch_size, pad_id=tokenizer.pad_token_id) if len(eval_data) else {}
    em = exact_match(model, tokenizer, eval_data, limit=settings.exact_match) if settings.exact_match else None
    if heldout:
        print(f"   {method}: trained in {seconds:.0f} s, held-out answer loss {heldout['loss']:.4f} "
              f"(evaluated in {time.perf_counter() - start:.0f} s)", flush=True)
    if settings.save_models:
        trainer.save_model(str(out / "model"))
    result = MethodResult(
        method=method, lora=lora, gmt=gmt, learning_rate=lr, steps=settings.steps, train_seconds=seconds, heldout=heldout,
        exact_match=em, losses=[(h["step"], h["loss"]) for h in history if "loss" in h],
        masked_fraction=[(h["step"], h["gmt/masked_fraction"]) for h in history if "gmt/masked_fraction" in h],
        layer_fractions=layer_fractions(history, numels), trainable_parameters=sum(numels.values()),
    )
    del trainer, model
    return result


# -- per-layer masked fractions ---------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
PER_TENSOR_PREFIX = "gmt/masked_fraction/"


def layer_of(name: str) -> str:
    """``"12"`` for ``model.layers.12.mlp.up_proj.weight``; ``"embed"`` for embeddings; ``"other"`` otherwise."""
    match = _LAYER.search(name)
    if match:
        return match.group(1)
    return "embed" if "embed" in name else "other"


def _layer_order(key: str) -> tuple[int, int]:
    return (0, -1) if key == "embed" else (2, 0) if key == "other" else (1, int(key))


def layer_fractions(history: list[dict[str, Any]], numels: dict[str, int]) -> dict[str, list[tuple[int, float]]]:
    """Masked fraction of each layer (entries-weighted over its tensors) at each logged step."""
    result: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in history:
        per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for key, value in entry.items():
            if key.startswith(PER_TENSOR_PREFIX):
                name = key[len(PER_TENSOR_PREFIX) :]
                weight = numels.get(name, 1)
                acc = per_layer[layer_of(name)]
                acc[0] += value * weight
                acc[1] += weight
        for layer, (masked, total) in per_layer.items():
            result[layer].append((entry["step"], masked / total if total else 0.0))
    return {k: result[k] for k in sorted(result, key=_layer_order)}


# -- output -----------------------------------------------------------------------------------------


def format_table(results: list[MethodResult], baseline: dict[str, float] | None) -> str:
    show_em = any(r.exact_match for r in results)
    header = ["method", "trainable", "lr", "train loss (last 5)", "held-out answer loss", "ppl", "masked", "train s", "s/step"]
    if show_em:
        header.insert(6, "exact match")
    rows = []
    if baseline:
        row = ["base (no training)", "-", "-", "-", f"{baseline['loss']:.4f}", f"{baseline['perplexity']:.2f}", "-", "-", "-"]
        if show_em:
            row.insert(6, _em(baseline.get("exact_match")))
        rows.append(row)
    for r in results:
        masked = f"{sum(f for _, f in r.masked_fraction) / len(r.masked_fraction):.3f}" if r.masked_fraction else "-"
        row = [
            r.method + (" (LoRA)" if r.lora and r.method != "lora" else ""), _count(r.trainable_parameters), f"{r.learning_rate:g}",
            f"{r.final_train_loss:.4f}", f"{r.heldout.get('loss', float('nan')):.4f}", f"{r.heldout.get('perplexity', float('nan')):.2f}",
            masked, f"{r.train_seconds:.0f}", f"{r.train_seconds / max(r.steps, 1):.2f}",
        ]
        if show_em:
            row.insert(6, _em(r.exact_match))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _em(em: dict[str, Any] | None) -> str:
    return f"{em['accuracy']:.3f} (n={em['n']})" if em and em.get("n") else "-"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def plot_results(results: list[MethodResult], path: Path, *, title: str = "") -> Path:
    """Loss curves of every method (left) and, per masking method, masked fraction per layer over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked = [r for r in results if r.layer_fractions]
    reference = next((r for r in results if r.method == "sft" and r.losses), None)
    compare = [r for r in results if r is not reference and r.losses] if reference is not None else []
    panels = 1 + bool(compare) + len(masked)
    fig, axes = plt.subplots(1, panels, figsize=(6 + 4.8 * (panels - 1), 4.5), squeeze=False)
    colors = {r.method: f"C{i}" for i, r in enumerate(results)}
    ax = axes[0][0]
    for r in results:
        if not r.losses:
            continue
        steps, losses = zip(*r.losses)
        ax.plot(steps, losses, alpha=0.25, linewidth=1, color=colors[r.method])
        held = r.heldout.get("loss")
        label = f"{r.method}" + (f" (held-out {held:.3f})" if held is not None else "")
        ax.plot(steps, _moving_mean(losses), color=colors[r.method], linewidth=2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("training loss (thin: per step, thick: moving mean of 5)", fontsize=9)
    ax.legend(fontsize=8)
    if compare:
        ax = axes[0][1]
        ref = dict(reference.losses)
        for r in compare:
            pairs = [(s, loss - ref[s]) for s, loss in r.losses if s in ref]
            if pairs:
                steps, diffs = zip(*pairs)
                ax.plot(steps, diffs, color=colors[r.method], linewidth=1.5, label=r.method)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss minus plain SFT's")
        ax.set_title("same batches: difference to plain SFT", fontsize=9)
        ax.legend(fontsize=8)
    for ax, r in zip(axes[0][1 + bool(compare) :], masked):
        layers = list(r.layer_fractions)
        steps = sorted({s for series in r.layer_fractions.values() for s, _ in series})
        index = {s: i for i, s in enumerate(steps)}
        grid = [[math.nan] * len(steps) for _ in layers]
        for row, layer in enumerate(layers):
            for step, value in r.layer_fractions[layer]:
                grid[row][index[step]] = value
        ratio = (r.gmt or {}).get("mask_ratio", 0.2)
        top = max([2 * ratio, 1e-6] + [v for row in grid for v in row if not math.isnan(v)])
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=top,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5), interpolation="nearest")
        tick = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), tick), [layers[i] for i in range(0, len(layers), tick)], fontsize=7)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("layer")
        ax.set_title(f"{r.method}: masked fraction per layer ({(r.gmt or {}).get('scope')} scope)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _moving_mean(values, window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


# -- the job ----------------------------------------------------------------------------------------


def run(settings: FinetuneSettings) -> dict[str, Any]:
    """Train every method, print the table, write ``results.json`` and ``loss_curves.png``; returns the results."""
    from transformers.utils import logging as hf_logging

    validate(settings)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer's own bar is separate
    try:
        return _run(settings)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run(settings: FinetuneSettings) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from gmt_plugins.finetune.data import build_dataset, ensure_pad_token
    from gmt_plugins.finetune.evaluate import exact_match, heldout_answer_loss

    wall = time.perf_counter()
    train_rows, heldout_rows, source = load_rows(settings)
    model_dir = resolve_model_dir(settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tokenizer)
    train_data = build_dataset(train_rows, tokenizer, settings.max_length, source=settings.data or "GSM8K train split")
    heldout_rows = heldout_rows[: settings.eval_size] if settings.eval_size else []
    eval_data = build_dataset(heldout_rows, tokenizer, settings.max_length, source="held-out data") if heldout_rows else []
    print(f"model: {model_dir}\ndata: {source}\ntrain: {len(train_data)} examples ({train_data.dropped} dropped), "
          f"eval: {len(eval_data)} held-out examples, max_length={settings.max_length}, torch threads={torch.get_num_threads()}", flush=True)

    baseline = None
    if settings.baseline and len(eval_data):
        model = load_model(model_dir, lora=False, lora_r=settings.lora_r, seed=settings.seed)
        baseline = heldout_answer_loss(model, eval_data, batch_size=settings.eval_batch_size, pad_id=tokenizer.pad_token_id)
        if settings.exact_match:
            baseline["exact_match"] = exact_match(model, tokenizer, eval_data, limit=settings.exact_match)
        print(f"== base model held-out answer loss {baseline['loss']:.4f} ({time.perf_counter() - wall:.0f} s so far)", flush=True)
        del model

    results = [train_method(m, settings, model_dir, tokenizer, train_data, eval_data) for m in settings.methods]
    table = format_table(results, baseline)
    wall = time.perf_counter() - wall
    print()
    print(table)
    print(f"\ntotal wall time {wall:.0f} s")
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": asdict(settings), "model_dir": str(model_dir), "data": source, "train_examples": len(train_data),
        "eval_examples": len(eval_data), "baseline": _jsonable(baseline), "wall_seconds": wall, "table": table,
        "results": [_jsonable(asdict(r)) for r in results], "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    if settings.plot:
        png = plot_results(results, out / "loss_curves.png", title=f"{model_dir.name}: {', '.join(settings.methods)}")
        print(f"wrote {out / 'results.json'} and {png}")
        payload["plot"] = str(png)
    return payload


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
