"""``gmt-plugins sft|dpo|grpo|kto|rloo|reward``: TRL's scripts with GMTConfig's fields on their parser.

The configs are those of examples/trl_configs (a tiny Llama and JSONL files written by its tiny_assets.py into a
temporary folder; nothing from a hub). A run is checked by what it leaves: the model saved by TRL's script, and
the checkpoint's trainer_state.json with the gmt/* statistics and GMTCallback's saved config.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

from gmt_plugins.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "trl_configs"
GMT_KEYS = {"dpo": {"mask_ratio": 0.2, "scope": "global"}, "grpo": {"mask_ratio": 0.5}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding outputs/tiny (model, sft.jsonl, preference.jsonl, prompts.jsonl), as the configs expect."""
    spec = importlib.util.spec_from_file_location("tiny_assets", CONFIGS / "tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("trl-commands")
    module.main(folder / "outputs" / "tiny")
    rows = [json.loads(line) for line in (folder / "outputs/tiny/sft.jsonl").read_text().splitlines()]
    module.write_jsonl(folder / "outputs/tiny/kto.jsonl", [
        {"prompt": r["text"][:12], "completion": r["text"][12:], "label": i % 2 == 0} for i, r in enumerate(rows)
    ])
    return folder


@pytest.fixture
def in_workdir(workdir, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    return workdir


def run(capsys, *argv) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``gmt-plugins ARGV`` run in this process."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    run.out = captured.out
    return status, [line for line in captured.err.splitlines() if line.strip()]


def trainer_state(output_dir: Path, step: int) -> dict:
    return json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())


def gmt_entries(state: dict) -> list[dict]:
    return [e for e in state["log_history"] if "gmt/masked_fraction" in e]


def expected_masked(model_dir: Path, ratio: float) -> int:
    """floor(ratio * n) per tensor ('tensor' scope), over every parameter of the saved model."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.floor(ratio * math.prod(f.get_slice(k).get_shape())) for k in f.keys())


def assert_trained_with_gmt(output_dir: Path, *, steps: int, ratio: float, scope: str = "tensor", world_size: int = 1) -> None:
    assert (output_dir / "model.safetensors").is_file()  # saved by TRL's script after training
    state = trainer_state(output_dir, steps)
    entries = gmt_entries(state)
    assert [e["step"] for e in entries] == list(range(1, steps + 1))
    assert all(e["gmt/masked_fraction"] == pytest.approx(ratio, abs=2e-3) for e in entries)
    saved = state["stateful_callbacks"]["GMTCallback"]
    assert (saved["args"]["mask_ratio"], saved["args"]["scope"]) == (ratio, scope)
    record = saved["attributes"]["resume_state"]
    assert (record["step"], record["world_size"]) == (steps, world_size)
    if scope == "tensor":
        assert all(e["gmt/masked"] == expected_masked(output_dir, ratio) for e in entries)


def checkpointing(output_dir: Path, steps: int) -> list[str]:
    return ["--output_dir", str(output_dir), "--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", str(steps)]


# -- the configs are TRL's ---------------------------------------------------------------------


def test_sft_config_is_accepted_by_trls_own_parser():
    from trl.scripts import sft

    parser = sft.make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(["--config", str(CONFIGS / "sft.yaml")])
    assert (model_args.model_name_or_path, training_args.max_steps) == ("outputs/tiny/model", 4)
    assert dataset_args.datasets[0].data_files == "outputs/tiny/sft.jsonl"


@pytest.mark.parametrize("name", ["dpo", "grpo"])
def test_other_configs_are_trls_plus_gmt_keys(name):
    """TRL's parser takes every key but the GMT ones (which `trl` would hand to accelerate launch)."""
    from gmt_plugins.trl_commands import parse, trl_script

    *_, config_remaining, cli_remaining = trl_script(name).make_parser().parse_args_and_config(
        ["--config", str(CONFIGS / f"{name}.yaml")], return_remaining_strings=True, separate_remaining_strings=True
    )
    gmt_flags = [item for key, value in GMT_KEYS[name].items() for item in (f"--{key}", str(value))]
    assert (config_remaining, cli_remaining) == (gmt_flags, [])
    _, gmt_config, config_remaining, cli_remaining = parse(name, ["--config", str(CONFIGS / f"{name}.yaml")])
    assert (config_remaining, cli_remaining) == ([], [])
    assert {key: getattr(gmt_config, key) for key in GMT_KEYS[name]} == GMT_KEYS[name]


# -- help and bad input, before any launch ----------------------------------------------------------


def test_help_lists_gmt_and_trl_flags(capsys):
    status, _ = run(capsys, "sft", "--help")
    assert status == 0
    for flag in ("--mask_ratio", "--scope", "--strategy", "--strategy_options", "--track_coverage", "--max_length", "--config"):
        assert flag in run.out, flag


def test_top_level_help_lists_the_commands(capsys):
    status, _ = run(capsys, "--help")
    assert status == 0 and all(name in run.out for name in ("sft", "dpo", "grpo", "kto", "rloo", "reward"))


@pytest.fixture
def no_launch(monkeypatch):
    """Any launch fails the test: bad input must stop before it."""
    import accelerate.commands.launch as accelerate_launch

    def refuse(args):
        raise AssertionError("launched")

    monkeypatch.setattr(accelerate_launch, "launch_command", refuse)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--mask_ratio", "1.5"], "mask_ratio must be in [0, 1), got 1.5"),
        (["--mask_ratio", "half"], "argument --mask_ratio/--mask-ratio: invalid float value: 'half'"),
        (["--scope", "layer"], "argument --scope: invalid choice: 'layer'"),
        (["--strategy", "nope"], "strategy must be one of"),
        (["--strategy_options", "{bad"], "strategy_options must be a JSON object"),
        (["--include", "("], "include pattern '(' is not a valid regular expression"),
    ],
)
def test_bad_gmt_flag_is_one_line_naming_the_field(capsys, in_workdir, no_launch, tmp_path, flags, needle):
    status, err = run(capsys, "sft", "--config", CONFIGS / "sft.yaml", "--output_dir", tmp_path / "out", *flags)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("gmt-plugins sft: error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_bad_gmt_key_in_yaml(capsys, in_workdir, no_launch, tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text((CONFIGS / "sft.yaml").read_text() + "mask_ratio: -0.1\n")
    status, err = run(capsys, "sft", "--config", config)
    assert (status, err) == (2, ["gmt-plugins sft: error: mask_ratio must be in [0, 1), got -0.1"])


def test_missing_config_file(capsys, no_launch, tmp_path):
    status, err = run(capsys, "sft", "--config", tmp_path / "absent.yaml")
    assert status == 2 and err == [f"gmt-plugins sft: error: --config: file not found: {tmp_path / 'absent.yaml'}"]


# -- the launch ----------------------------------------------------------------------------------------------


def test_launch_passes_unknown_keys_to_accelerate_and_the_rest_to_the_worker(capsys, in_workdir, monkeypatch, tmp_path):
    """As `trl sft`: YAML keys and flags no dataclass knows are accelerate launch's; the script gets the others."""
    import accelerate.commands.launch as accelerate_launch

    launched = []
    monkeypatch.setattr(accelerate_launch, "launch_command", launched.append)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = tmp_path / "x.yaml"
    config.write_text((CONFIGS / "sft.yaml").read_text() + "num_processes: 1\n")
    status, err = run(capsys, "sft", "--config", config, "--mask_ratio", "0.3", "--num_cpu_threads_per_process", "1")
    assert (status, err) == (0, [])
    (args,) = launched
    assert args.module and args.training_script == "gmt_plugins.trl_commands"
    assert args.training_script_args == ["sft", "--config", str(config), "--mask_ratio", "0.3"]
    assert (args.num_processes, args.num_cpu_threads_per_process) == (1, 1)


def test_a_script_that_does_not_build_the_trainer_by_name_is_refused(monkeypatch):
    from trl.scripts import sft

    from gmt_plugins.trl_commands import trainer_with_callback

    monkeypatch.setattr(sft, "main", lambda *args: None)
    with pytest.raises(RuntimeError, match="does not build SFTTrainer by name"):
        with trainer_with_callback("sft", object()):
            pass


# -- runs in this process (as under `accelerate launch -m gmt_plugins.cli ...`) -------------------------------


@pytest.fixture
def under_launcher(in_workdir, monkeypatch):
    """As in a process started by accelerate launch: the command trains here instead of launching."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setattr(sys, "path", list(sys.path))  # TRL's grpo/rloo scripts put the cwd on sys.path
    monkeypatch.syspath_prepend(str(REPO))  # examples.grpo_gmt.shorter_completions, named by grpo.yaml
    return in_workdir


def test_sft_in_process_restores_trl_and_names_unused_launch_flags(capsys, caplog, under_launcher, tmp_path):
    import trl

    trainer_class = trl.SFTTrainer
    status, err = run(
        capsys, "sft", "--config", CONFIGS / "sft.yaml", "--mask_ratio", "0.3", "--num_processes", "1", *checkpointing(tmp_path, 2)
    )
    assert status == 0, err
    assert_trained_with_gmt(tmp_path, steps=2, ratio=0.3)
    assert trl.SFTTrainer is trainer_class
    # Already under a launcher, accelerate's flags are too late: said, not silently dropped.
    assert "['--num_processes', '1'] are no field of TRL's sft script nor of GMTConfig" in caplog.text


@pytest.mark.parametrize(("name", "ratio", "scope"), [("dpo", 0.2, "global"), ("grpo", 0.5, "tensor")])
def test_dpo_and_grpo_configs_run(capsys, under_launcher, tmp_path, name, ratio, scope):
    status, err = run(capsys, name, "--config", CONFIGS / f"{name}.yaml", *checkpointing(tmp_path, 2))
    assert status == 0, err
    assert_trained_with_gmt(tmp_path, steps=2, ratio=ratio, scope=scope)


def derived_config(path: Path, data: str, drop: tuple[str, ...] = ()) -> Path:
    """sft.yaml with another data file and without the keys the command's config class lacks."""
    lines = (CONFIGS / "sft.yaml").read_text().replace("outputs/tiny/sft.jsonl", f"outputs/tiny/{data}").splitlines()
    path.write_text("".join(line + "\n" for line in lines if line.split(":")[0] not in drop))
    return path


@pytest.mark.parametrize(
    ("name", "data", "drop", "flags"),
    [
        ("kto", "kto.jsonl", (), []),
        ("rloo", "prompts.jsonl", ("max_length", "dataset_num_proc"),
         ["--reward_funcs", "examples.grpo_gmt.shorter_completions", "--num_generations", "4", "--max_completion_length", "8"]),
        ("reward", "preference.jsonl", (), []),
    ],
)
def test_kto_rloo_reward_run(capsys, caplog, under_launcher, tmp_path, name, data, drop, flags):
    config = derived_config(tmp_path / f"{name}.yaml", data, drop)
    status, err = run(capsys, name, "--config", config, "--mask_ratio", "0.25", *flags, *checkpointing(tmp_path / "out", 2))
    assert status == 0, err
    assert "are no field" not in caplog.text  # every key is TRL's or GMT's
    assert_trained_with_gmt(tmp_path / "out", steps=2, ratio=0.25)


# -- real launches --------------------------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def launch(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *argv], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_gmt_plugins_sft_launches_through_accelerate(workdir, tmp_path):
    """`gmt-plugins sft --config sft.yaml --mask_ratio 0.3`: accelerate launch starts the worker, which trains."""
    out = launch(workdir, "-m", "gmt_plugins.cli", "sft", "--config", str(CONFIGS / "sft.yaml"), "--mask_ratio", "0.3", *checkpointing(tmp_path, 2))
    assert "were not passed to `accelerate launch`" in out.stderr  # accelerate's own note on its defaults: it ran
    assert "Model saved to" in out.stdout
    assert_trained_with_gmt(tmp_path, steps=2, ratio=0.3)


@pytest.mark.slow
def test_accelerate_launch_of_the_cli_module(workdir, tmp_path):
    """`accelerate launch -m gmt_plugins.cli sft ...`: the command trains in the launched process."""
    out = launch(
        workdir, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--cpu", "-m", "gmt_plugins.cli", "sft", "--config", str(CONFIGS / "sft.yaml"),
        "--mask_ratio", "0.3", *checkpointing(tmp_path, 2),
    )
    assert "Model saved to" in out.stdout
    assert_trained_with_gmt(tmp_path, steps=2, ratio=0.3)


@pytest.mark.slow
def test_two_processes_on_cpu(workdir, tmp_path):
    """`--multi_gpu --num_processes 2` go to accelerate launch, which starts 2 ranks through torchrun (gloo on CPU;
    without --multi_gpu its simple launcher starts one process whatever num_processes says)."""
    launch(workdir, "-m", "gmt_plugins.cli", "sft", "--config", str(CONFIGS / "sft.yaml"), "--mask_ratio", "0.3",
           "--multi_gpu", "--num_processes", "2", *checkpointing(tmp_path, 2))
    assert_trained_with_gmt(tmp_path, steps=2, ratio=0.3, world_size=2)
