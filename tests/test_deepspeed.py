"""GMT under DeepSpeed ZeRO-1/2/3 through the transformers Trainer, on 2 CPU processes (gloo).

One ``torchrun`` launch (``tests/dist/deepspeed_worker.py``) trains every case of its ``CASES`` on a
model whose gradient is known; the tests check, step by step, that the entries the optimizer left
bit-identical are exactly those a single-process ``GradientMasker`` and the slow reference twin mask
on the same gradient, and that both ranks logged the same full-model statistics.
"""

from __future__ import annotations

import math

import sys
from pathlib import Path

import pytest
import torch

from gmt_plugins import GradientMasker
from reference import reference_masks
from test_distributed import load, torchrun

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
# The first DeepSpeed start on a machine compiles its shared-memory comm op (tens of seconds, minutes
# on a loaded 2-core box); later starts load it from the torch extensions cache.
TIMEOUT_S = 900

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def torchrun_cpu(script: Path, *args: object) -> str:
    """``DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 script args``; returns stdout."""
    return torchrun(script, *args, env={"DS_ACCELERATOR": "cpu"}, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun_cpu(DIST / "deepspeed_worker.py", out)
    return out


def cases():
    from deepspeed_worker import CASES

    return CASES


@pytest.mark.parametrize("case", [c[0] for c in cases()])
def test_zero_masks_equal_single_process_and_reference(ds_run, case):
    name, stage, gmt, args_overrides, _ = next(c for c in cases() if c[0] == case)
    dump = load(ds_run / f"{case}.pt")
    ranks = [load(ds_run / f"{case}.stats{r}.pt") for r in (0, 1)]
    assert all(r["stage"] == stage for r in ranks), "the engine did not run the ZeRO stage the case asked for"
    expected_dtype = "torch.bfloat16" if args_overrides.get("bf16") else "torch.float32"
    assert all(r["lp_dtype"] == expected_dtype for r in ranks), "the engine did not train in the precision the case asked for"
    assert all(r["offload"] == ("offload" in case) for r in ranks), "optimizer offload is not what the case asked for"
    # several (sub-)groups: the hook brings later groups forward (ZeRO-1/2 on the device: masked copies,
    # which the worker has the hook check against the gradient DeepSpeed builds)
    assert all(r["groups"] >= 2 for r in ranks)
    known, weights = dump["known"], dump["weights"]
    names = list(known)
    steps = len(weights) - 1
    assert steps == 3 and len(ranks[0]["stats"]) == steps
    from deepspeed_worker import SKIP_STEP

    masker, ema = None, {}
    for s in range(steps):
        grads = {n: known[n][s] for n in names}
        if SKIP_STEP.get(case) == s:  # DeepSpeed skipped the step: nothing moved, nothing masked or logged
            assert all(torch.equal(weights[s + 1][n], weights[s][n]) for n in names)
            assert all(r["stats"][s] is None for r in ranks)
            continue
        # what the optimizer did: SGD, lr 1, no weight decay (or, in strict mode, AdamW with weight decay, masked
        # entries held): an entry stayed put iff its gradient was zeroed
        stayed = {n: weights[s + 1][n] == weights[s][n] for n in names}
        # one process, same strategy and state, on the same gradient (up to the positive factor)
        params = [(f"terms.{n}", torch.nn.Parameter(torch.zeros_like(grads[n]))) for n in names]  # the Trainer's names
        for n, p in params:
            p.grad = grads[n.removeprefix("terms.")].clone()
        if masker is None:
            masker = GradientMasker(params, **gmt)
        else:
            masker.parameters = params
        masker.step = s
        stats = masker.apply()
        single = {n.removeprefix("terms."): p.grad == 0 for n, p in params}
        masker.restore_masked()  # strict replays hold their (untouched) copies
        for n in names:
            assert torch.equal(stayed[n], single[n]), f"{case} step {s} {n}: ZeRO-{stage} mask differs from one process"
        if gmt.get("strict"):  # AdamW with weight decay moved every entry that was not held
            assert all(r["stats"][s]["restored"] > 0 for r in ranks)
        else:
            assert_moved_by_known_gradient(weights[s], weights[s + 1], grads)
        if gmt["strategy"] != "random":
            scores = None
            if gmt["strategy"] == "gmt_momentum":
                beta = gmt["strategy_options"]["beta"]
                for n in names:
                    ema[n] = grads[n].clone() if n not in ema else beta * ema[n] + (1 - beta) * grads[n]
                scores = [ema[n].abs() for n in names]
            masks = reference_masks([grads[n] for n in names], gmt["mask_ratio"], gmt["scope"], scores, gmt.get("ratio_of", "all"))
            for n, m in zip(names, masks):
                assert torch.equal(stayed[n], m | (grads[n] == 0)), f"{case} step {s} {n} vs reference"
        for r in ranks:
            logged = r["stats"][s]
            assert logged["step"] == s
            counts = ("name", "numel", "masked", "masked_nonzero", "updated", "changed")
            assert [tuple(t[c] for c in counts) for t in logged["tensors"]] == [
                tuple(getattr(t, c) for c in counts) for t in stats.tensors
            ], f"{case} step {s}: rank statistics differ from one process"
            for t, single_t in zip(logged["tensors"], stats.tensors, strict=True):  # the partitions' sums, over the ranks
                if gmt.get("track_energy"):  # one positive factor scales the partitions' gradient: compare shares
                    assert math.isclose(t["kept_energy"] / t["energy"], single_t.energy_kept, rel_tol=1e-6), (case, s, t["name"])
                else:
                    assert t["energy"] is None and single_t.energy is None
    assert any(not torch.equal(weights[-1][n], weights[0][n]) for n in names)


def assert_moved_by_known_gradient(before: dict, after: dict, grads: dict) -> None:
    """SGD at lr 1: every entry that moved got the known gradient times one positive factor per step
    (accumulation, averaging, clipping), so no group was unscaled or clipped twice or not at all."""
    delta = torch.cat([(before[n] - after[n]).flatten() for n in grads])
    known = torch.cat([grads[n].flatten() for n in grads])
    moved = delta != 0
    factor = (delta[moved] / known[moved]).median()
    assert factor > 0
    torch.testing.assert_close(delta[moved], factor * known[moved], rtol=1e-5, atol=0)


def test_zero_logs_reach_the_trainer(ds_run):
    for r in (0, 1):
        history = load(ds_run / f"z2_global.stats{r}.pt")["log_history"]
        logged = [h for h in history if "gmt/masked_fraction" in h]
        assert len(logged) == 3 and all(abs(h["gmt/masked_fraction"] - 0.4) < 1e-3 for h in logged)
        assert all(0.5 < h["gmt/energy_kept"] < 1 for h in logged)  # track_energy: the smallest 40% carry little


def test_zero_refusals(ds_run):
    for r in (0, 1):
        refusals = load(ds_run / f"refusals.stats{r}.pt")
        assert "'hft'" in refusals["hft"] and "DeepSpeed ZeRO-2" in refusals["hft"]
        assert "engine.step()" in refusals["apply"]


def test_plain_deepspeed_loop_example():
    """examples/deepspeed_loop.py as its docstring runs it, on ZeRO-3: the same masked count as the
    single-process examples/plain_loop.py on the same model (floor(0.2 * n) per tensor)."""
    out = torchrun_cpu(DIST.parent.parent / "examples" / "deepspeed_loop.py", "--stage", "3")
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert lines == [f"step {s}: masked 433/2177 (0.199) on ZeRO-3" for s in range(3)], out


def test_zero2_resume_is_bit_identical_with_per_rank_state(ds_run):
    """gmt_momentum keeps an EMA of each rank's partition: saved per rank at step 2, resumed into another
    folder, the final fp32 weights and every rank's EMA equal the uninterrupted run's."""
    shapes = []
    for r in (0, 1):
        runs = load(ds_run / f"resume.stats{r}.pt")
        (full_weights, full_step, full_state), (weights, step, state) = runs["full"], runs["resumed"]
        assert full_step == step == 4
        assert all(torch.equal(full_weights[n], weights[n]) for n in full_weights)
        assert full_state["ema"].keys() == state["ema"].keys()
        assert all(torch.equal(full_state["ema"][k], state["ema"][k]) for k in state["ema"])
        shapes.append({k: v.numel() for k, v in state["ema"].items()})
    assert shapes[0] != shapes[1]  # each rank kept its own partition's EMA


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (dict(swap_optimizer=True), "'nvme' is not supported"),
        (dict(use_muon=True), "Muon optimizer is not supported"),
        (dict(zenflow=True), "ZenFlow is not supported"),
        (dict(torch_autocast_gradscaler=object()), "torch_autocast and a GradScaler is not supported"),
    ],
)
def test_zero_setups_without_a_trustworthy_hook_are_refused_by_name(fields, needle):
    """The support table's refused ZeRO set-ups (no 2-rank launch needed: the decision reads the ZeRO
    optimizer's flags, here on a stand-in), and a plain ZeRO-2 optimizer passes."""
    from types import SimpleNamespace

    from gmt_plugins.integrations.deepspeed import _unsupported

    base = dict(partition_gradients=True, swap_optimizer=False, use_muon=False, zenflow=False, torch_autocast_gradscaler=None, optimizer=None)
    assert _unsupported(SimpleNamespace(**base)) is None
    message = _unsupported(SimpleNamespace(**{**base, **fields}))
    assert message is not None and needle in message
