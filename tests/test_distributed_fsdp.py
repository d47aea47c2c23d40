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
        assert message is not None and "'hft'" in message and "FSDP1" in message and "sharded" in message


def test_worker_case_names_are_unique():
    names = [c[0] for c in cases()]
    assert len(set(names)) == len(names) and (DIST / "fsdp_trainer_worker.py").exists()
