"""Plain SFT vs Gradient-Mask Tuning, side by side, with the Hugging Face ``Trainer``.

Every method starts from the same weights, sees the same batches in the same order (same seed) and
is evaluated on the same held-out answers; only the treatment of the accumulated gradient differs.
From Python: ``run(Job.from_argv(["--max_steps", "10", "--mask_ratio", "0.3"]))``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Job:
    """The parsed arguments: ``FinetuneArguments``, ``SFTConfig``, ``GMTConfig`` and ``ModelConfig``."""

    script: Any
    training: Any
    gmt: Any
    model: Any

    @classmethod
    def from_argv(cls, argv: list[str]) -> Job:
        """Parse flags (and ``--config FILE.yaml``) exactly as ``gmt-plugins finetune`` does."""
        from gmt_plugins.finetune.arguments import parse_args

        return cls(*parse_args(argv))

    @property
    def uses_embedded_assets(self) -> bool:
        return self.model.model_name_or_path is None or self.script.dataset_path is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "script": dataclasses.asdict(self.script), "training": self.training.to_dict(), "gmt": self.gmt.to_dict(),
            "model": dataclasses.asdict(self.model),
        }


def run(job: Job) -> dict[str, Any]:
    """Train every method, print the table, write ``results.json`` and ``loss_curves.png``; returns the results.

    The Hugging Face offline switches are on while the embedded model or data set is in use, and only then.
    """
    from transformers.utils import logging as hf_logging

    from gmt_plugins.finetune.arguments import validate
    from gmt_plugins.finetune.assets import offline_environment

    validate(job.script, job.training, job.gmt, job.model)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer's own bar is separate
    try:
        with offline_environment() if job.uses_embedded_assets else nullcontext():
            return _run(job)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run(job: Job) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from gmt_plugins.finetune.data import build_dataset, ensure_pad_token, load_rows
    from gmt_plugins.finetune.evaluate import exact_match, heldout_answer_loss
    from gmt_plugins.finetune.report import format_table, jsonable, plot_results, write_results
    from gmt_plugins.finetune.training import load_model, resolve_model_dir, train_method

    script, training = job.script, job.training
    wall = time.perf_counter()
    train_rows, heldout_rows, source = load_rows(script.dataset_path, script.eval_dataset_path)
    model_dir = resolve_model_dir(job.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=training.trust_remote_code)
    ensure_pad_token(tokenizer)
    train_data = build_dataset(train_rows, tokenizer, training.max_length, source=script.dataset_path or "GSM8K train split")
    heldout_rows = heldout_rows[: script.eval_size] if script.eval_size else []
    eval_data = build_dataset(heldout_rows, tokenizer, training.max_length, source="held-out data") if heldout_rows else []
    print(f"model: {model_dir}\ndata: {source}\ntrain: {len(train_data)} examples ({train_data.dropped} dropped), "
          f"eval: {len(eval_data)} held-out examples, max_length={training.max_length}, "
          f"torch threads={torch.get_num_threads()}", flush=True)

    baseline = None
    if script.baseline and len(eval_data):
        model = load_model(model_dir, job.model, training, lora=False)
        baseline = heldout_answer_loss(model, eval_data, batch_size=training.per_device_eval_batch_size, pad_id=tokenizer.pad_token_id)
        if script.exact_match:
            baseline["exact_match"] = exact_match(model, tokenizer, eval_data, limit=script.exact_match)
        print(f"== base model held-out answer loss {baseline['loss']:.4f} ({time.perf_counter() - wall:.0f} s so far)", flush=True)
        del model

    results = [train_method(m, job, model_dir, tokenizer, train_data, eval_data) for m in script.methods]
    table = format_table(results, baseline)
    wall = time.perf_counter() - wall
    print()
    print(table)
    print("\ns/step: wall clock per optimizer step; CPU s/step: this process's CPU time (time.process_time) per step, "
          "which excludes time spent waiting for a core on a shared machine")
    for line in step_ratios(results):
        print(line)
    print(f"\ntotal wall time {wall:.0f} s")
    out = Path(training.output_dir)
    payload = {
        "arguments": job.to_dict(), "model_dir": str(model_dir), "data": source, "train_examples": len(train_data),
        "eval_examples": len(eval_data), "baseline": baseline, "wall_seconds": wall, "table": table,
        "results": [dataclasses.asdict(r) for r in results], "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    write_results(out / "results.json", payload)
    if script.plot:
        png = plot_results(results, out / "loss_curves.png", title=f"{model_dir.name}: {', '.join(script.methods)}")
        print(f"wrote {out / 'results.json'} and {png}")
        payload["plot"] = str(png)
    return jsonable(payload)


def step_ratios(results: list[Any], reference: str = "sft") -> list[str]:
    """One line per method: its time per step over ``reference``'s, by wall clock and by CPU time."""
    base = next((r for r in results if r.method == reference), None)
    if base is None or not base.steps or not base.train_seconds or not base.train_cpu_seconds:
        return []
    lines = []
    for r in results:
        if r is base or not r.steps:
            continue
        wall = (r.train_seconds / r.steps) / (base.train_seconds / base.steps)
        cpu = (r.train_cpu_seconds / r.steps) / (base.train_cpu_seconds / base.steps)
        lines.append(f"{r.method} / {reference} per step: {wall:.3f} wall, {cpu:.3f} CPU")
    return lines
