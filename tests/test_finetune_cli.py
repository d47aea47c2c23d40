"""``gmt-plugins finetune``: its TrlParser (flags, ``--config`` YAML, ``--help``), one-line errors with exit status 2,
and tiny runs end to end (a tiny Llama saved to a local folder, a local JSONL)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from gmt_plugins.cli import main

from tiny import WORDS  # noqa: E402 - after the package imports above
from tiny import tiny_llama_config  # noqa: E402
from tiny import tiny_tokenizer as tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama and its tokenizer saved as a local HF folder."""
    import torch
    from transformers import LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def qa_file(tmp_path):
    rows = [
        {"question": " ".join(WORDS[i % 7 : i % 7 + 6]) + f" {i}", "answer": f"{' '.join(WORDS[i % 5 : i % 5 + 4])} #### {i % 9}"}
        for i in range(40)
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(capsys, *argv):
    """Exit status and stderr lines of ``gmt-plugins finetune ARGV`` run in-process."""
    try:
        status = main(["finetune", *map(str, argv)])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    run_cli.out = captured.out
    return status, [line for line in captured.err.splitlines() if line.strip()]


# -- bad input: one line on stderr, exit 2 ----------------------------------------------------------


def test_missing_data_file(capsys, tmp_path):
    status, lines = run_cli(capsys, "--dataset_path", tmp_path / "nope.jsonl")
    assert status == 2 and len(lines) == 1
    assert "dataset_path: file not found" in lines[0] and "nope.jsonl" in lines[0]


def test_wrong_columns(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n' * 5)
    status, lines = run_cli(capsys, "--model_name_or_path", tiny_model_dir, "--dataset_path", path)
    assert status == 2 and len(lines) == 1
    assert "['input', 'output']" in lines[0] and "question+answer" in lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--strategy", "nosuch"], "strategy: unknown strategy 'nosuch'"),
        (["--mask-ratio", "1.5"], "mask_ratio must be in [0, 1)"),
        (["--mask_ratio", "-0.1"], "mask_ratio must be in [0, 1)"),
        (["--mask_ratio", "abc"], "argument --mask_ratio/--mask-ratio: invalid float value: 'abc'"),
        (["--scope", "layer"], "argument --scope: invalid choice: 'layer'"),
        (["--strategy_options", "{not json"], "strategy_options must be a JSON object"),
        (["--include", "("], "include pattern '(' is not a valid regular expression"),
        (["--methods", "sft,magic"], "methods: unknown method(s) ['magic']"),
        (["--methods", "sft", "sft"], "methods: listed twice"),
        (["--optim", "adamw_nosuch"], "argument --optim: invalid choice: 'adamw_nosuch'"),
        (["--max_steps", "0"], "max_steps must be at least 1"),
        (["--lr_scheduler_type", "zigzag"], "argument --lr_scheduler_type/--lr-scheduler-type: invalid choice: 'zigzag'"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1"),
        (["--lora_learning_rate", "0"], "lora_learning_rate must be positive"),
        (["--packing"], "packing=True is not supported by gmt-plugins finetune"),
        (["--lora_task_type", "SEQ_CLS"], "lora_task_type must be 'CAUSAL_LM'"),
        (["--eval_strategy", "steps", "--eval_size", "0"], "eval_strategy='steps' needs held-out examples"),
        (["--model_revision", "v2"], "model_revision='v2' is not supported"),
        (["--no_such_flag", "1"], "not used by the HfArgumentParser: ['--no_such_flag', '1']"),
        (["--config"], "argument --config: expected one argument"),
    ],
)
def test_bad_options(capsys, tmp_path, argv, needle):
    status, lines = run_cli(capsys, *argv, "--output-dir", tmp_path)
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert needle in lines[0] and lines[0].startswith("gmt-plugins finetune: error:")
    assert not list(tmp_path.iterdir())  # failed before doing anything


def test_model_folder_errors(capsys, tmp_path):
    status, lines = run_cli(capsys, "--model_name_or_path", tmp_path / "missing")
    assert status == 2 and lines == [
        f"gmt-plugins finetune: error: model_name_or_path: model folder not found: {tmp_path / 'missing'} (local folders only)"
    ]
    status, lines = run_cli(capsys, "--model_name_or_path", tmp_path)
    assert status == 2 and len(lines) == 1 and "no config.json" in lines[0]


def test_the_installed_command_exits_2_with_one_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from gmt_plugins.cli import main; sys.exit(main())", "finetune", "--mask-ratio", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "kernels" not in line]
    assert len(lines) == 1 and lines[0].startswith("gmt-plugins finetune: error: mask_ratio"), proc.stderr
    assert "Traceback" not in proc.stderr


# -- a real run on a tiny model ---------------------------------------------------------------------


def test_tiny_run_end_to_end(capsys, tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "out"
    status, errors = run_cli(
        capsys, "--model_name_or_path", tiny_model_dir, "--dataset_path", qa_file, "--methods", "sft,gmt,gmt-global,random",
        "--max_steps", 3, "--gradient_accumulation_steps", 2, "--per_device_train_batch_size", 2, "--max-length", 48,
        "--eval_size", 6, "--exact-match", 2, "--learning_rate", 1e-3, "--output-dir", out, "--disable_tqdm", "true",
    )
    printed = run_cli.out
    assert status == 0, errors
    results = json.loads((out / "results.json").read_text())
    by_method = {r["method"]: r for r in results["results"]}
    assert list(by_method) == ["sft", "gmt", "gmt-global", "random"]
    assert results["train_examples"] + results["eval_examples"] <= 40
    for name, r in by_method.items():
        assert len(r["losses"]) == 3 and r["heldout"]["tokens"] > 0
        assert r["exact_match"]["n"] >= 1
        if name == "sft":
            assert r["masked_fraction"] == [] and r["layer_fractions"] == {} and r["layer_stats"] == {} and r["energy_kept"] == []
            continue
        # the heatmaps' series (track_coverage and log_layers are on by default): every layer, model order,
        # every step; on the first step a layer's coverage is what it did not mask, and it never falls
        stats = r["layer_stats"]
        assert set(stats) == {
            "coverage", "churn", "masked_fraction", "masked_nonzero_fraction", "update_share", "mask_jaccard", "energy_kept",
        }
        for quantity, series in stats.items():
            assert list(series) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"], quantity
            after_first = quantity in ("churn", "mask_jaccard")  # both compare with the previous step's mask
            assert all([s for s, _ in values] == ([2, 3] if after_first else [1, 2, 3]) for values in series.values())
        assert all(0.5 < v <= 1 for series in stats["energy_kept"].values() for _, v in series)  # the smallest 20% of |g|
        for layer, coverage in stats["coverage"].items():
            assert coverage[0][1] == pytest.approx(1 - stats["masked_fraction"][layer][0][1])
            assert [c for _, c in coverage] == sorted(c for _, c in coverage)
        assert r["gmt"]["mask_ratio"] == 0.2
        assert [s for s, _ in r["masked_fraction"]] == [1, 2, 3] and [s for s, _ in r["energy_kept"]] == [1, 2, 3]
        assert all(0.5 < e < 1 for _, e in r["energy_kept"])
        assert all(f == pytest.approx(0.2, abs=1e-3) for _, f in r["masked_fraction"])
        assert set(r["layer_fractions"]) == {"embed", "0", "1", "other"}
        if r["gmt"]["scope"] == "tensor":  # every layer masks its share; global scope may not
            assert all(abs(f - 0.2) < 0.01 for series in r["layer_fractions"].values() for _, f in series)
    # same seed, same batches: the first step's loss is identical before any update differs
    assert len({r["losses"][0][1] for r in by_method.values()}) == 1
    assert by_method["gmt"]["losses"][-1] != by_method["sft"]["losses"][-1]
    png = out / "loss_curves.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out answer loss" in printed and "base (no training)" in printed and "| gmt-global" in printed


def test_a_yaml_config_drives_a_lora_run_and_flags_override_it(capsys, tmp_path, tiny_model_dir, qa_file):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        f"dataset_path: {qa_file}\n"
        "methods: [sft, gmt]\n"
        "use_peft: true\n"
        "lora_r: 2\n"
        "lora_target_modules: [q_proj, v_proj]\n"
        "max_steps: 5\n"  # overridden on the command line below
        "max_length: 40\n"
        "eval_size: 4\n"
        "mask_ratio: 0.3\n"
        "mask_seed: 7\n"
        "exclude: ['layers\\.1\\.']\n"
        f"output_dir: {out}\n"
        "disable_tqdm: true\n"
        "plot: false\n"
        "baseline: false\n"
    )
    status, errors = run_cli(capsys, "--config", config, "--max_steps", 2)
    assert status == 0, errors
    payload = json.loads((out / "results.json").read_text())
    results = payload["results"]
    assert [r["method"] for r in results] == ["sft", "gmt"] and payload["baseline"] is None
    assert payload["arguments"]["model"]["lora_target_modules"] == ["q_proj", "v_proj"]
    total = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    for r in results:
        assert r["lora"] and r["steps"] == 2 and len(r["losses"]) == 2
        assert 0 < r["trainable_parameters"] < total / 5
    gmt = results[1]["gmt"]
    assert (gmt["mask_ratio"], gmt["mask_seed"], gmt["exclude"]) == (0.3, 7, ["layers\\.1\\."])
    fractions = results[1]["layer_fractions"]
    assert set(fractions) == {"0"}  # layer 1 excluded; only q_proj/v_proj adapters of layer 0 are masked
    assert all(f == pytest.approx(0.3, abs=0.05) for _, f in fractions["0"])
    assert not (out / "loss_curves.png").exists()


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("mask_ratio: 1.5\n", "mask_ratio must be in [0, 1), got 1.5"),
        ("mask_ratio: abc\n", "argument --mask_ratio/--mask-ratio: invalid float value: 'abc'"),
        ("scope: layer\n", "scope must be one of ('tensor', 'global'), got 'layer'"),
        ("no_such_key: 1\n", "Unknown arguments from config file: ['--no_such_key', '1']"),
        ("- just a list\n", "must contain a YAML mapping"),
    ],
)
def test_bad_yaml_values_name_the_field(capsys, tmp_path, yaml_text, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    status, lines = run_cli(capsys, f"--config={config}", "--output_dir", tmp_path / "out")
    assert status == 2 and len(lines) == 1, lines
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_help_all_lists_every_field_and_config(capsys):
    from trl import ModelConfig, SFTConfig

    from gmt_plugins.config import GMTConfig
    from gmt_plugins.finetune.arguments import FinetuneArguments

    status, _ = run_cli(capsys, "--help-all")
    text = run_cli.out
    assert status == 0 and "--config FILE.yaml" in text
    for cls in (GMTConfig, SFTConfig, ModelConfig, FinetuneArguments):
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f"--{f.name}" not in text]
        assert not missing, f"{cls.__name__}: {missing}"
    assert "--mask_ratio MASK_RATIO, --mask-ratio MASK_RATIO" in text and "(default: 0.2)" in text


