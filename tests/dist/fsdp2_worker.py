"""Worker of tests/test_distributed.py: GMT on FSDP2 (``fully_shard``) shards, 2 CPU processes, gloo.

Run with ``torchrun --nproc_per_node 2 tests/dist/fsdp2_worker.py OUT_DIR``. Every rank masks only
its local shards; for the comparison each step's full gradients (before and after the mask) and
full parameters are gathered (``full_tensor``, test only) and rank 0 saves them to
``OUT_DIR/<case>.pt``; each rank saves its statistics to ``OUT_DIR/<case>.stats<rank>.pt``. The
pytest process recomputes everything in one process and with ``tests/reference.py``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

from gmt_plugins import GradientMasker  # noqa: E402

# name, GradientMasker overrides, steps
MODEL_CASES = [
    ("gmt_tensor", dict(strategy="gmt", scope="tensor", mask_ratio=0.3, chunk_numel=1024), 3),
    ("gmt_global", dict(strategy="gmt", scope="global", mask_ratio=0.5, chunk_numel=1024, track_coverage=True, track_energy=True), 3),
    # the shards' zeros and non-finite entries summed over the ranks; coverage counts summed too
    ("gmt_nonzero_tensor", dict(strategy="gmt", scope="tensor", mask_ratio=0.3, chunk_numel=1024, ratio_of="nonzero",
                                track_coverage=True), 3),
    ("random_tensor", dict(strategy="random", scope="tensor", mask_ratio=0.3, chunk_numel=1024, mask_seed=7), 2),
    ("random_global", dict(strategy="random", scope="global", mask_ratio=0.3, chunk_numel=1024, mask_seed=7), 2),
    ("momentum_global", dict(strategy="gmt_momentum", scope="global", mask_ratio=0.3, chunk_numel=1024, strategy_options={"beta": 0.5}), 3),
    ("gmt_strict", dict(strategy="gmt", scope="tensor", mask_ratio=0.3, strict=True), 3),
]

# Synthetic gradients: odd row counts (uneven shards), a one-row tensor (rank 1 holds nothing),
# heavy ties straddling the shard boundary, NaN/inf, and every key width.
SYNTHETIC_CASES = [
    ("syn_tensor_f32", dict(scope="tensor", mask_ratio=0.4, chunk_numel=1024), torch.float32),
    ("syn_global_f32", dict(scope="global", mask_ratio=0.4, chunk_numel=1024), torch.float32),
    ("syn_global_bf16", dict(scope="global", mask_ratio=0.6, chunk_numel=1024, track_energy=True), torch.bfloat16),
    ("syn_tensor_f64", dict(scope="tensor", mask_ratio=0.25, chunk_numel=1 << 18), torch.float64),
    ("syn_random_global", dict(strategy="random", scope="global", mask_ratio=0.4, chunk_numel=1024, track_energy=True), torch.float32),
]
SYNTHETIC_SHAPES = {"a": (301, 7), "b": (1, 6), "c": (9,), "d": (41, 30, 2)}


def synthetic_grads(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    grads = {}
    for name, shape in SYNTHETIC_SHAPES.items():
        # values in {-2..2} / 4: most entries tie with others, zeros included
        grads[name] = (torch.randint(-2, 3, shape, generator=gen).to(torch.float64) / 4).to(dtype)
    grads["a"].view(-1)[3] = float("nan")
    grads["a"].view(-1)[30] = float("inf")
    grads["c"][8] = float("-inf")
    return grads


def model_batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(4, 90, (2, 12), generator=gen)


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.full_tensor().detach().clone() for n, t in tensors.items()}


def stats_dict(stats) -> dict:
    return dataclasses.asdict(stats)


def run_model_case(name: str, overrides: dict, steps: int, mesh, out: str) -> None:
    from tiny import tiny_llama

    rank = dist.get_rank()
    model = tiny_llama(vocab_size=93)  # 93 rows: uneven embedding / head shards
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masker = GradientMasker(model, **overrides)
    params = dict(model.named_parameters())
    record: dict = {"steps": []}
    all_stats = []
    for step in range(steps):
        ids = model_batch(rank, step)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in params.items()}
        with torch.no_grad():
            if step == 1:  # quantize: many exact ties, split between shards
                for g in grads.values():
                    local = g.to_local()
                    local.copy_(torch.round(local * 50) / 50)
            if step == 2:  # non-finite entries on both ranks
                grads["model.embed_tokens.weight"].to_local().view(-1)[rank] = float("nan")
                grads["lm_head.weight"].to_local().view(-1)[5] = float("inf")
        pre, before = full(grads), full(params)
        stats = masker.apply()
        post = full(grads)
        optimizer.step()
        restored = masker.restore_masked()
        after = full(params)
        optimizer.zero_grad()
        all_stats.append({**stats_dict(stats), "restored": restored})
        record["steps"].append({"pre": pre, "post": post, "before": before, "after": after})
    torch.save(all_stats, os.path.join(out, f"{name}.stats{rank}.pt"))
    if rank == 0:
        torch.save(record, os.path.join(out, f"{name}.pt"))


def run_synthetic_case(name: str, overrides: dict, dtype: torch.dtype, mesh, out: str) -> None:
    rank = dist.get_rank()
    grads = synthetic_grads(dtype)
    named = []
    for n, g in grads.items():
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, [Shard(0)]))
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        named.append((n, p))
    masker = GradientMasker(named, **overrides)
    stats = masker.apply()
    post = {n: p.grad.full_tensor() for n, p in named}
    local_numel = {n: p.grad.to_local().numel() for n, p in named}
    torch.save({"stats": stats_dict(stats), "local_numel": local_numel}, os.path.join(out, f"{name}.stats{rank}.pt"))
    if rank == 0:
        torch.save({"pre": grads, "post": post}, os.path.join(out, f"{name}.pt"))


def run_refusal(mesh, out: str) -> None:
    """A strategy that is not elementwise must refuse shards, on every rank, with a clear message."""
    g = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    p = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]))
    p.grad = g
    masker = GradientMasker([("layers.0.w", p)], strategy="hft")
    try:
        masker.apply()
        message = None
    except ValueError as err:
        message = str(err)
    torch.save(message, os.path.join(out, f"refusal.stats{dist.get_rank()}.pt"))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name, overrides, dtype in SYNTHETIC_CASES:
        run_synthetic_case(name, overrides, dtype, mesh, out)
    run_refusal(mesh, out)
    for name, overrides, steps in MODEL_CASES:
        run_model_case(name, overrides, steps, mesh, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
