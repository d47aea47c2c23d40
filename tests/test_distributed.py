"""GMT with several processes on CPU (gloo): DDP through TRL's SFTTrainer, FSDP2 through ``fully_shard``.

Each module fixture launches one ``torchrun --nproc_per_node 2`` worker from ``tests/dist/`` that
dumps what every rank did; the tests compare the ranks with each other, with a single-process
``GradientMasker`` replaying the same gradients, and with the slow twin in ``tests/reference.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmt_plugins.distributed as distributed
from gmt_plugins import GradientMasker
from gmt_plugins.engine.keys import RandomKeys, ShiftedKeys
from gmt_plugins.engine.dispatch import rank
from reference import reference_apply, reference_masks

DIST = Path(__file__).parent / "dist"
TIMEOUT_S = 120
sys.path.insert(0, str(DIST))  # the workers' case lists

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, *args: object, env: dict[str, str] | None = None, timeout: int = TIMEOUT_S) -> str:
    """``torchrun --nproc_per_node 2 script args`` on 127.0.0.1 (a name means a worker in ``tests/dist``);
    fails the test with both streams on a non-zero exit or a timeout, else returns stdout."""
    path = script if isinstance(script, Path) else DIST / script
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(DIST.parent.parent), os.environ.get("PYTHONPATH", "")]),
           **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(path), *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{path.name} timed out after {timeout}s\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{path.name} failed with exit code {proc.returncode}\nstdout:\n{proc.stdout[-8000:]}\nstderr:\n{proc.stderr[-8000:]}")
    return proc.stdout


def load(path: Path):
    return torch.load(path, weights_only=False)


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what} {name}: {m}")


def replay(names_values: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], masker: GradientMasker | None, **overrides):
    """One single-process masking step on copies; returns (masker, masked grads, stats)."""
    params = [(n, torch.nn.Parameter(v.clone())) for n, v in names_values.items()]
    for n, p in params:
        p.grad = grads[n].clone() if n in grads else None
    if masker is None:
        masker = GradientMasker(params, **overrides)
    else:  # keep the strategy's state and step, swap in this step's tensors
        masker.parameters = params
    stats = masker.apply()
    return masker, {n: p.grad for n, p in params if p.grad is not None}, stats


SUMS = ("energy", "kept_energy")
"""``track_energy``'s float sums, whose last bits depend on the order the shards were added in."""


def comparable(stats: dict) -> dict:
    stats = {k: v for k, v in stats.items() if k != "restored"}
    stats["tensors"] = [
        {**{k: v for k, v in t.items() if k not in SUMS}, "threshold": None if t["threshold"] is None or math.isnan(t["threshold"]) else t["threshold"]}
        for t in stats["tensors"]
    ]
    return stats


def assert_sums_close(sharded: dict, whole: dict, tracked: bool) -> None:
    """The shards' sums of g ** 2, summed over the ranks, against the single process's (``None`` untracked)."""
    for a, b in zip(sharded["tensors"], whole["tensors"], strict=True):
        for key in SUMS:
            if not tracked:
                assert a[key] is None and b[key] is None
            else:
                assert math.isclose(a[key], b[key], rel_tol=1e-9, abs_tol=1e-300), (a["name"], key, a[key], b[key])


# --- DDP: SFTTrainer + GMTCallback --------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    pytest.importorskip("trl")
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_worker.py", out)
    return [load(out / f"rank{r}.pt") for r in (0, 1)]


def test_ddp_really_ran_ddp(ddp_run):
    for dump in ddp_run:
        assert dump["world_size"] == 2 and dump["wrapped"] == "DistributedDataParallel"
        assert [s["step"] for s in dump["steps"]] == [0, 1, 2]


def test_ddp_ranks_agree_bit_for_bit(ddp_run):
    r0, r1 = ddp_run
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        assert_same(s1["pre"], s0["pre"], "all-reduced gradient")
        assert_same(s1["post"], s0["post"], "masked gradient")
        assert_same(s1["after"], s0["after"], "parameters after the step")
        for strategy, shadow in s0["shadow"].items():
            assert_same(s1["shadow"][strategy]["post"], shadow["post"], f"{strategy} mask")
    assert_same(r1["final"], r0["final"], "final parameters")


def test_ddp_main_mask_equals_single_process_and_reference(ddp_run):
    from ddp_worker import MAIN

    masker = None
    for s in ddp_run[0]["steps"]:
        masker, post, _ = replay(s["before"], s["pre"], masker, **MAIN)
        masker.restore_masked()
        assert_same(s["post"], post, f"step {s['step']} vs one process")
        names = list(s["pre"])
        masks = reference_masks([s["pre"][n] for n in names], MAIN["mask_ratio"], MAIN["scope"])
        assert_same(s["post"], dict(zip(names, reference_apply([s["pre"][n] for n in names], masks))), "vs reference")
        # strict: every masked entry is held bit-identical through AdamW with weight decay
        for n, m in zip(names, masks):
            assert torch.equal(s["after"][n][m], s["before"][n][m]), n
        assert any(not torch.equal(s["after"][n], s["before"][n]) for n in names)


