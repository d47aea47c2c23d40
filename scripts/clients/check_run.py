"""Check that Gradient-Mask Tuning acted in a client's training run, from the files the run left behind.

    python scripts/clients/check_run.py --label "axolotl 0.19.0 (accelerate)" --initial MODEL_DIR \
        --output OUTPUT_DIR --ratio 0.5 --steps 4

The run must use plain SGD (no momentum, no weight decay, a constant learning rate) with
``gmt_scope: tensor`` and save a checkpoint after every step. Under that optimizer an entry whose
gradient is zero does not move, and every other entry moves by ``lr * grad``. So between two
consecutive checkpoints (the initial model counts as step 0), in every trained tensor of ``n``
entries:

* at least ``floor(ratio * n)`` entries are bit-identical: the masked ones held;
* in every tensor whose gradient is dense, exactly ``floor(ratio * n)`` are: every other entry moved.
  The input embedding's gradient is zero on the rows of tokens absent from the batch, so there only
  the first claim is made.

It also checks the optimizer premise in the last checkpoint's ``optimizer.pt``, and that every step has
a ``gmt/masked_fraction`` entry in ``trainer_state.json``'s ``log_history`` equal to the masked share
``floor(ratio * n)`` gives over the saved tensors, and a ``gmt/energy_kept`` entry (the runs set
``gmt_track_energy``) strictly between 0 and 1: the masks took the smallest nonzero gradients, not all of
them. Prints one summary line and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

# Row-sparse gradients by construction: a token absent from the batch gets an exactly zero row.
SPARSE_GRADIENT = ("embed_tokens",)


@dataclass
class StepReport:
    """Entries left bit-identical by one optimizer step, against what a ``ratio`` mask leaves."""

    step: int
    unchanged: int = 0
    total: int = 0
    expected: int = 0
    tensors: int = 0
    held: int = 0
    dense: int = 0
    exact: int = 0
    problems: list[str] = field(default_factory=list)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder``."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights.update(load_file(str(path)))
    return weights


Weights = dict[str, torch.Tensor]


def compare_step(step: int, before: Weights, after: Weights, ratio: float) -> StepReport:
    """The per-tensor claims of the module docstring for one step (``before`` -> ``after``)."""
    report = StepReport(step)
    if set(before) != set(after):
        report.problems.append(f"step {step}: tensor names differ: {sorted(set(before) ^ set(after))}")
        return report
    for name in sorted(after):
        old, new = before[name], after[name]
        if old.shape != new.shape or old.dtype != new.dtype:
            report.problems.append(f"step {step}: {name}: {old.shape}/{old.dtype} became {new.shape}/{new.dtype}")
            continue
        compare_tensor(report, name, old, new, ratio)
    return report


def compare_tensor(report: StepReport, name: str, old: torch.Tensor, new: torch.Tensor, ratio: float) -> None:
    n, unchanged = new.numel(), int((old == new).sum())
    masked = math.floor(ratio * n)
    dense = not any(part in name for part in SPARSE_GRADIENT)
    report.unchanged += unchanged
    report.total += n
    report.expected += masked
    report.tensors += 1
    report.held += unchanged >= masked
    report.dense += dense
    report.exact += dense and unchanged == masked
    where = f"step {report.step}: {name}: {unchanged} of {n} entries unchanged"
    if unchanged < masked:
        report.problems.append(f"{where}, fewer than the {masked} masked")
    elif unchanged > masked and dense:
        report.problems.append(f"{where}, more than the {masked} masked")


def check_optimizer(checkpoint: Path) -> list[str]:
    """Problems with the premise: the saved optimizer must be SGD without momentum or weight decay."""
    path = checkpoint / "optimizer.pt"
    if not path.exists():
        return [f"{path} is missing: cannot confirm the optimizer"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    problems = []
    for i, group in enumerate(state["param_groups"]):
        if "momentum" not in group or "dampening" not in group:
            problems.append(f"optimizer param group {i} is not SGD's (keys {sorted(group)})")
        elif group["momentum"] != 0 or group["weight_decay"] != 0:
            momentum, decay = group["momentum"], group["weight_decay"]
            problems.append(f"optimizer param group {i}: momentum={momentum} weight_decay={decay}, need 0 and 0")
    return problems


def logged(log_history: list[dict], steps: int, key: str) -> tuple[list[float], list[str]]:
    """``key``'s values at steps 1..``steps`` (logging every step), and what is missing."""
    by_step = {entry["step"]: entry for entry in log_history if "loss" in entry}
    values, problems = [], []
    for step in range(1, steps + 1):
        entry = by_step.get(step)
        if entry is None:
            problems.append(f"step {step}: no loss entry in log_history")
        elif key not in entry:
            problems.append(f"step {step}: no {key} in its log entry (keys {sorted(entry)})")
        else:
            values.append(entry[key])
    return values, problems


