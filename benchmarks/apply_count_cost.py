"""What counting ``masked_nonzero`` in the apply pass costs: the kernel's ``gmt_apply`` with and without it.

Builds two copies of the CPU kernel with the flags of :mod:`gmt_plugins.engine.cpu.loader`: this tree's
(``gmt_plugins/engine/csrc/gmt_kernels.c``, which counts) and a baseline without the count, by default
the kernel of commit ``BASELINE_COMMIT`` built from that commit's own sources, read with ``git show``
(``gmt_plugins/engine/csrc/`` where the commit has it, else its single ``gmt_plugins/_native/histogram.c``).
Both mask the same gradients (SmolLM2-135M's tensor set: 272 tensors, 134.5M fp32 entries, refilled by a
copy before every call) at the same per-tensor cuts (``mask_ratio``'s threshold, with ties to break);
calls alternate build by build, tensor by tensor, and this process's CPU time (``time.process_time``) is
summed per build. Printed: the median over the repetitions of each build's time for the whole set, and
their ratio with its spread. A baseline must share this tree's ``source_t`` and ``gmt_apply`` prototype.

    OMP_NUM_THREADS=1 python benchmarks/apply_count_cost.py --repeats 7
    OMP_NUM_THREADS=1 python benchmarks/apply_count_cost.py --against abb3a32 --repeats 1
    OMP_NUM_THREADS=1 python benchmarks/apply_count_cost.py --baseline /tmp/old_kernel.c
    OMP_NUM_THREADS=1 python benchmarks/apply_count_cost.py --coverage   # also the cost of track_coverage
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gmt_plugins.engine import dispatch  # noqa: E402 - this tree's package, not an installed one
from gmt_plugins.engine.cpu import loader  # noqa: E402
from gmt_plugins.engine.cpu.rank import KIND_F32  # noqa: E402
from gmt_plugins.engine.cpu.signatures import Source  # noqa: E402
from gmt_plugins.engine.keys import MagnitudeKeys  # noqa: E402

BASELINE_COMMIT = "abb3a32"  # the last commit whose kernel does not count masked_nonzero
# where a commit keeps its kernel's sources: the folder of C files and the one it compiles, newest first
LAYOUTS = (("gmt_plugins/engine/csrc", "gmt_kernels.c"), ("gmt_plugins/_native", "histogram.c"))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def commit_sources(commit: str, folder: Path) -> Path:
    """Write ``commit``'s kernel sources (every file of its source folder, so includes resolve) into
    ``folder``; the path of the file to compile."""
    for directory, main in LAYOUTS:
        tree = f"{commit}:{directory}"
        listed = subprocess.run(["git", "ls-tree", "--name-only", tree], cwd=ROOT, capture_output=True, text=True)
        names = listed.stdout.split() if listed.returncode == 0 else []
        if main in names:
            for name in names:
                (folder / name).write_text(git("show", f"{commit}:{directory}/{name}"))
            return folder / main
    wanted = " nor ".join(f"{directory}/{main}" for directory, main in LAYOUTS)
    raise SystemExit(f"--against {commit!r}: no such commit here, or it has neither {wanted}")


def build(source: Path, folder: str, name: str) -> ctypes.CDLL:
    target = os.path.join(folder, f"{name}.so")
    compiler = (os.environ.get("CC") or "cc").split()
    done = subprocess.run([*compiler, *loader.CFLAGS, "-o", target, str(source)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"building {source} failed:\n{done.stderr[-2000:]}")
    lib = ctypes.CDLL(target)
    lib.gmt_apply.argtypes = [ctypes.POINTER(Source), ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.gmt_apply.restype = None
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mask-ratio", type=float, default=0.2)
    parser.add_argument("--coverage", action="store_true", help="also time GradientMasker.apply() with and without track_coverage")
    parser.add_argument("--against", default=BASELINE_COMMIT, help="the baseline's commit (default %(default)s)")
    parser.add_argument("--baseline", type=Path, help="a C file to build as the baseline instead of --against's kernel")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from strategy_cost import shapes

    with tempfile.TemporaryDirectory() as folder:
        baseline = args.baseline or commit_sources(args.against, Path(folder))
        libs = {"without count": build(baseline, folder, "baseline"), "with count": build(loader.SOURCE, folder, "counting")}
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(shape, generator=gen).mul_(1e-3).view(-1) for _, shape in shapes("135m")]
        source = MagnitudeKeys([torch.float32])
        cuts = [dispatch.rank(source, [(0, g)], args.mask_ratio).cut for g in grads]
        work = [torch.empty_like(g) for g in grads]
        totals: dict[str, list[float]] = {name: [] for name in libs}
        out = (ctypes.c_int64 * 3)()
        for _ in range(args.repeats):
            spent = dict.fromkeys(libs, 0.0)
            for g, w, cut in zip(grads, work, cuts):
                for name, lib in libs.items():
                    w.copy_(g)
                    src = Source(w.data_ptr(), None, w.numel(), 0, 0, KIND_F32)
                    start = time.process_time()
                    lib.gmt_apply(ctypes.byref(src), cut.threshold if cut.threshold is not None else 0, cut.ties, None, out)
                    spent[name] += time.process_time() - start
            for name in libs:
                totals[name].append(spent[name])
        ratios = [a / b for a, b in zip(totals["with count"], totals["without count"])]
    coverage = masker_cost(grads, args) if args.coverage else None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}; torch {torch.__version__}, threads {torch.get_num_threads()}; {len(grads)} tensors, "
          f"{sum(g.numel() for g in grads) / 1e6:.1f}M fp32 entries, mask_ratio {args.mask_ratio}, {args.repeats} repetitions")
    for name, values in totals.items():
        print(f"gmt_apply {name}: median {statistics.median(values):.4f} s CPU for the set (min {min(values):.4f}, max {max(values):.4f})")
    print(f"ratio with/without: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    if coverage is not None:
        for name, values in coverage.items():
            print(f"GradientMasker.apply(), tensor scope, {name}: median {statistics.median(values):.3f} s CPU "
                  f"(min {min(values):.3f}, max {max(values):.3f})")
        ratios = [a / b for a, b in zip(coverage["track_coverage=True"], coverage["track_coverage=False"])]
        print(f"ratio track_coverage on/off: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


def masker_cost(grads: list[torch.Tensor], args: argparse.Namespace) -> dict[str, list[float]]:
    """CPU time of a whole ``GradientMasker.apply()`` with and without ``track_coverage``, alternating."""
    from gmt_plugins import GradientMasker

    params = {flag: [(f"p{i}", torch.nn.Parameter(torch.empty_like(g))) for i, g in enumerate(grads)] for flag in (False, True)}
    maskers = {}
    for flag, named in params.items():
        for (_, p), g in zip(named, grads):
            p.grad = g.clone()
        maskers[flag] = GradientMasker(named, mask_ratio=args.mask_ratio, track_coverage=flag)
        maskers[flag].apply()  # first call (state allocation) apart
    times: dict[str, list[float]] = {f"track_coverage={flag}": [] for flag in (False, True)}
    for _ in range(args.repeats):
        for flag, named in params.items():
            for (_, p), g in zip(named, grads):
                p.grad.copy_(g)
            start = time.process_time()
            maskers[flag].apply()
            times[f"track_coverage={flag}"].append(time.process_time() - start)
    return times


if __name__ == "__main__":
    main()
