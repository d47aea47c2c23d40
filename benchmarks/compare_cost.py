"""Whether this checkout's masks cost what another commit's cost, row by row, measured side by side.

Each round runs benchmarks/strategy_cost.py (this checkout's copy, so both sides time the same rows on
the same tensor set the same way) once per checkout, each in a fresh process with that checkout's root
as working directory and ``PYTHONPATH``; the run writes its medians with ``--json``, and a run whose
``gmt_plugins`` was not imported from under its root is refused. Rounds alternate the order (current
then against, against then current, ...), so that a drift in the machine's load falls on both sides
alike. Only one measuring process runs at a time (each holds the whole tensor set, its gradients and
AdamW's moments).

The figure is strategy_cost.py's CPU-time ratio, mask / AdamW step, which a shared machine disturbs
far less than wall time; per row it prints the median over the rounds of each side's ratio and
new/old, where "old" is ``--against`` and "new" is this checkout. The CPU model and the load average
at the start and at the end come with it. It is a measurement: it exits 0 whatever the ratios are.

    OMP_NUM_THREADS=1 python benchmarks/compare_cost.py --against 510c1df
    OMP_NUM_THREADS=1 python benchmarks/compare_cost.py --against 510c1df --rows gmt:tensor gmt:global --rounds 3 --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/compare_cost.py --against /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import ROOT, cpu_model, other_checkout  # noqa: E402 - this file's folder

STRATEGY_COST = Path(__file__).resolve().with_name("strategy_cost.py")
MODELS = ("135m", "1b")  # strategy_cost.py's --model choices; it rejects any other


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(root: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One strategy_cost.py run on ``root``'s gmt_plugins; its ``--json`` record."""
    command = [sys.executable, str(STRATEGY_COST), "--json", str(out), "--model", args.model, "--repeats", str(args.repeats)]
    if args.rows:
        command += ["--rows", *args.rows]
    # strategies warn about settings they ignore (lisa: mask_ratio), in every run alike; errors still show
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONWARNINGS="ignore::UserWarning")
    # strategy_cost.py prints its table; only its record is read, so the table goes nowhere
    if subprocess.run(command, cwd=root, env=env, stdout=subprocess.DEVNULL).returncode:
        raise SystemExit(f"strategy_cost.py on {root} failed (its error is above)")
    record = json.loads(out.read_text())
    if not Path(record["gmt_plugins"]).resolve().is_relative_to(root):
        raise SystemExit(f"the run for {root} imported gmt_plugins from {record['gmt_plugins']}")
    if record["clock"] != "CPU":
        raise SystemExit(f"strategy_cost.py timed with the {record['clock']} clock, not CPU time")
    return record


def run_rounds(sides: dict[str, Path], args: argparse.Namespace, folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every side's records, ``args.rounds`` of them, in the order new old, old new, new old, ..."""
    records: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    order = list(sides)
    for number in range(args.rounds):
        start, seconds = time.perf_counter(), {}
        for side in order if number % 2 == 0 else order[::-1]:
            began = time.perf_counter()
            records[side].append(measure(sides[side], args, folder / f"{side}.json"))
            seconds[side] = time.perf_counter() - began
        spent = ", ".join(f"{side} {s:.0f} s" for side, s in seconds.items())
        print(f"round {number + 1}/{args.rounds}: {time.perf_counter() - start:.0f} s wall ({spent}), "
              f"load average {load_average()}", flush=True)
    return records


def report(records: dict[str, list[dict[str, Any]]]) -> None:
    new, old = records["new"], records["old"]
    rows = list(dict.fromkeys([*new[0]["rows"], *old[0]["rows"]]))
    width = max(len(row) for row in rows)
    largest: tuple[float, str] | None = None
    for row in rows:
        ratios = {side: [r["rows"][row]["ratio"] for r in records[side]] for side in ("old", "new")}
        o, n = statistics.median(ratios["old"]), statistics.median(ratios["new"])
        spread = "  ".join(f"{side} {min(v):.3f}-{max(v):.3f}" for side, v in ratios.items())
        spread = f"    (range over the rounds: {spread})" if len(new) > 1 else ""
        print(f"{row:<{width}}  old {o:.3f}  new {n:.3f}  new/old {n / o:.2f}{spread}")
        if largest is None or n / o > largest[0]:
            largest = (n / o, row)
    adam = {side: statistics.median(r["adam_s"] for r in records[side]) for side in ("old", "new")}
    print(f"AdamW step (the denominator), median over rounds: old {adam['old']:.3f} s, new {adam['new']:.3f} s CPU time")
    assert largest is not None  # strategy_cost.py measures at least one row
    print(f"largest new/old: {largest[0]:.2f} ({largest[1]})")


def compare(args: argparse.Namespace) -> None:
    print(f"CPU: {cpu_model()}; load average at start {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        other = other_checkout(args.against, folder)
        records = run_rounds({"new": ROOT, "old": other}, args, Path(folder))
    first = records["new"][0]
    kernel = {side: "on" if all(r["kernel"] for r in rs) else "off" for side, rs in records.items()}
    print(f"new: {ROOT} (compiled kernel {kernel['new']}); old: {args.against} (compiled kernel {kernel['old']})")
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    print(f"torch {first['torch']}, tensor set {first['model']}, {rounds} of --repeats {args.repeats}; "
          f"mask / AdamW step, CPU time, median over the rounds")
    report(records)
    print(f"load average at end {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="a commit (its files exported to a temporary folder) or a checkout's folder")
    parser.add_argument("--rows", nargs="+", help="strategy:scope[:phase], as strategy_cost.py (default: all of its rows)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side; the order alternates round by round")
    parser.add_argument("--repeats", type=int, default=5, help="strategy_cost.py's --repeats in every run")
    parser.add_argument("--model", choices=MODELS, default="135m", help="strategy_cost.py's tensor set")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    compare(args)


if __name__ == "__main__":
    main()
