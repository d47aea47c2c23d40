"""What each strategy's mask costs against one optimizer step, on a real model's tensor set.

The tensor set is SmolLM2-135M's (272 tensors, 134.5M entries, shapes from its config, no weights
needed; ``--model 1b`` takes a Llama-style ~1.2B set). Every strategy and scope is measured in one
process against one ``torch.optim.AdamW`` step on the same parameters. Each repetition gives every
row fresh gradients (a rolled window of one random buffer, so refilling is a copy, not a draw),
times its ``masker.apply()``, refills, and times one AdamW step; rows take turns repetition by
repetition, so load on a shared machine hits them alike. The table shows, per row, the median mask
time over the median AdamW step of the same run. The first call of each masker (a warm-up step
for sift/spt, the first choice for lift) is run before timing and reported apart.

id3 has two phases: for its first ``steps_to_budget`` steps (100 by default) each call grows the
mask, after them the mask is fixed. The ``id3:global`` row times growth steps (every timed call is
one, for up to 99 repetitions); ``id3:global:fixed`` sets ``steps_to_budget=1``, so that its first,
untimed call grows the whole budget and the timed calls apply the fixed mask.

Both clocks are kept: wall time, and this process's CPU time (``time.process_time``), which a
shared machine disturbs far less (a descheduled process accrues none). On CPU the table's ratio is
the CPU-time one unless ``--clock wall``; on CUDA it is always wall time after a synchronisation.

    OMP_NUM_THREADS=1 python benchmarks/strategy_cost.py                       # every strategy, both scopes
    OMP_NUM_THREADS=1 python benchmarks/strategy_cost.py --rows gmt:tensor gmt:global --repeats 5
    python benchmarks/strategy_cost.py --device cuda --model 1b                # on a GPU machine

``--json FILE`` also writes the medians, the ratios unrounded and the imported ``gmt_plugins`` file,
for scripts that compare runs (benchmarks/compare_cost.py).

``--energy`` adds, beside each row, the same row with ``track_energy=True`` (label ``+energy``), timed in
turn with it, and a last table of each pair's mask-time ratio: what the energy sums cost.

    OMP_NUM_THREADS=1 python benchmarks/strategy_cost.py --energy --rows gmt:tensor gmt:global lisa:tensor
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

MODELS = {
    # SmolLM2-135M's published architecture (tied embeddings)
    "135m": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
    # a Llama-style ~1.2B model (as benchmarks/step_time.py)
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, tied=False),
}

# (strategy, scope); strategies whose ranking is always global (id3, spt) appear once
ROWS = [
    "gmt:tensor", "gmt:global", "random:tensor", "random:global", "gmt_momentum:tensor", "gmt_momentum:global",
    "id3:global", "id3:global:fixed", "sift:tensor", "sift:global", "spt:global", "lift:tensor", "lift:global",
    "lisa:tensor", "ist:tensor", "hft:tensor", "sara:tensor", "dsee:tensor", "spiel:tensor", "lt_sft:tensor",
]


# rows with a third field: one phase of a strategy, through its options
PHASES = {("id3", "fixed"): {"steps_to_budget": 1}}


ENERGY = "+energy"
"""A row's suffix: the same row with ``track_energy=True``."""


def parse_row(row: str) -> tuple[str, str, dict, str]:
    """``strategy:scope[:phase]`` -> (strategy, scope, strategy_options, label of the strategy column)."""
    strategy, scope, *phase = row.removesuffix(ENERGY).split(":")
    if not phase:
        return strategy, scope, {}, strategy
    key = (strategy, phase[0])
    if len(phase) > 1 or key not in PHASES:
        raise ValueError(f"row {row!r}: a third field must name a phase, one of {[':'.join((s, '<scope>', p)) for s, p in PHASES]}")
    return strategy, scope, PHASES[key], f"{strategy} ({phase[0]} mask)"


def shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Llama-architecture model, in ``named_parameters`` order."""
    c = MODELS[model]
    h, kv = c["hidden"], c["hidden"] // c["heads"] * c["kv_heads"]
    out = [("model.embed_tokens.weight", (c["vocab"], h))]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (c["intermediate"], h)), (p + "mlp.up_proj.weight", (c["intermediate"], h)),
            (p + "mlp.down_proj.weight", (h, c["intermediate"])),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not c["tied"]:
        out.append(("lm_head.weight", (c["vocab"], h)))
    return out


def kernel_loaded() -> bool:
    """Whether the compiled CPU kernel loaded; the lookup also serves checkouts that predate
    ``gmt_plugins.engine`` (``gmt_plugins.native.library``), so that one copy of this file measures both."""
    try:
        from gmt_plugins.engine.dispatch import kernel
    except ModuleNotFoundError as err:
        if err.name not in ("gmt_plugins.engine", "gmt_plugins.engine.dispatch"):
            raise
        from gmt_plugins.native import library as kernel
    return kernel() is not None


class Gradients:
    """Fresh gradients for every call: a window of one random buffer, rolled by a prime each time."""

    def __init__(self, params: list[torch.nn.Parameter], device: str, dtype: torch.dtype) -> None:
        self.params = params
        self.total = sum(p.numel() for p in params)
        gen = torch.Generator(device=device).manual_seed(0)
        self.buffer = torch.randn(self.total + 1_000_003, generator=gen, device=device).mul_(1e-3).to(dtype)
        self.calls = 0

    def refill(self) -> None:
        self.calls += 1
        offset = (self.calls * 7_919) % 1_000_003
        for p in self.params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.view(-1).copy_(self.buffer[offset : offset + p.numel()])
            offset += p.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", nargs="+", default=ROWS, help="strategy:scope pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mask-ratio", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="clock of the ratio column on CPU")
    parser.add_argument("--json", type=Path, help="also write the medians and ratios to this file")
    parser.add_argument("--energy", action="store_true", help="also time every row with track_energy=True, in turn with it")
    args = parser.parse_args()
    if args.energy:
        args.rows = [r for row in args.rows for r in (row, row + ENERGY)]

    import gmt_plugins
    from gmt_plugins import GradientMasker

    torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    named = [(name, torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * 0.02)) for name, shape in shapes(args.model)]
    params = [p for _, p in named]
    grads = Gradients(params, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    wall_clock = args.clock == "wall" or device.startswith("cuda")
    clock = time.perf_counter if wall_clock else time.process_time
    maskers = {}
    first: dict[str, float] = {}
    for row in args.rows:
        strategy, scope, options, _ = parse_row(row)
        extra = {"strategy_options": options} if options else {}  # the other rows exactly as before
        if row.endswith(ENERGY):
            extra["track_energy"] = True
        maskers[row] = GradientMasker(named, strategy=strategy, scope=scope, mask_ratio=args.mask_ratio, **extra)
        grads.refill()
        sync()
        start = clock()
        maskers[row].apply()
        sync()
        first[row] = clock() - start
    grads.refill()
    optimizer.step()  # allocates the moments
    times: dict[str, list[tuple[float, float]]] = {row: [] for row in args.rows}
    adam: list[tuple[float, float]] = []

    def timed(fn) -> tuple[float, float]:
        """(chosen clock, wall) seconds of one call."""
        sync()
        start, wall = clock(), time.perf_counter()
        fn()
        sync()
        return clock() - start, time.perf_counter() - wall

    for _ in range(args.repeats):
        for row in args.rows:
            grads.refill()
            times[row].append(timed(maskers[row].apply))
            grads.refill()
            adam.append(timed(optimizer.step))

    entries = sum(p.numel() for p in params)
    kernel = device == "cpu" and kernel_loaded()
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"compiled kernel {'on' if kernel else 'off'}, mask_ratio {args.mask_ratio}")
    name = "wall" if wall_clock else "CPU"
    step, step_wall = statistics.median(a for a, _ in adam), statistics.median(w for _, w in adam)
    print(f"tensor set {args.model}: {len(params)} tensors, {entries / 1e6:.1f}M entries; AdamW step median "
          f"{step:.3f} s {name} time (min {min(a for a, _ in adam):.3f}, max {max(a for a, _ in adam):.3f}, "
          f"n={len(adam)}), {step_wall:.3f} s wall")
    print(f"| strategy | scope | mask s ({name}, median) | mask / AdamW step ({name}) | mask / AdamW step (wall) | first call s ({name}) |")
    print("|---|---|---:|---:|---:|---:|")
    rows = {}
    for row in args.rows:
        _, scope, _, strategy = parse_row(row)
        strategy += ENERGY if row.endswith(ENERGY) else ""
        m, mw = statistics.median(a for a, _ in times[row]), statistics.median(w for _, w in times[row])
        print(f"| {strategy} | {scope} | {m:.3f} | {m / step:.2f} | {mw / step_wall:.2f} | {first[row]:.3f} |")
        rows[row] = dict(mask_s=m, mask_wall_s=mw, ratio=m / step, ratio_wall=mw / step_wall, first_s=first[row])
    if args.energy:
        print(f"\n| strategy | scope | mask with track_energy / without ({name}, medians) |")
        print("|---|---|---:|")
        for row in args.rows:
            if not row.endswith(ENERGY):
                _, scope, _, strategy = parse_row(row)
                print(f"| {strategy} | {scope} | {rows[row + ENERGY]['mask_s'] / rows[row]['mask_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(
            gmt_plugins=gmt_plugins.__file__, torch=torch.__version__, device=device, dtype=args.dtype,
            model=args.model, repeats=args.repeats, clock=name, kernel=kernel,
            adam_s=step, adam_wall_s=step_wall, rows=rows,
        ), indent=1))


if __name__ == "__main__":
    main()
