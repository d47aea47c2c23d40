"""Whether two checkouts of gmt_plugins produce bit-identical masks and statistics.

Both checkouts run the same driver (this file, with ``--dump``) in a fresh process each, with that
checkout's root as working directory and as the first entry of ``sys.path``; the driver refuses to
run unless ``gmt_plugins`` was imported from under that root. It uses the public API only
(``GradientMasker`` and ``GMTConfig``'s fields) on strategy_cost.py's tensor set (SmolLM2-135M's
shapes: 272 tensors, 134.5M fp32 entries, parameters from a seeded generator, no weights needed;
``--model tiny`` is a 4-layer set for a quick check) and its rows (every strategy and scope). Rows
run one at a time, each on freshly built parameters that are freed afterwards. Each row takes
``--steps`` steps of ``begin_step()``, seeded gradients (the same bytes in both checkouts), and
``apply()`` with ``track_coverage``, ``log_per_tensor`` and ``log_layers``. The gradients hold, by
design:

* NaN, +inf and -inf entries in one tensor every third step (the non-finite path; stateful
  strategies keep their state on such a step);
* a tensor on a coarse grid (ties at its own cut, and zero entries) and a tensor of one repeated
  value, every step;
* every tensor on the grid every third step (ties at the global cut), and an all-zero tensor every
  other step.

Per step the dump holds a sha256 of every masked gradient's bytes, every ``TensorStats`` field, the
``MaskStats`` fields and ``to_log_dict``'s numbers (floats as ``float.hex``, so the comparison is
exact); per row, a sha256 of every parameter's bytes after the last step (strategies that reset
parameters). The comparison prints one line per row and exits 1 if any row differs. A field or log
key that only one checkout has is reported as a note, not as a difference.

    OMP_NUM_THREADS=1 python benchmarks/compare_masks.py --against 510c1df --model tiny
    OMP_NUM_THREADS=1 python benchmarks/compare_masks.py --against 510c1df --steps 3 --rows gmt:tensor id3:global
    OMP_NUM_THREADS=1 python benchmarks/compare_masks.py --against /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parent))  # strategy_cost.py, after the checkout's root

import strategy_cost  # noqa: E402 - from this file's folder, so both checkouts get the same set and rows
from checkout import ROOT, cpu_model, other_checkout  # noqa: E402 - this file's folder

# strategy_cost.shapes() reads its own table: a small set for a quick run (4 layers, so that lisa and ist,
# which update 2 layers at a time, freeze some)
strategy_cost.MODELS.setdefault(
    "tiny", dict(hidden=64, intermediate=160, layers=4, heads=4, kv_heads=2, vocab=512, tied=False)
)

STATS_FIELDS = ("numel", "masked", "nonfinite", "threshold", "masked_nonzero", "updated", "changed")
MASKER_FLAGS = ("track_coverage", "log_per_tensor", "log_layers")
ABSENT = "<absent>"
GRID = 2.5e-4  # gradients have std 1e-3: about 10 % round to 0, and the 20 % cut falls on the 2.5e-4 step


# -- the driver: one checkout, every row, written to a JSON dump ------------------------------------------


def special_tensors() -> dict[str, str]:
    """Role -> tensor name: where the non-finite entries, the ties and the zeros go."""
    layer = "model.layers.0."
    return {
        "nonfinite": layer + "self_attn.q_proj.weight",
        "grid": layer + "mlp.up_proj.weight",
        "constant": layer + "input_layernorm.weight",
        "zero": "model.norm.weight",
    }


def build_parameters(model: str) -> list[tuple[str, Any]]:
    import torch

    named = []
    for index, (name, shape) in enumerate(strategy_cost.shapes(model)):
        gen = torch.Generator().manual_seed(1_000_000 + index)
        named.append((name, torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02))))
    return named


def fill_gradients(named: list[tuple[str, Any]], step: int) -> None:
    """This step's gradients, the same bytes on every run; frozen parameters get none (as from backward)."""
    import torch

    roles = special_tensors()
    for index, (name, p) in enumerate(named):
        if not p.requires_grad:
            p.grad = None
            continue
        if p.grad is None:
            p.grad = torch.empty_like(p)
        grad = p.grad
        gen = torch.Generator().manual_seed(step * 100_003 + index)
        torch.randn(p.shape, generator=gen, out=grad)
        grad.mul_(1e-3)
        if step % 3 == 1 or name == roles["grid"]:
            grad.div_(GRID).round_().mul_(GRID)
        if name == roles["constant"]:
            grad.fill_(1e-3)
        if name == roles["zero"] and step % 2 == 1:
            grad.zero_()
        if name == roles["nonfinite"] and step % 3 == 0:
            flat = grad.view(-1)
            n = flat.numel()
            for i, value in zip((0, 7, n // 2, n - 1), (float("nan"), float("inf"), float("-inf"), float("nan"))):
                flat[i] = value


def digest(tensor: Any) -> str:
    import torch

    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw).hexdigest()


def exact(value: Any) -> Any:
    """JSON-safe and exact: floats as ``float.hex`` (NaN and inf included)."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [exact(v) for v in value]
    return value


def tensor_record(stats: Any) -> dict[str, Any]:
    names = list(STATS_FIELDS)
    if dataclasses.is_dataclass(stats):
        names += [f.name for f in dataclasses.fields(stats) if f.name not in names and f.name != "name"]
    return {f: exact(getattr(stats, f, ABSENT)) for f in names}


def log_dict(stats: Any) -> dict[str, Any]:
    if not hasattr(stats, "to_log_dict"):
        return {}
    wanted = {"per_tensor": True, "per_layer": True}
    accepted = inspect.signature(stats.to_log_dict).parameters
    return {k: exact(v) for k, v in stats.to_log_dict(**{k: v for k, v in wanted.items() if k in accepted}).items()}


def run_row(row: str, model: str, steps: int) -> dict[str, Any]:
    from gmt_plugins import GMTConfig, GradientMasker

    strategy, scope, options, _ = strategy_cost.parse_row(row)
    fields = {f.name for f in dataclasses.fields(GMTConfig)}
    flags = {flag: True for flag in MASKER_FLAGS if flag in fields}
    extra = {"strategy_options": options} if options else {}
    named = build_parameters(model)
    masker = GradientMasker(named, strategy=strategy, scope=scope, mask_ratio=0.2, **flags, **extra)
    record: dict[str, Any] = {"missing_config": [f for f in MASKER_FLAGS if f not in fields], "steps": []}
    for step in range(steps):
        if hasattr(masker, "begin_step"):
            masker.begin_step()
        fill_gradients(named, step)
        stats = masker.apply()
        record["steps"].append({
            "grads": {name: None if p.grad is None else digest(p.grad) for name, p in named},
            "tensors": {t.name: tensor_record(t) for t in stats.tensors},
            "stats": {f: exact(getattr(stats, f, ABSENT)) for f in ("step", "strategy", "scope", "without_grad")},
            "log": log_dict(stats),
        })
    params = hashlib.sha256()
    for _, p in named:
        params.update(digest(p).encode())
    record["params"] = params.hexdigest()
    if hasattr(masker, "unfreeze"):
        masker.unfreeze()
    return record


def dump(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    import torch

    import gmt_plugins

    if not Path(gmt_plugins.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"gmt_plugins was imported from {gmt_plugins.__file__}, not from under {root}")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # strategies warn about settings they ignore (lisa: mask_ratio)
    rows: dict[str, Any] = {}
    for row in args.rows:
        start = time.perf_counter()
        try:
            rows[row] = run_row(row, args.model, args.steps)
        except Exception as err:  # a row this checkout cannot run is reported, the others still run
            rows[row] = {"error": f"{type(err).__name__}: {err}"}
        gc.collect()
        print(f"  {row:<20} {time.perf_counter() - start:6.1f} s", file=sys.stderr, flush=True)
    Path(args.dump).write_text(json.dumps({"gmt_plugins": gmt_plugins.__file__, "rows": rows}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"  peak resident memory {peak:.2f} GiB", file=sys.stderr, flush=True)


# -- the parent: two checkouts, their dumps compared ------------------------------------------------------


def first_difference(mine: dict[str, Any], theirs: dict[str, Any], notes: set[str]) -> str | None:
    """``tensor, step, field`` of the first difference of one row, or None."""
    if "error" in mine or "error" in theirs:
        if mine.get("error") == theirs.get("error"):
            return None
        return f"error: current {mine.get('error', 'none')!r}, against {theirs.get('error', 'none')!r}"
    if len(mine["steps"]) != len(theirs["steps"]):
        return f"steps: {len(mine['steps'])} vs {len(theirs['steps'])}"
    for side, record in (("current", mine), ("against", theirs)):
        for flag in record.get("missing_config", []):
            notes.add(f"GMTConfig field {flag!r} absent in the {side} checkout")
    for step, (a, b) in enumerate(zip(mine["steps"], theirs["steps"])):
        for name in dict.fromkeys([*a["grads"], *b["grads"]]):
            if a["grads"].get(name, ABSENT) != b["grads"].get(name, ABSENT):
                return f"{name}, step {step}, masked gradient bytes"
        for name in dict.fromkeys([*a["tensors"], *b["tensors"]]):
            if (name in a["tensors"]) != (name in b["tensors"]):
                return f"{name}, step {step}, tensor in the statistics"
            found = differing(a["tensors"][name], b["tensors"][name], notes, "TensorStats field")
            if found:
                return f"{name}, step {step}, {found}"
        for part, what in (("stats", "MaskStats field"), ("log", "log key")):
            found = differing(a[part], b[part], notes, what)
            if found:
                return f"-, step {step}, {found}"
    if mine["params"] != theirs["params"]:
        return "-, after the last step, parameter bytes"
    return None


def differing(a: dict[str, Any], b: dict[str, Any], notes: set[str], what: str) -> str | None:
    for key in dict.fromkeys([*a, *b]):
        x, y = a.get(key, ABSENT), b.get(key, ABSENT)
        if ABSENT in (x, y) and x != y:
            notes.add(f"{what} {key!r} absent in the {'current' if x == ABSENT else 'against'} checkout")
        elif x != y:
            return f"{key} ({x!r} vs {y!r})"
    return None


def run_driver(root: Path, args: argparse.Namespace, out: Path) -> float:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--dump", str(out), "--root", str(root),
        "--model", args.model, "--steps", str(args.steps), "--rows", *args.rows,
    ]
    env = dict(os.environ, PYTHONPATH=str(root))
    start = time.perf_counter()
    if subprocess.run(command, cwd=root, env=env).returncode:
        raise SystemExit(f"the run in {root} failed (its error is above)")
    return time.perf_counter() - start


def compare(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as folder:
        other = other_checkout(args.against, folder)
        print(f"{cpu_model()}; tensor set {args.model}; {args.steps} steps; current {ROOT}, against {args.against} ({other})", flush=True)
        dumps, seconds = {}, {}
        for side, root in (("current", ROOT), ("against", other)):
            print(f"{side}:", file=sys.stderr, flush=True)
            seconds[side] = run_driver(root, args, Path(folder) / f"{side}.json")
            dumps[side] = json.loads((Path(folder) / f"{side}.json").read_text())["rows"]
    print(f"wall time: current {seconds['current']:.1f} s, against {seconds['against']:.1f} s")
    notes: set[str] = set()
    same = 0
    for row in args.rows:
        found = first_difference(dumps["current"][row], dumps["against"][row], notes)
        same += found is None
        error = dumps["current"][row].get("error")
        verdict = "identical" + (f" (both fail: {error})" if error else "")
        print(f"{row:<20} {args.steps:>3}  " + (verdict if found is None else f"DIFFERS (first difference: {found})"))
    for note in sorted(notes):
        print(f"note: {note}")
    print(f"{same} rows identical, {len(args.rows) - same} differ")
    return 0 if same == len(args.rows) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a commit (its files exported to a temporary folder) or a checkout's folder")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", choices=sorted(strategy_cost.MODELS), default="135m")
    parser.add_argument("--rows", nargs="+", default=strategy_cost.ROWS, help="strategy:scope[:phase], as strategy_cost.py")
    parser.add_argument("--dump", help=argparse.SUPPRESS)  # the driver: write this checkout's results here
    parser.add_argument("--root", help=argparse.SUPPRESS)  # the driver: the checkout whose gmt_plugins to use
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    for row in args.rows:
        try:
            strategy_cost.parse_row(row)
        except ValueError as err:
            parser.error(str(err))
    if args.dump:
        if not args.root:
            parser.error("--dump needs --root")
        dump(args)
        return
    if not args.against:
        parser.error("--against is required")
    sys.exit(compare(args))


if __name__ == "__main__":
    main()
