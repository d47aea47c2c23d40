"""``gmt-plugins finetune``: plain SFT vs GMT on a real model and data set, on CPU in minutes.

With no flags it fine-tunes the embedded SmolLM2-135M-Instruct on the embedded GSM8K train split
(both from PyPI packages, see :mod:`gmt_plugins.finetune.assets`), then prints held-out answer losses
and writes ``results.json`` and ``loss_curves.png`` to ``--output-dir``.

Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any

from gmt_plugins.finetune import FinetuneError

PROG_ERROR_STATUS = 2
EXTRA_MODULES = {"transformers", "accelerate", "matplotlib", "gguf", "peft", "safetensors"}


def one_line_error(self: argparse.ArgumentParser, message: str) -> None:
    self.exit(PROG_ERROR_STATUS, f"{self.prog}: error: {message}\n")


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``finetune`` on the ``gmt-plugins`` sub-command parsers; returns its parser."""
    from gmt_plugins.finetune.run import METHODS, FinetuneSettings

    d = FinetuneSettings()
    p = subparsers.add_parser(
        "finetune",
        help="plain SFT vs Gradient-Mask Tuning side by side (default: SmolLM2-135M on GSM8K, CPU, minutes)",
        description=__doc__.split("\n\n")[0] + " Defaults: embedded SmolLM2-135M-Instruct and GSM8K split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.error = types.MethodType(one_line_error, p)  # one line on stderr, exit 2
    g = p.add_argument_group("inputs")
    g.add_argument("--model", help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", help="JSONL with question/answer, prompt/completion or text columns (default: embedded GSM8K)")
    g.add_argument("--eval-data", help="held-out JSONL (default: a hash-based 20%% split of --data)")
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated, from: {', '.join(METHODS)}")
    g.add_argument("--strategy", default=d.strategy, help="mask strategy of the 'gmt' method (see gmt-plugins list)")
    g.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help="fraction of gradient entries zeroed, 0 <= r < 1")
    g.add_argument("--scope", default=d.scope, choices=["tensor", "global"], help="threshold per tensor or over all parameters")
    g.add_argument("--strict", action="store_true", help="hold masked entries bit-identical through the optimizer step")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=d.lora, help="train LoRA adapters (r=--lora-r) instead of all weights")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    g = p.add_argument_group("training")
    g.add_argument("--optim", default=d.optim, help="TrainingArguments.optim")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per method")
    g.add_argument("--learning-rate", type=float, default=None, help="default: 3e-5 full fine-tuning, 3e-4 LoRA")
    g.add_argument("--lr-scheduler", default=d.lr_scheduler, help="TrainingArguments.lr_scheduler_type")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per sequence (prompt + answer), cut from the right")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches accumulated per optimizer step")
    g.add_argument("--seed", type=int, default=d.seed, help="same seed for every method: same init, batches and order")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out examples scored by answer loss (0: none)")
    g.add_argument("--exact-match", type=int, default=d.exact_match, metavar="N",
                   help="also greedy-decode N held-out problems and score the final '#### number' (slow on CPU)")
    g.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip evaluating the untrained model")
    g.add_argument("--output-dir", default=d.output_dir, help="results.json, loss_curves.png and per-method folders")
    g.add_argument("--save-models", action="store_true", help="save each method's final weights under OUTPUT_DIR/<method>/model")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def settings_from_args(args: argparse.Namespace) -> Any:
    from gmt_plugins.finetune.run import FinetuneSettings

    return FinetuneSettings(
        model=args.model, data=args.data, eval_data=args.eval_data,
        methods=[m.strip() for m in str(args.methods).split(",") if m.strip()],
        strategy=args.strategy, mask_ratio=args.mask_ratio, scope=args.scope, strict=args.strict, lora=args.lora,
        lora_r=args.lora_r, optim=args.optim, steps=args.steps, learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler, max_length=args.max_length, batch_size=args.batch_size,
        grad_accum=args.grad_accum, eval_size=args.eval_size, exact_match=args.exact_match, baseline=args.baseline,
        seed=args.seed, output_dir=args.output_dir, save_models=args.save_models, plot=args.plot, progress=args.progress,
    )


def run_finetune(args: argparse.Namespace) -> int:
    """Run the job from parsed arguments; bad input prints one line on stderr and returns 2."""
    try:
        from gmt_plugins.finetune.run import run

        run(settings_from_args(args))
    except FinetuneError as err:
        print(f"gmt-plugins finetune: error: {err}", file=sys.stderr)
        return PROG_ERROR_STATUS
    except ModuleNotFoundError as err:
        if err.name not in EXTRA_MODULES:
            raise
        print(f'gmt-plugins finetune: error: {err}; install the extra: pip install "gmt-plugins[finetune]"', file=sys.stderr)
        return PROG_ERROR_STATUS
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m gmt_plugins.finetune.cli``: the sub-command on its own."""
    parser = argparse.ArgumentParser(prog="gmt-plugins")
    sub = parser.add_subparsers(dest="command", required=True)
    add_finetune_parser(sub)
    return run_finetune(parser.parse_args(["finetune", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
