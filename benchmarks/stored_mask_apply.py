"""The stored-mask step and the gradient sums, each fast path against the path it replaced, side by side.

Per repetition and mask share, on one fp32 gradient of ``--numel`` entries (fresh copy each time):

* ``bytes``: the kernel's KIND_MASK apply reading a bool mask of masked entries (what sift, spt,
  lift, sara, dsee, spiel and lt_sft read before, after building that complement each step);
* ``bits``: ``gmt_apply_mask_bits`` reading the same mask packed 64 entries to a word
  (:class:`~gmt_plugins.engine.keys.StoredMask`);
* ``complement + bytes``: sift, spt and lift's former step, ``~kept`` (a new bool tensor) then ``bytes``;
* ``torch sum``: spiel's former gradient sum, ``acc.add_(nan_to_num(g))``;
* ``C sum``: ``gmt_accumulate_finite_f32``, one read of ``g`` and one read and write of ``acc``.

Times are this process's CPU time (``time.process_time``), the ratio is per repetition (the two
run back to back), and the table shows the median ratio with its min and max.

    OMP_NUM_THREADS=1 python -m benchmarks.stored_mask_apply --numel 50000000 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--masked", type=float, nargs="+", default=[0.2, 0.99], help="shares of masked entries")
    args = parser.parse_args()

    from gmt_plugins.engine import dispatch
    from gmt_plugins.engine.cpu import rank as cpu_rank

    lib = dispatch.kernel()
    if lib is None:
        raise SystemExit("the compiled kernel is unavailable here")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(args.numel, generator=gen) * 1e-3
    work = torch.empty_like(grad)

    def timed(fn) -> float:
        work.copy_(grad)
        start = time.process_time()
        fn()
        return time.process_time() - start

    print(f"torch {torch.__version__}, {args.numel / 1e6:.0f}M fp32 entries, {args.repeats} repetitions, CPU time")
    print("| pass | masked share | old s (median) | new s (median) | new / old (median, min-max) |")
    print("|---|---:|---:|---:|---:|")
    for share in args.masked:
        masked = torch.rand(args.numel, generator=gen) < share
        bits = cpu_rank.pack_mask_bits(lib, ~masked, invert=True)
        keys = cpu_rank.NativeKeys(cpu_rank.KIND_MASK, mask=masked)
        kept = ~masked
        rows, fresh = [], []
        for _ in range(args.repeats):
            old = timed(lambda: cpu_rank.apply(lib, work, keys, 1, 0, None))
            new = timed(lambda: cpu_rank.apply_mask_bits(lib, work, bits, None))
            rows.append((old, new))
            # sift, spt and lift built the complement of their kept set at every step
            with_complement = timed(lambda: cpu_rank.apply(lib, work, cpu_rank.NativeKeys(cpu_rank.KIND_MASK, mask=~kept), 1, 0, None))
            fresh.append((with_complement, new))
        report("stored-mask apply, bytes -> bits", share, rows)
        report("complement + bytes -> bits", share, fresh)
    acc_old, acc_new = torch.zeros_like(grad), torch.zeros_like(grad)
    rows = []
    for _ in range(args.repeats):
        old = timed(lambda: acc_old.add_(torch.nan_to_num(work, nan=0.0, posinf=0.0, neginf=0.0)))
        new = timed(lambda: cpu_rank.accumulate_finite_f32(lib, acc_new, work, first=False, square=False))
        rows.append((old, new))
    assert torch.equal(acc_old.view(torch.int32), acc_new.view(torch.int32))
    report("gradient sum, torch -> C", None, rows)


def report(name: str, share: float | None, rows: list[tuple[float, float]]) -> None:
    ratios = [new / old for old, new in rows]
    old, new = statistics.median(o for o, _ in rows), statistics.median(n for _, n in rows)
    shown = "-" if share is None else f"{share:g}"
    print(f"| {name} | {shown} | {old:.4f} | {new:.4f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