def checkpoint_dirs(output: Path, steps: int) -> list[Path]:
    return [output / f"checkpoint-{step}" for step in range(1, steps + 1)]


def check(output: Path, initial: Path, ratio: float, steps: int) -> tuple[str, list[str]]:
    """(the figures of the summary line, every problem found)."""
    checkpoints = checkpoint_dirs(output, steps)
    missing = [str(c) for c in checkpoints if not c.is_dir()]
    if missing:
        return "", [f"missing checkpoints: {missing}"]
    problems = check_optimizer(checkpoints[-1])
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    if state["global_step"] != steps:
        problems.append(f"trainer_state.json: global_step {state['global_step']}, expected {steps}")
    fractions, log_problems = logged(state["log_history"], steps, "gmt/masked_fraction")
    energies, energy_problems = logged(state["log_history"], steps, "gmt/energy_kept")
    problems += log_problems + energy_problems
    problems += [f"step {step}: gmt/energy_kept {e} is not strictly between 0 and 1" for step, e in enumerate(energies, 1) if not 0 < e < 1]
    weights = [load_weights(initial)] + [load_weights(c) for c in checkpoints]
    reports = [compare_step(step, weights[step - 1], weights[step], ratio) for step in range(1, steps + 1)]
    for report in reports:
        problems += report.problems
    last = reports[-1]
    expected = last.expected / max(last.total, 1)
    problems += [
        f"step {step}: gmt/masked_fraction {f} logged, floor(ratio*n) over the saved tensors is {expected}"
        for step, f in enumerate(fractions, 1) if abs(f - expected) > 1e-6
    ]
    shown = ", ".join(f"{f:.4f}" for f in fractions)
    held = sum(r.held for r in reports), sum(r.tensors for r in reports)
    exact = sum(r.exact for r in reports), sum(r.dense for r in reports)
    figures = (
        f"{steps} steps, gmt/masked_fraction logged at {len(fractions)}/{steps} steps ({shown}); "
        f"gmt/energy_kept {', '.join(f'{e:.4f}' for e in energies)}; "
        f"entries unchanged by the last step {last.unchanged / max(last.total, 1):.4f} "
        f"(masked floor(ratio*n): {expected:.4f}); over all steps masked entries held in {held[0]}/{held[1]} tensors, "
        f"all others moved in {exact[0]}/{exact[1]} dense tensors"
    )
    return figures, problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="client, version and launcher, for the summary line")
    parser.add_argument("--output", type=Path, required=True, help="the run's output_dir, with checkpoint-1 .. -N")
    parser.add_argument("--initial", type=Path, required=True, help="the model folder the run started from")
    parser.add_argument("--ratio", type=float, required=True, help="gmt_mask_ratio of the run")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps of the run")
    args = parser.parse_args(argv)
    figures, problems = check(args.output, args.initial, args.ratio, args.steps)
    for problem in problems[:20]:
        print(f"  {args.label}: {problem}", file=sys.stderr)
    verdict = "FAIL" if problems else "PASS"
    counted = f" ({len(problems)} problems)" if problems else ""
    print(": ".join(part for part in (args.label, figures, verdict + counted) if part))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
