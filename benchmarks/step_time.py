"""Optimizer-step time and memory with GMT / without, and with strict mode / without.

Full fine-tuning of SmolLM2-135M's architecture (built from its config with random weights: timing
does not depend on the values) with AdamW and gradient accumulation. The variants take turns step
by step on the same model (plain, gmt, gmt+strict, plain, ...), so load on a shared machine hits
them alike; the report gives the median step time of each and the ratios to plain, measured side
by side in this one run, by wall clock and (on CPU) by this process's CPU time. Memory: what strict
mode holds during a step (mask + saved values), counted exactly from its buffers.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py                       # CPU: 135M, GA 4
    python benchmarks/step_time.py --device cuda --model 1b --seq 1024 --micro-batch 4   # GPU: ~1.2B
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MODELS = {
    # SmolLM2-135M's published architecture
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # a Llama-style ~1.2B model for GPU timing
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}


def build(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **MODELS[name])
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="steps per variant (after one warm-up round)")
    parser.add_argument("--mask-ratio", type=float, default=0.2)
    parser.add_argument("--scope", default="tensor", choices=["tensor", "global"])
    args = parser.parse_args()

    from gmt_plugins import GradientMasker

    device, dtype = args.device, getattr(torch, args.dtype)
    model = build(args.model, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    maskers = {
        "gmt": GradientMasker(model, mask_ratio=args.mask_ratio, scope=args.scope),
        "gmt+strict": GradientMasker(model, mask_ratio=args.mask_ratio, scope=args.scope, strict=True),
    }
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(model.config.vocab_size, (args.micro_batch, args.seq), generator=gen).to(device) for _ in range(args.grad_accum)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    held_bytes = 0

    def step(variant: str) -> tuple[float, float, float, float]:
        nonlocal held_bytes
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for ids in batches:
            (model(input_ids=ids, labels=ids).loss / args.grad_accum).backward()
        sync()
        mask_start, cpu_mask_start = time.perf_counter(), time.process_time()
        forward_backward = mask_start - start
        masker = maskers.get(variant)
        if masker is not None:
            masker.apply()
            if masker._guard is not None:
                held_bytes = max(held_bytes, masker._guard.held_bytes)
        sync()
        mask_time, cpu_mask = time.perf_counter() - mask_start, time.process_time() - cpu_mask_start
        optimizer.step()
        if masker is not None:
            sync()
            restore_start, cpu_restore_start = time.perf_counter(), time.process_time()
            masker.restore_masked()
            sync()
            mask_time += time.perf_counter() - restore_start
            cpu_mask += time.process_time() - cpu_restore_start
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start, mask_time, forward_backward, time.process_time() - cpu_start, cpu_mask

    variants = ["plain", "gmt", "gmt+strict"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    mask_times: dict[str, list[float]] = {v: [] for v in variants}
    fb_times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_mask_times: dict[str, list[float]] = {v: [] for v in variants}
    for round_index in range(args.rounds + 1):
        for variant in variants:
            total, masking, forward_backward, cpu_total, cpu_masking = step(variant)
            if round_index > 0:  # the first round warms up allocator and optimizer state
                times[variant].append(total)
                mask_times[variant].append(masking)
                fb_times[variant].append(forward_backward)
                cpu_times[variant].append(cpu_total)
                cpu_mask_times[variant].append(cpu_masking)

    print(f"model {args.model} ({n_params / 1e6:.1f}M params), device {device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, seq {args.seq}, micro-batch {args.micro_batch}, GA {args.grad_accum}, "
          f"mask_ratio {args.mask_ratio}, scope {args.scope}, {args.rounds} steps per variant (interleaved)")
    plain = statistics.median(times["plain"])
    # Masking cannot change the forward/backward work, so the spread of that column across variants
    # shows how much of the whole-step ratio is the machine's noise rather than GMT.
    print(f"{'variant':>11} {'median step s':>14} {'vs plain':>9} {'mask+restore s':>15} {'mask / plain step':>18} {'fwd+bwd s':>10}")
    for variant in variants:
        med, mask = statistics.median(times[variant]), statistics.median(mask_times[variant])
        print(f"{variant:>11} {med:>14.3f} {med / plain:>9.3f} {mask:>15.3f} {mask / plain:>18.3f} "
              f"{statistics.median(fb_times[variant]):>10.3f}")
    print("all steps (s): " + "; ".join(f"{v} " + " ".join(f"{t:.2f}" for t in times[v]) for v in variants))
    if device == "cpu":
        # this process's CPU time: a shared machine's other jobs (time spent waiting for a core) do not count
        cpu_plain = statistics.median(cpu_times["plain"])
        print(f"CPU time (time.process_time): {'variant':>11} {'median step s':>14} {'vs plain':>9} {'mask+restore s':>15} {'mask / plain step':>18}")
        for variant in variants:
            med, mask = statistics.median(cpu_times[variant]), statistics.median(cpu_mask_times[variant])
            print(f"{'':>30}{variant:>11} {med:>14.3f} {med / cpu_plain:>9.3f} {mask:>15.3f} {mask / cpu_plain:>18.3f}")
    print(f"strict mode holds {held_bytes / 2**20:.1f} MiB during a step "
          f"({held_bytes / n_params:.2f} bytes per parameter: 1-byte mask + the masked values)")


if __name__ == "__main__":
    main()
