"""GMT through the ``Trainer`` under FSDP2 and FSDP1 on 2 CPU processes (gloo), and the multi-device
global scope.

One ``torchrun --nproc_per_node 2`` launch of ``tests/dist/fsdp_trainer_worker.py`` trains every
case (see its docstring): the model's gradient is known (``loss = sum(C * W)``), so with SGD at
learning rate 1 the parameters after each step are ``W - mask(C)``. Here ``C`` is masked by a
single-process ``GradientMasker`` and by ``tests/reference.py``, and the parameters the ranks
trained are compared entry for entry.
"""

from __future__ import annotations

import pytest
import torch

from gmt_plugins import GradientMasker
from reference import reference_apply, reference_masks
from test_distributed import DIST, assert_same, load, torchrun

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def cases():
    from fsdp_trainer_worker import CASES

    return CASES


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainer")
    torchrun("fsdp_trainer_worker.py", out)
    return out


def expected_parameters(names: list[str], overrides: dict, weight_decay: float, steps: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The parameters after each step when one process masks the known gradient (and, for ``gmt``,
    the reference does too): SGD with learning rate 1 from zeros, strict mode holding masked entries.
    Also the last step's masked count."""
    from fsdp_trainer_worker import known_gradient

    grads = {n: known_gradient(n) for n in names}
    params = [(n, torch.nn.Parameter(torch.zeros_like(g))) for n, g in grads.items()]
    masker = GradientMasker(params, **overrides)
    weights = {n: torch.zeros_like(g) for n, g in grads.items()}
    after = []
    for step in range(steps):
        for n, p in params:
            p.grad = grads[n].clone()
        masker.step = step
        stats = masker.apply()
        masker.restore_masked()
        assert 0 < stats.masked < sum(g.numel() for g in grads.values())
        posts = {n: p.grad for n, p in params}
        if overrides.get("strategy", "gmt") == "gmt":
            masks = reference_masks(list(grads.values()), overrides["mask_ratio"], overrides["scope"])
            assert_same(posts, dict(zip(names, reference_apply(list(grads.values()), masks))), "one process vs reference")
        if overrides.get("strict") and step:
            assert any(bool(((post == 0) & (weights[n] != 0)).any()) for n, post in posts.items()), "strict would hold nothing"
        for n, post in posts.items():
            moved = weights[n] - (post + weight_decay * weights[n])
            # C has no zero, so the masked entries are the zeros of the masked gradient
            weights[n] = torch.where(post == 0, weights[n], moved) if overrides.get("strict") else moved
        after.append({n: w.clone() for n, w in weights.items()})
    return after, stats.masked


@pytest.mark.parametrize("case", [c[0] for c in cases()])
def test_trainer_masks_equal_single_process_and_reference(trainer_run, case):
    from fsdp_trainer_worker import STEPS

    _, version, _, overrides, *train = next(c for c in cases() if c[0] == case)
    ranks = [load(trainer_run / f"{case}.rank{r}.pt") for r in (0, 1)]
    for r in ranks:
        assert r["error"] is None
        # really sharded: DDP would pass the same comparison
        if version == 2:
            assert r["grad_types"] == ["DTensor"]
        else:
            assert r["wrapped"] == "FullyShardedDataParallel"
    names = ranks[0]["names"]
    assert ranks[1]["names"] == names and "blocks.0.w" in names  # original names, in the same order on both ranks
    trained = load(trainer_run / f"{case}.pt")["steps"]
    expected, masked = expected_parameters(names, overrides, train[0].get("weight_decay", 0.0) if train else 0.0, STEPS)
    assert len(trained) == STEPS
    for step, (got, want) in enumerate(zip(trained, expected)):
        assert_same(got, want, f"{case} step {step}")
    assert ranks[0]["stats"] == ranks[1]["stats"] == masked  # counts summed over the shards


def test_fsdp1_refuses_strategies_that_are_not_elementwise(trainer_run):
    from fsdp_trainer_worker import REFUSAL

    for r in (0, 1):
        message = load(trainer_run / f"{REFUSAL[0]}.rank{r}.pt")["error"]
        assert message is not None and "'sift'" in message and "FSDP1" in message and "sharded" in message


def test_fsdp1_named_flat_parameters_are_refused(trainer_run):
    for r in (0, 1):
        message = load(trainer_run / f"named_flat.rank{r}.pt")
        assert message is not None and "FlatParameter" in message and "fsdp_version" in message


@pytest.mark.parametrize("case", ["plain_fsdp1", "plain_fsdp1_no_shard"])
def test_fsdp1_plain_loop_masker_given_the_model_is_exact(trainer_run, case):
    from fsdp_trainer_worker import PLAIN, known_gradient

    ranks = [load(trainer_run / f"{case}.rank{r}.pt") for r in (0, 1)]
    names = ranks[0]["names"]
    grads = [known_gradient(n) for n in names]
    expected = dict(zip(names, reference_apply(grads, reference_masks(grads, PLAIN["mask_ratio"], PLAIN["scope"]))))
    for r in ranks:
        assert r["names"] == names
        assert_same(r["post"], expected, "plain loop FSDP1")
        assert r["masked"] == sum(int((g == 0).sum()) for g in expected.values()) > 0
        assert r["sharded"] == (case != "plain_fsdp1_no_shard")  # NO_SHARD: whole gradients, no collective


def test_worker_case_names_are_unique():
    names = [c[0] for c in cases()]
    assert len(set(names)) == len(names) and (DIST / "fsdp_trainer_worker.py").exists()


# --- global scope over parameters on several devices (device_map="auto", CPU offload) -----------


def spread_gradients() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    grads = {f"p{i}": (torch.randint(-6, 7, shape, generator=gen).double() / 4).float() for i, shape in enumerate([(40, 9), (7,), (3, 50), (1,), (129,)])}
    grads["p0"].view(-1)[5] = float("nan")
    grads["p2"].view(-1)[7] = float("inf")
    grads["p4"][0] = float("-inf")
    return grads


@pytest.mark.parametrize("shift,base", [(16, None), (0, 0x3E800000)])
def test_histogram_across_device_groups_equals_one_device(shift, base):
    from gmt_plugins.engine.keys import MagnitudeKeys
    from gmt_plugins.engine.reference import _histogram, histogram_across_devices

    grads = list(spread_gradients().values())
    source = MagnitudeKeys([g.dtype for g in grads])
    flats = [(i, g.view(-1)) for i, g in enumerate(grads)]
    counts_one, counts_split = [], []
    one = _histogram(source, flats, shift=shift, base=base, chunk_numel=1024, nonfinite=counts_one)
    # three "devices": the flats interleave, so the sum must put the non-finite counts back in order
    split = histogram_across_devices(source, flats, shift=shift, base=base, chunk_numel=1024, nonfinite=counts_split,
                                     device_of=lambda flat: flat.numel() % 3)
    assert torch.equal(one, split) and int(one.sum()) > 0
    if base is None:
        assert counts_split == counts_one == [1, 0, 1, 0, 1]


def test_global_scope_over_device_groups_equals_reference(monkeypatch):
    from gmt_plugins.engine import reference

    per_device = reference.histogram_across_devices
    calls = []

    def grouped(*args, **kwargs):
        calls.append(len(args[1]))
        return per_device(*args, **kwargs, device_of=lambda flat: flat.numel() % 2)

    monkeypatch.setattr(reference, "histogram_across_devices", grouped)
    # the CPU kernel would rank the whole group itself; only the reference passes group by device
    monkeypatch.setenv("GMT_PLUGINS_NATIVE", "0")
    grads = spread_gradients()
    params = [(n, torch.nn.Parameter(torch.zeros_like(g))) for n, g in grads.items()]
    for n, p in params:
        p.grad = grads[n].clone()
    stats = GradientMasker(params, scope="global", mask_ratio=0.4, chunk_numel=1024).apply()
    expected = reference_apply(list(grads.values()), reference_masks(list(grads.values()), 0.4, "global"))
    assert_same({n: p.grad for n, p in params}, dict(zip(grads, expected)), "grouped global scope")
    assert stats.nonfinite == 3 and stats.masked > 0
    assert calls and set(calls) == {len(grads)}  # every pass histogrammed the whole global group


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: parameters split between the CPU and the GPU")
def test_global_scope_over_cpu_and_cuda_equals_reference():
    grads = spread_gradients()
    devices = ["cuda", "cpu", "cuda", "cpu", "cpu"]  # as CPU offload or device_map="auto" leaves them
    params = [(n, torch.nn.Parameter(torch.zeros_like(g, device=d))) for (n, g), d in zip(grads.items(), devices)]
    for (n, p), d in zip(params, devices):
        p.grad = grads[n].clone().to(d)
    GradientMasker(params, scope="global", mask_ratio=0.4, chunk_numel=1024).apply()
    expected = reference_apply(list(grads.values()), reference_masks(list(grads.values()), 0.4, "global"))
    assert_same({n: p.grad.cpu() for n, p in params}, dict(zip(grads, expected)), "CPU + CUDA global scope")


def test_fsdp2_accelerate_config_selects_fsdp2():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(DIST.parent.parent / "examples" / "accelerate_configs" / "fsdp2.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
