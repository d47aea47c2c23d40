"""GMT inside real clients (scripts/clients.sh), and the checker that script relies on.

The checker tests train a tiny network with the Trainer here and show that
scripts/clients/check_run.py passes a GMT run and rejects one without GMT, one told a smaller mask
ratio than was used, and one whose optimizer moves masked entries. The ``clients`` test installs
Axolotl and LLaMA-Factory in virtualenvs of their own (several GB, minutes) and runs
``scripts/clients.sh all``; it runs only when ``GMT_PLUGINS_CLIENTS=1`` is set.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmt_plugins import GMTCallback

ROOT = Path(__file__).resolve().parents[1]
RATIO = 0.5
STEPS = 4


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_run", ROOT / "scripts" / "clients" / "check_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def train(tmp_path: Path, callback, **args) -> tuple[Path, Path]:
    """(the initial weights' folder, the output_dir) of a 4-step run saving a checkpoint after every step."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from tiny_trainer import tiny_trainer

    options = dict(optim="sgd", weight_decay=0.0, learning_rate=0.1, max_steps=STEPS, save_steps=1)
    options.update(args)
    trainer = tiny_trainer(tmp_path / "out", callback or TrainerCallback(), **options)
    initial = tmp_path / "initial"
    initial.mkdir()
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(initial / "model.safetensors"))
    trainer.train()
    return initial, tmp_path / "out"


@pytest.fixture(scope="module")
def gmt_run(tmp_path_factory) -> tuple[Path, Path]:
    return train(tmp_path_factory.mktemp("gmt"), GMTCallback(mask_ratio=RATIO, track_energy=True))


def test_a_gmt_run_with_plain_sgd_passes(checker, gmt_run):
    initial, out = gmt_run
    figures, problems = checker.check(out, initial, RATIO, STEPS)
    assert problems == []
    # TinyNet's 225 parameters in tensor scope: floor(0.5 * n) of 64, 8, 64, 8, 64, 8, 8, 1 entries.
    assert "gmt/masked_fraction logged at 4/4 steps (0.4978, 0.4978, 0.4978, 0.4978)" in figures
    assert "entries unchanged by the last step 0.4978 (masked floor(ratio*n): 0.4978)" in figures
    energies = [float(e) for e in figures.split("gmt/energy_kept ")[1].split(";")[0].split(", ")]
    assert len(energies) == STEPS and all(0.5 < e < 1 for e in energies)  # the smaller half of |g| carries less


def test_a_run_without_the_energy_statistic_fails(checker, tmp_path):
    initial, out = train(tmp_path, GMTCallback(mask_ratio=RATIO))
    _, problems = checker.check(out, initial, RATIO, STEPS)
    assert problems and all("no gmt/energy_kept" in p for p in problems)


def test_a_smaller_claimed_ratio_is_caught_as_entries_that_did_not_move(checker, gmt_run):
    initial, out = gmt_run
    _, problems = checker.check(out, initial, 0.25, STEPS)
    moved_too_little = [p for p in problems if "more than the" in p]
    assert moved_too_little and all(p in moved_too_little or "gmt/masked_fraction 0.4977" in p for p in problems)


def test_a_run_without_gmt_fails(checker, tmp_path):
    initial, out = train(tmp_path, None)
    _, problems = checker.check(out, initial, RATIO, STEPS)
    assert any("fewer than the" in p for p in problems)
    assert any("no gmt/masked_fraction" in p for p in problems)


def test_an_optimizer_that_moves_masked_entries_fails(checker, tmp_path):
    initial, out = train(tmp_path, GMTCallback(mask_ratio=RATIO, track_energy=True), optim="adamw_torch", weight_decay=0.1)
    _, problems = checker.check(out, initial, RATIO, STEPS)
    assert any("is not SGD's" in p for p in problems)
    assert any("fewer than the" in p for p in problems)


@pytest.mark.clients
@pytest.mark.skipif(
    os.environ.get("GMT_PLUGINS_CLIENTS") != "1",
    reason="installs Axolotl and LLaMA-Factory (several GB, minutes): GMT_PLUGINS_CLIENTS=1 runs scripts/clients.sh",
)
def test_axolotl_and_llamafactory_train_with_gmt():
    script = ROOT / "scripts" / "clients.sh"
    result = subprocess.run(["bash", str(script), "all"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.split("== GMT in real clients", 1)[1].splitlines()[1:]
    assert len(summary) == 3, summary
    for line, client in zip(summary, ["--launcher accelerate", "--launcher python", "llamafactory"]):
        assert client in line and line.endswith(": PASS"), line
        assert "gmt/masked_fraction logged at 4/4 steps" in line and "gmt/energy_kept 0." in line, line