def test_job_defaults_are_the_embedded_run_of_before():
    """No arguments: the job as it ran before it took TRL's arguments (20 steps of 2 x 1 sequences, fp32, ...)."""
    from gmt_plugins.finetune.run import Job

    job = Job.from_argv([])
    t, g, m, s = job.training, job.gmt, job.model, job.script
    assert (t.max_steps, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.max_length) == (20, 1, 2, 128)
    assert (t.learning_rate, s.lora_learning_rate, t.seed, t.logging_steps, t.save_strategy) == (3e-5, 3e-4, 0, 1, "no")
    assert (t.optim, t.lr_scheduler_type, t.bf16, t.activation_checkpointing) == ("adamw_torch", "constant", False, False)
    assert (g.strategy, g.mask_ratio, g.scope, g.mask_seed, g.log_per_tensor) == ("gmt", 0.2, "tensor", 0, True)
    assert (g.track_coverage, g.log_layers) == (True, True)  # for the plot's heatmaps
    assert (m.model_name_or_path, m.dtype, m.lora_r, m.lora_alpha, m.lora_dropout) == (None, "float32", 8, 16, 0.0)
    assert m.lora_target_modules == "all-linear" and s.methods == ["sft", "gmt"] and job.uses_embedded_assets


def test_offline_switches_only_for_the_embedded_assets(capsys, tmp_path, tiny_model_dir, qa_file, monkeypatch):
    from gmt_plugins.finetune import assets

    for name in assets.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    entered = []
    real = assets.offline_environment
    monkeypatch.setattr(assets, "offline_environment", lambda: entered.append(1) or real())
    status, errors = run_cli(
        capsys, "--model_name_or_path", tiny_model_dir, "--dataset_path", qa_file, "--methods", "sft", "--max_steps", 1,
        "--eval_size", 0, "--no_plot", "--output_dir", tmp_path, "--disable_tqdm", "true",
    )
    assert status == 0, errors
    assert entered == [] and not any(name in os.environ for name in assets.OFFLINE_VARIABLES)
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with real():
        assert all(os.environ[name] == "1" for name in assets.OFFLINE_VARIABLES) and constants.HF_HUB_OFFLINE is True
    assert not any(name in os.environ for name in assets.OFFLINE_VARIABLES) and constants.HF_HUB_OFFLINE == before


