"""Converged comparison: plain SFT, GMT (tensor and global scope) and the random mask, each at its
best learning rate, over several seeds, with held-out curves. Driven by ``benchmarks/quality.py
--converged`` (see its ``--help``); this module holds the runs and the report.

Protocol (both tasks):

1. sweep: every method at every learning rate of ``--*-lrs``, seed ``seeds[0]``;
2. the best learning rate of each method (best final held-out metric of the sweep) is run at the
   other seeds;
3. each run evaluates the held-out metric every ``--*-eval-every`` optimizer steps (and at step 0),
   so the report shows whether the curve has flattened, and summarises the final metric at the best
   learning rate as mean, standard deviation and min-max over the seeds, with per-seed differences
   to plain SFT (same seed: same initial weights, same batches).

Runs go to worker processes (``--jobs``, one torch thread each); each run's result is a JSON file in
``--work-dir``/runs, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

MASKED = {
    "gmt-tensor": {"strategy": "gmt", "scope": "tensor"},
    "gmt-global": {"strategy": "gmt", "scope": "global"},
    "random": {"strategy": "random", "scope": "tensor"},
}
CONVERGED_METHODS = ["sft", "gmt-tensor", "gmt-global", "random"]
HIGHER_IS_BETTER = {"llm": False, "cls": True}
METRIC = {"llm": "held-out answer loss", "cls": "held-out accuracy"}


def run_name(task: str, method: str, lr: float, seed: int) -> str:
    return f"{task}-{method}-lr{lr:g}-s{seed}"


class _Curve:
    """A ``TrainerCallback`` that evaluates every ``every`` optimizer steps and at the last step."""

    def __new__(cls, evaluate, every: int):
        from transformers import TrainerCallback

        class Curve(TrainerCallback):
            def __init__(self) -> None:
                self.points: list[tuple[int, float]] = []

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0 or state.global_step == state.max_steps:
                    self.points.append((state.global_step, evaluate(model)))

        return Curve()


@functools.lru_cache(maxsize=None)
def _llm_data(max_length: int, eval_size: int):
    from transformers import AutoTokenizer

    from gmt_plugins.finetune import assets
    from gmt_plugins.finetune.data import build_dataset, ensure_pad_token

    folder = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ensure_pad_token(tokenizer)
    train_rows, heldout_rows = assets.gsm8k_split()
    train = build_dataset(train_rows, tokenizer, max_length, source="GSM8K train split")
    heldout = build_dataset(heldout_rows[:eval_size], tokenizer, max_length, source="held-out data")
    return folder, tokenizer, train, heldout


def spread(rows: list, size: int) -> list:
    """``size`` rows taken at an even stride over ``rows`` (all of them for 0 or more than there are).

    The movie-review held-out split is ordered by label (its first 1,000 rows are 97% positive, the
    whole split 49%), so its first rows would measure the classifier's bias, not its accuracy."""
    if not size or size >= len(rows):
        return list(rows)
    return [rows[i * len(rows) // size] for i in range(size)]


@functools.lru_cache(maxsize=None)
def _cls_data(max_length: int, eval_size: int):
    from transformers import AutoTokenizer

    from gmt_plugins.finetune import assets

    folder = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_rows, heldout_rows = assets.movie_reviews_split()

    def encode(rows):
        return [{**tokenizer(r["text"], truncation=True, max_length=max_length), "labels": r["label"]} for r in rows]

    return folder, tokenizer, encode(train_rows), encode(spread(heldout_rows, eval_size))


def one_run(task: str, method: str, lr: float, seed: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, method, learning rate, seed) and return its curve and final metric."""
    import torch

    torch.set_num_threads(1)
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from gmt_plugins.finetune.assets import offline_environment

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    side_losses: list[float] = []
    with offline_environment():
        if task == "llm":
            from transformers import AutoModelForCausalLM

            from gmt_plugins.finetune.data import PadCollator
            from gmt_plugins.finetune.evaluate import heldout_answer_loss

            folder, tokenizer, train, heldout = _llm_data(opts["llm_max_length"], opts["llm_eval_size"])
            set_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            collate = PadCollator(tokenizer.pad_token_id)

            def evaluate(m):
                return heldout_answer_loss(m, heldout, batch_size=8, pad_id=tokenizer.pad_token_id)["loss"]

            steps, batch, accum, every = opts["llm_steps"], opts["llm_batch_size"], opts["llm_grad_accum"], opts["llm_eval_every"]
        else:
            from transformers import AutoModelForSequenceClassification

            folder, tokenizer, train, heldout = _cls_data(opts["cls_max_length"], opts["cls_eval_size"])
            set_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
            collate = DataCollatorWithPadding(tokenizer)

            def evaluate(m):
                accuracy, loss = _accuracy(m, heldout, collate)
                side_losses.append(loss)  # held-out cross-entropy, beside the accuracy curve
                return accuracy

            steps, batch, accum, every = opts["cls_steps"], opts["cls_batch_size"], opts["cls_grad_accum"], opts["cls_eval_every"]
        callbacks: list[Any] = []
        if method in MASKED:
            from gmt_plugins import GMTCallback

            callbacks.append(GMTCallback(mask_ratio=opts["mask_ratio"], mask_seed=seed, **MASKED[method]))
        curve = _Curve(evaluate, every)
        callbacks.append(curve)
        targs = TrainingArguments(
            output_dir=str(Path(opts["work_dir"]) / "trainer" / run_name(task, method, lr, seed)), max_steps=steps,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accum, learning_rate=lr,
            lr_scheduler_type="linear", warmup_steps=max(1, steps // 10), weight_decay=0.0, logging_steps=5,
            save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=seed,
            data_seed=seed, dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, processing_class=tokenizer, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        curve.points.append((0, evaluate(model)))
        trainer.train()
        seconds = time.perf_counter() - start
    history = trainer.state.log_history
    masked = [h["gmt/masked_fraction"] for h in history if "gmt/masked_fraction" in h]
    return {
        "task": task, "method": method, "learning_rate": lr, "seed": seed, "steps": trainer.state.global_step,
        "curve": curve.points, "final": curve.points[-1][1], "seconds": seconds,
        "curve_loss": [(step, loss) for (step, _), loss in zip(curve.points, side_losses)] if side_losses else None,
        "losses": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "masked_fraction": sum(masked) / len(masked) if masked else None,
        "sequences_per_step": batch * accum, "train_examples": len(train), "heldout_examples": len(heldout),
    }


def _accuracy(model, data, collate, batch_size: int = 128) -> tuple[float, float]:
    """Held-out accuracy and mean cross-entropy."""
    import torch

    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    data = sorted(data, key=lambda ex: len(ex["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate(data[start : start + batch_size])
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
    model.train(was_training)
    return correct / len(data), loss / len(data)


def _worker(args: tuple) -> dict[str, Any]:
    task, method, lr, seed, opts, path = args
    os.environ["OMP_NUM_THREADS"] = "1"
    result = one_run(task, method, lr, seed, opts)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, path)
    return result


def best_lr(runs: list[dict], task: str, method: str, seed: int) -> float | None:
    sweep = [r for r in runs if r["task"] == task and r["method"] == method and r["seed"] == seed]
    if not sweep:
        return None
    key = (lambda r: r["final"]) if HIGHER_IS_BETTER[task] else (lambda r: -r["final"])
    return max(sweep, key=key)["learning_rate"]


def run_all(opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Sweep, then seeds at each method's best learning rate; returns every run (cached runs included)."""
    folder = Path(opts["work_dir"]) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    tasks, methods, seeds = opts["tasks"], opts["methods"], opts["seeds"]
    lrs = {"llm": opts["llm_lrs"], "cls": opts["cls_lrs"]}
    runs: list[dict] = []

    def cached(task, method, lr, seed):
        path = folder / f"{run_name(task, method, lr, seed)}.json"
        return (json.loads(path.read_text()) if path.exists() else None), path

    pending: dict = {}
    with ProcessPoolExecutor(max_workers=opts["jobs"], max_tasks_per_child=1) as pool:

        def submit(task, method, lr, seed):
            result, path = cached(task, method, lr, seed)
            if result is not None:
                runs.append(result)
                return
            future = pool.submit(_worker, (task, method, lr, seed, opts, path))
            pending[future] = (task, method, lr, seed)

        # the sweep, tasks in the order given
        for task in tasks:
            for lr in lrs[task]:
                for method in methods:
                    submit(task, method, lr, seeds[0])
        seeded: set = set()

        def submit_seeds():
            for task in tasks:
                for method in methods:
                    done = {r["learning_rate"] for r in runs if r["task"] == task and r["method"] == method and r["seed"] == seeds[0]}
                    if done >= set(lrs[task]) and (task, method) not in seeded:
                        seeded.add((task, method))
                        lr = best_lr(runs, task, method, seeds[0])
                        for seed in seeds[1:]:
                            submit(task, method, lr, seed)

        submit_seeds()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                task, method, lr, seed = pending.pop(future)
                result = future.result()
                runs.append(result)
                print(f"   {run_name(task, method, lr, seed)}: {METRIC[task]} {result['final']:.4f} "
                      f"({result['seconds']:.0f} s, {len(pending)} running/queued)", flush=True)
            submit_seeds()
    return runs


# -- report -------------------------------------------------------------------------------------------


def summarise(runs: list[dict], opts: dict[str, Any]) -> dict[str, Any]:
    seeds = opts["seeds"]
    out: dict[str, Any] = {}
    for task in opts["tasks"]:
        sft_by_seed = {}
        lr_sft = best_lr(runs, task, "sft", seeds[0])
        for r in runs:
            if r["task"] == task and r["method"] == "sft" and r["learning_rate"] == lr_sft:
                sft_by_seed[r["seed"]] = r["final"]
        rows = {}
        for method in opts["methods"]:
            lr = best_lr(runs, task, method, seeds[0])
            chosen = sorted((r for r in runs if r["task"] == task and r["method"] == method and r["learning_rate"] == lr), key=lambda r: r["seed"])
            finals = [r["final"] for r in chosen]
            sweep = {r["learning_rate"]: r["final"] for r in runs if r["task"] == task and r["method"] == method and r["seed"] == seeds[0]}
            rows[method] = {
                "best_lr": lr, "sweep": dict(sorted(sweep.items())), "seeds": [r["seed"] for r in chosen], "finals": finals,
                "mean": statistics.mean(finals) if finals else math.nan,
                "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "min": min(finals, default=math.nan), "max": max(finals, default=math.nan),
                "delta_vs_sft": [r["final"] - sft_by_seed[r["seed"]] for r in chosen if r["seed"] in sft_by_seed],
                "plateau": [_plateau(r["curve"]) for r in chosen],
                "seconds": statistics.mean(r["seconds"] for r in chosen) if chosen else math.nan,
                "masked_fraction": chosen[0]["masked_fraction"] if chosen else None,
                "curves": {r["seed"]: r["curve"] for r in chosen},
            }
        out[task] = rows
    return out


def _plateau(curve: list) -> float:
    """Change of the metric over the last third of the steps, as a fraction of its whole change."""
    if len(curve) < 3:
        return math.nan
    first, last = curve[0][1], curve[-1][1]
    cut = curve[-1][0] * 2 / 3
    mid = min(curve, key=lambda p: abs(p[0] - cut))[1]
    total = last - first
    return (last - mid) / total if total else 0.0


def table(summary: dict[str, Any], task: str) -> str:
    fmt = "{:.4f}"
    lines = [
        f"| method | learning rates swept: final {METRIC[task]} (seed 0) | best lr | mean ± std over seeds | min - max "
        "| Δ vs sft per seed | last third of the curve / whole change | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summary[task].items():
        sweep = ", ".join(f"{lr:g}: {fmt.format(v)}" for lr, v in s["sweep"].items())
        deltas = ", ".join(f"{d:+.4f}" for d in s["delta_vs_sft"]) if method != "sft" else "-"
        plateau = ", ".join(f"{p:.2f}" for p in s["plateau"])
        lines.append(
            f"| {method} | {sweep} | {s['best_lr']:g} | {fmt.format(s['mean'])} ± {fmt.format(s['std'])} ({len(s['finals'])} seeds) "
            f"| {fmt.format(s['min'])} - {fmt.format(s['max'])} | {deltas} | {plateau} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    colours = {"sft": "black", "gmt-tensor": "tab:blue", "gmt-global": "tab:green", "random": "tab:red"}
    for ax, task in zip(axes[0], tasks):
        for method, s in summary[task].items():
            for i, (seed, curve) in enumerate(sorted(s["curves"].items())):
                xs, ys = zip(*curve)
                ax.plot(xs, ys, color=colours.get(method), alpha=0.85, lw=1.2,
                        label=f"{method} (lr {s['best_lr']:g})" if i == 0 else None, ls=["-", "--", ":"][i % 3])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(METRIC[task])
        ax.set_title({"llm": "SmolLM2-135M + GSM8K", "cls": "MiniLM-L6 + movie-review sentiment"}[task]
                     + "\n(each method at its best lr; line style = seed)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
