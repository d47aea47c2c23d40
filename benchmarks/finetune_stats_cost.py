"""What the main job's heatmap statistics cost per optimizer step: ``GradientMasker.apply`` plus the log
dict the callback builds from it, on SmolLM2-135M's architecture, in three configurations:

* the job before the heatmaps (``log_per_tensor=True``),
* ``+ log_layers`` (per-layer fractions),
* ``+ log_layers + track_coverage``,
* ``+ log_layers + track_coverage + track_energy`` (what ``gmt-plugins finetune`` switches on for its GMT runs).

The gradients come from one real backward pass over 2 x 128 random tokens (the job's batch) with random
weights (cost does not depend on the values), saved once and copied back before every apply. The
variants take turns round by round on the same model, so load on a shared machine hits them alike;
times are CPU seconds (``time.process_time``), median with min and max over the rounds, and the ratio to
the first variant from this one run. Memory: the coverage tracker's packed bits, counted from its buffers.

    OMP_NUM_THREADS=1 python benchmarks/finetune_stats_cost.py [--rounds 7] [--scope tensor]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

VARIANTS = {
    "job before (log_per_tensor)": dict(log_per_tensor=True),
    "+ log_layers": dict(log_per_tensor=True, log_layers=True),
    "+ log_layers + track_coverage": dict(log_per_tensor=True, log_layers=True, track_coverage=True),
    "+ log_layers + track_coverage + track_energy": dict(log_per_tensor=True, log_layers=True, track_coverage=True, track_energy=True),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="applies per variant (after one warm-up round)")
    parser.add_argument("--scope", default="tensor", choices=["tensor", "global"])
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from gmt_plugins import GradientMasker

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    for _ in range(2):
        ids = torch.randint(config.vocab_size, (1, 128))
        (model(input_ids=ids, labels=ids).loss / 2).backward()
    saved = {name: p.grad.clone() for name, p in model.named_parameters()}
    entries = sum(p.numel() for p in model.parameters())
    maskers = {v: GradientMasker(model, mask_ratio=0.2, scope=args.scope, **kw) for v, kw in VARIANTS.items()}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    keys: dict[str, int] = {}
    for round_index in range(args.rounds + 1):
        for variant, masker in maskers.items():
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.grad.copy_(saved[name])
            start = time.process_time()
            logs = masker.apply().to_log_dict(per_tensor=True, per_layer=masker.config.log_layers)
            elapsed = time.process_time() - start
            keys[variant] = len(logs)
            if round_index:  # the first round warms up allocator and kernels
                cpu[variant].append(elapsed)
    print(f"{cpu_model()}, torch threads {torch.get_num_threads()}; SmolLM2-135M architecture ({entries / 1e6:.1f}M "
          f"entries), scope {args.scope}, {args.rounds} rounds interleaved after one warm-up")
    base = statistics.median(cpu[next(iter(VARIANTS))])
    for variant in VARIANTS:
        median = statistics.median(cpu[variant])
        print(f"{variant:>46}: CPU s per apply median {median:.3f} (min {min(cpu[variant]):.3f}, max {max(cpu[variant]):.3f}), "
              f"ratio {median / base:.2f}, {keys[variant]} log keys")
    tracker = maskers["+ log_layers + track_coverage"].coverage
    held = tracker.memory_bytes()
    largest = max(p.numel() for p in model.parameters())
    print(f"coverage state held between steps: {held / 2**20:.1f} MiB ({held * 8 / entries:.2f} bits per entry); "
          f"gmt's mask is folded in by blocks of 8,192 entries (8 KiB on the stack); other strategies' as one byte "
          f"per entry, in one buffer the size of the largest tensor ({largest / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
