"""``trainer.train(resume_from_checkpoint=...)`` alone continues a GMT run bit-identically, for every strategy.

The uninterrupted run trains 4 optimizer steps and saves at step 2; the resumed run starts from that
checkpoint in another output directory. AdamW with weight decay and ``strict=True`` make any difference in
the masks of steps 3-4 (or in the optimizer's view of them) show in the final parameters.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")

from gmt_plugins import GMTCallback  # noqa: E402
from gmt_plugins.plugins import strategy_registry  # noqa: E402
from tiny_trainer import OPTIONS, params, tiny_trainer  # noqa: E402

STRATEGIES = ["gmt", "random", "hft", "sift", "id3", "lift", "spt", "lisa", "ist", "gmt_momentum"]


def callback(strategy: str) -> GMTCallback:
    return GMTCallback(mask_ratio=0.3, strategy=strategy, strategy_options=OPTIONS.get(strategy), mask_seed=5, strict=True)


def assert_same_state(expected, got, path="state"):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and expected.dtype == got.dtype and torch.equal(expected, got), path
    elif isinstance(expected, dict):
        assert set(expected) == set(got), path
        for key in expected:
            assert_same_state(expected[key], got[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), path
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_same_state(a, b, f"{path}[{i}]")
    else:
        assert expected == got, path


def test_the_list_covers_every_built_in_strategy(pm):
    assert sorted(STRATEGIES) == sorted(strategy_registry(pm).names())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per strategy, shared by the tests below."""
    runs = {}

    def run(strategy: str):
        if strategy not in runs:
            folder = tmp_path_factory.mktemp(f"full-{strategy}")
            cb = callback(strategy)
            trainer = tiny_trainer(folder, cb)
            trainer.train()
            runs[strategy] = (folder, params(trainer), cb.masker.state_dict())
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_by_train_argument_is_bit_identical(tmp_path, uninterrupted, strategy):
    folder, expected_params, expected_state = uninterrupted(strategy)
    checkpoint = folder / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed_cb = callback(strategy)
    resumed = tiny_trainer(tmp_path / "elsewhere", resumed_cb)  # args.resume_from_checkpoint stays None
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_cb.masker.step == 4
    assert_same_state(expected_state, resumed_cb.masker.state_dict())
    got = params(resumed)
    for name, value in expected_params.items():
        assert torch.equal(value, got[name]), name


@pytest.mark.parametrize("strategy", ["gmt_momentum", "id3"])
def test_resume_true_takes_the_last_checkpoint_of_a_moved_run(tmp_path, uninterrupted, strategy):
    folder, expected_params, expected_state = uninterrupted(strategy)
    shutil.copytree(folder / "checkpoint-2", tmp_path / "run" / "checkpoint-2")  # the original stays out of reach below
    original = folder.rename(folder.with_name(folder.name + "-hidden"))
    try:
        resumed_cb = callback(strategy)
        resumed = tiny_trainer(tmp_path / "run", resumed_cb)
        resumed.train(resume_from_checkpoint=True)
    finally:
        original.rename(folder)
    assert_same_state(expected_state, resumed_cb.masker.state_dict())
    got = params(resumed)
    assert all(torch.equal(v, got[n]) for n, v in expected_params.items())


def test_moved_checkpoint_outside_output_dir_is_a_clear_error_and_args_route_works(tmp_path, uninterrupted):
    folder, expected_params, _ = uninterrupted("gmt_momentum")
    moved = tmp_path / "moved" / "checkpoint-2"
    shutil.copytree(folder / "checkpoint-2", moved)
    original = folder.rename(folder.with_name(folder.name + "-hidden"))
    try:
        lost = tiny_trainer(tmp_path / "other", callback("gmt_momentum"))
        with pytest.raises(FileNotFoundError, match=r"gmt_state\.safetensors.*resume_from_checkpoint"):
            lost.train(resume_from_checkpoint=str(moved))
        found = tiny_trainer(tmp_path / "other2", callback("gmt_momentum"), resume_from_checkpoint=str(moved))
        found.train(resume_from_checkpoint=str(moved))
    finally:
        original.rename(folder)
    got = params(found)
    assert all(torch.equal(v, got[n]) for n, v in expected_params.items())
