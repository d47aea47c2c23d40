"""Exact per-tensor GMT masking (threshold + apply) against the usual implementations.

Each method runs in a fresh subprocess on the same seeded gradient, so its peak extra memory is
``ru_maxrss`` after the run minus ``ru_maxrss`` just before it (the gradient itself and torch's
start-up excluded). Times are the best of ``--repeats`` runs on a fresh copy of the gradient.
Ratios are taken side by side in this one run.

    OMP_NUM_THREADS=1 python benchmarks/threshold.py                 # 1M, 10M, 50M; fp32 and bf16
    OMP_NUM_THREADS=1 python benchmarks/threshold.py --sizes 1e6 --dtypes float32

On CPU the ``gmt_plugins`` row requires the compiled histogram (``GMT_PLUGINS_NATIVE=1``) and the
``gmt_plugins[torch]`` row forbids it, so both engines are measured side by side.
    python benchmarks/threshold.py --device cuda                     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

METHODS = ["gmt_plugins", "gmt_plugins[torch]", "kthvalue", "topk", "sort", "numpy.partition"]
# gmt_plugins uses its compiled histogram on CPU when it builds; "gmt_plugins[torch]" is the same
# engine with GMT_PLUGINS_NATIVE=0 (the pure-torch passes, also what runs on CUDA).
RATIO = 0.2


def _threshold_and_apply(method: str, g, k: int):
    import numpy as np
    import torch

    if method.startswith("gmt_plugins"):
        from gmt_plugins import GradientMasker

        p = torch.nn.Parameter(g.detach())  # shares g's storage: no allocation; only .grad is read
        p.grad = g
        GradientMasker([("g", p)], mask_ratio=RATIO).apply()
        return
    a = g.abs()
    if method == "kthvalue":
        t = torch.kthvalue(a.float() if g.dtype == torch.bfloat16 and g.device.type == "cpu" else a, k).values
    elif method == "topk":
        t = torch.topk(a, k, largest=False, sorted=False).values.max()
    elif method == "sort":
        t = torch.sort(a).values[k - 1]
    elif method == "numpy.partition":
        host = a.float().cpu().numpy()
        t = torch.tensor(np.partition(host, k - 1)[k - 1], dtype=g.dtype, device=g.device)
    del a
    # the common "mask below the k-th value" apply; ties at t are all kept (not exact-count)
    g.masked_fill_(g.abs() < t, 0)


def _child(method: str, n: int, dtype_name: str, device: str, repeats: int) -> dict:
    import resource
    import time

    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    source = torch.randn(n, device=device).to(dtype)
    g = source.clone()
    k = int(RATIO * n)
    _threshold_and_apply(method, torch.randn(4096, device=device).to(dtype), int(RATIO * 4096))  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best = float("inf")
    for _ in range(repeats):
        g.copy_(source)
        sync()
        start = time.perf_counter()
        _threshold_and_apply(method, g, k)
        sync()
        best = min(best, time.perf_counter() - start)
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": best, "extra_bytes": max(extra, 0), "zeroed": int((g == 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 5e7])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, n, dtype_name = args.child.split(",")
        print(json.dumps(_child(method, int(n), dtype_name, args.device, args.repeats)))
        return
    import torch

    print(f"torch {torch.__version__}, device {args.device}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"threads {torch.get_num_threads()}, mask_ratio {RATIO}")
    print(f"{'entries':>10} {'dtype':>9} {'method':>16} {'seconds':>9} {'extra MB':>9} {'B/entry':>8} {'time vs ours':>13}")
    for dtype_name in args.dtypes:
        for size in args.sizes:
            n = int(size)
            results = {}
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", f"{method},{n},{dtype_name}", "--device", args.device, "--repeats", str(args.repeats)]
                env = dict(os.environ)
                if method == "gmt_plugins[torch]":
                    env["GMT_PLUGINS_NATIVE"] = "0"
                elif method == "gmt_plugins" and args.device == "cpu":
                    env["GMT_PLUGINS_NATIVE"] = "1"
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    results[method] = None
                    print(f"{n:>10} {dtype_name:>9} {method:>16}   failed: {out.stderr.strip().splitlines()[-1][:80]}")
                    continue
                results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            ours = results.get("gmt_plugins")
            for method, r in results.items():
                if r is None:
                    continue
                ratio = f"{r['seconds'] / ours['seconds']:.1f}x" if ours else "-"
                print(f"{n:>10} {dtype_name:>9} {method:>16} {r['seconds']:>9.4f} {r['extra_bytes'] / 2**20:>9.1f} "
                      f"{r['extra_bytes'] / n:>8.2f} {ratio:>13}")


if __name__ == "__main__":
    main()