def test_list_leaves_the_environment_unchanged():
    code = (
        "import os, sys; before = dict(os.environ); from gmt_plugins.cli import main; main(['list']); "
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
        "print(sorted(m for m in sys.modules if m.startswith(('gmt_plugins.finetune', 'trl'))))"
    )
    env = {k: v for k, v in os.environ.items() if "OFFLINE" not in k}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # nor does it import the job or trl


def test_the_example_yaml_parses_and_flags_override_it():
    from pathlib import Path

    from gmt_plugins.finetune.run import Job

    example = Path(__file__).resolve().parents[1] / "examples" / "finetune_config.yaml"
    job = Job.from_argv(["--config", str(example), "--max_steps", "3"])
    assert job.script.methods == ["sft", "gmt", "random"] and job.training.max_steps == 3
    assert job.gmt.exclude == ["embed_tokens"] and job.training.lr_scheduler_type == "cosine"
    assert job.model.lora_target_modules == "all-linear" and job.training.output_dir == "runs/from-yaml"


def documented_commands() -> list[list[str]]:
    """Every ``gmt-plugins finetune ...`` command line in examples/finetune_cli.sh and the README."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "examples" / "finetune_cli.sh").read_text() + (root / "README.md").read_text()
    text = re.sub(r"\\\n#?\s*", " ", text)  # join continuation lines
    commands = []
    for line in text.splitlines():
        match = re.match(r"\s*#?\s*gmt-plugins finetune (.*)", line)
        if match:
            commands.append(shlex.split(match.group(1).split(" #")[0]))
    return commands


def test_documented_command_lines_parse(monkeypatch):
    from pathlib import Path

    from gmt_plugins.finetune.run import Job

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the commands run from the repository root
    commands = documented_commands()
    assert len(commands) >= 6, commands
    for argv in commands:
        Job.from_argv(argv)  # raises FinetuneError naming the field if a documented flag is wrong