def test_ddp_every_strategy_equals_single_process(ddp_run):
    from ddp_worker import SHADOW_RATIO

    steps = ddp_run[0]["steps"]
    for strategy in steps[0]["shadow"]:
        masker = None
        for s in steps:
            masker, post, stats = replay(s["before"], s["pre"], masker, strategy=strategy, mask_ratio=SHADOW_RATIO, mask_seed=5)
            assert_same(s["shadow"][strategy]["post"], post, f"{strategy} step {s['step']} vs one process")
            assert s["shadow"][strategy]["masked"] == stats.masked


# --- FSDP2: fully_shard + GradientMasker ---------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun("fsdp2_worker.py", out)
    return out


def synthetic_cases():
    from fsdp2_worker import SYNTHETIC_CASES

    return SYNTHETIC_CASES


def model_cases():
    from fsdp2_worker import MODEL_CASES

    return MODEL_CASES


@pytest.mark.parametrize("case", [c[0] for c in synthetic_cases()])
def test_fsdp2_synthetic_shards_equal_single_process_and_reference(fsdp_run, case):
    overrides = dict(next(c[1] for c in synthetic_cases() if c[0] == case))
    dump = load(fsdp_run / f"{case}.pt")
    ranks = [load(fsdp_run / f"{case}.stats{r}.pt") for r in (0, 1)]
    assert ranks[1]["local_numel"]["b"] == 0  # one row on two ranks: rank 1's shard is empty
    assert ranks[0]["local_numel"]["a"] != ranks[1]["local_numel"]["a"]  # uneven shards
    _, post, stats = replay({n: torch.zeros_like(g) for n, g in dump["pre"].items()}, dump["pre"], None, **overrides)
    assert_same(dump["post"], post, case)
    for r in ranks:
        assert comparable(r["stats"]) == comparable(dataclasses.asdict(stats))
        assert_sums_close(r["stats"], dataclasses.asdict(stats), overrides.get("track_energy", False))
    assert stats.nonfinite == 3 and stats.masked > 0
    if overrides.get("strategy", "gmt") == "gmt":
        names = list(dump["pre"])
        grads = [dump["pre"][n] for n in names]
        expected = reference_apply(grads, reference_masks(grads, overrides["mask_ratio"], overrides["scope"]))
        assert_same(dump["post"], dict(zip(names, expected)), f"{case} vs reference")


@pytest.mark.parametrize("case", [c[0] for c in model_cases()])
def test_fsdp2_model_masks_equal_single_process_and_reference(fsdp_run, case):
    overrides = next(c[1] for c in model_cases() if c[0] == case)
    dump = load(fsdp_run / f"{case}.pt")
    ranks = [load(fsdp_run / f"{case}.stats{r}.pt") for r in (0, 1)]
    masker, ema = None, {}
    for i, s in enumerate(dump["steps"]):
        masker, post, stats = replay(s["before"], s["pre"], masker, **overrides)
        masker.restore_masked()
        assert_same(s["post"], post, f"{case} step {i} vs one process")
        for r in ranks:
            assert comparable(r[i]) == comparable(dataclasses.asdict(stats)), f"rank stats step {i}"
            assert_sums_close(r[i], dataclasses.asdict(stats), overrides.get("track_energy", False))
        names = list(s["pre"])
        grads = [s["pre"][n] for n in names]
        if i == 2:
            assert stats.nonfinite == 4  # two NaN (one per rank) and two inf in the head
        scores = None
        if overrides["strategy"] == "gmt_momentum":
            beta = overrides["strategy_options"]["beta"]
            for n, g in zip(names, grads):
                finite = torch.isfinite(g)
                ema[n] = torch.where(finite, g, 0.0) if n not in ema else torch.where(finite, beta * ema[n] + (1 - beta) * g, ema[n])
            scores = [ema[n].abs() for n in names]
        if overrides["strategy"] != "random":
            masks = reference_masks(grads, overrides["mask_ratio"], overrides["scope"], scores, overrides.get("ratio_of", "all"))
            assert_same(s["post"], dict(zip(names, reference_apply(grads, masks))), f"{case} step {i} vs reference")
            if overrides.get("strict"):
                for n, m in zip(names, masks):
                    assert torch.equal(s["after"][n][m], s["before"][n][m]), f"strict: {n} moved at step {i}"
                assert ranks[0][i]["restored"] > 0


def test_fsdp2_refuses_strategies_that_are_not_elementwise(fsdp_run):
    for r in (0, 1):
        message = load(fsdp_run / f"refusal.stats{r}.pt")
        assert message is not None and "'hft'" in message and "sharded" in message


# --- single-process pieces ---------------------------------------------------------------------


def test_shifted_keys_give_each_shard_the_full_tensor_keys():
    source = RandomKeys([123])
    full = torch.randn(1000)
    whole = source.keys(0, full, 0)
    shard = ShiftedKeys(source, [600])
    assert torch.equal(shard.keys(0, full[600:], 0), whole[600:])
    assert shard.key_bits == source.key_bits and shard.cap == source.cap


def test_rank_without_a_reducer_makes_no_collective(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.ShardReducer, "sum_", lambda self, t: calls.append(t) or t)
    g = torch.randn(5000)
    rank(RandomKeys([1]), [(0, g)], 0.3)
    assert calls == [] and distributed.active_reducer() is None
