"""The gmt device path (``gmt_plugins.engine.cuda``, one readback per step) against the host path's
torch passes, which CUDA tensors took before it, on the same tensors in one process.

The tensor set is SmolLM2-135M's (shapes from its config, ``benchmarks/strategy_cost.py``), cut to
the first ``--layers`` transformer layers (the embeddings only with ``--embeddings``). Rows take
turns repetition by repetition on fresh gradients (a rolled window of one random buffer), so load on
a shared machine hits them alike. Per repetition the ratio ``device / host[torch]`` of the same
repetition is kept; the table prints ns per entry (median) and the median and spread of that ratio.
CPU time (``time.process_time``) by default: a descheduled process accrues none.

Rows: ``device`` (``dispatch.DEVICE_MODE="always"``), ``host[torch]`` (``DEVICE_MODE="never"``,
``GMT_PLUGINS_NATIVE=0``: the torch passes of ``gmt_plugins.engine.reference``), ``host[native]``
(``DEVICE_MODE="never"``, the compiled kernel: what CPU tensors take by default, for reference).

    OMP_NUM_THREADS=1 python benchmarks/device_path.py                        # 3 layers, fp32 and bf16, both scopes
    OMP_NUM_THREADS=1 python benchmarks/device_path.py --layers 6 --repeats 7 --dtypes bfloat16
    python benchmarks/device_path.py --device cuda --layers 30 --embeddings   # on a GPU machine (wall time)

On a CPU these figures say the device path costs no more CPU work per entry than the host path's torch
passes; what it is for (no host synchronisation per tensor) only shows on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gmt_plugins first

from strategy_cost import Gradients, shapes  # noqa: E402 - after the path is set

ROWS = {"device": ("always", "0"), "host[torch]": ("never", "0"), "host[native]": ("never", "1")}


def tensor_set(layers: int, embeddings: bool) -> list[tuple[str, tuple[int, ...]]]:
    keep = [(n, s) for n, s in shapes("135m") if n.startswith("model.layers.") and int(n.split(".")[2]) < layers]
    return ([s for s in shapes("135m") if s[0] == "model.embed_tokens.weight"] if embeddings else []) + keep


def main() -> None:
    from gmt_plugins import GMTConfig, GradientMasker
    from gmt_plugins.engine import dispatch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--embeddings", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--scopes", nargs="+", default=["tensor", "global"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    rows = [r for r in args.rows if not (cuda and r == "host[native]")]
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    named = tensor_set(args.layers, args.embeddings)
    total = sum(torch.Size(s).numel() for _, s in named)
    clock_name = "wall" if cuda else "process CPU"
    print(f"tensors: {len(named)}, entries: {total / 1e6:.1f}M, device: {args.device}, clock: {clock_name}")
    if not cuda:
        print("no GPU ran this: CPU figures (OMP_NUM_THREADS=%s)" % os.environ.get("OMP_NUM_THREADS", "unset"))
    print(f"{'dtype':9} {'scope':7} {'row':13} {'ns/entry':>9} {'device/row median':>18} {'spread':>15}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=args.device)) for _, s in named]
        grads = Gradients(params, args.device, dtype)
        for scope in args.scopes:
            config = GMTConfig(mask_ratio=args.ratio, scope=scope)
            maskers = {r: GradientMasker(list(zip([n for n, _ in named], params)), config) for r in rows}
            times: dict[str, list[float]] = {r: [] for r in rows}
            for repeat in range(args.repeats + 1):  # the first round warms up
                for row in rows:
                    dispatch.DEVICE_MODE, os.environ["GMT_PLUGINS_NATIVE"] = ROWS[row]
                    grads.refill()
                    sync()
                    start = clock()
                    maskers[row].apply()
                    sync()
                    if repeat:
                        times[row].append(clock() - start)
            for row in rows:
                ratios = [d / t for d, t in zip(times["device"], times[row])] if "device" in times else []
                ns = statistics.median(times[row]) / total * 1e9
                spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
                median = f"{statistics.median(ratios):.2f}" if ratios else ""
                print(f"{dtype_name:9} {scope:7} {row:13} {ns:9.2f} {median:>18} {spread:>15}", flush=True)


if __name__ == "__main__":
    main()
