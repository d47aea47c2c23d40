"""``gmt-plugins finetune``: one-line errors with exit status 2, and a full tiny run end to end."""

from __future__ import annotations

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
    status, lines = run_cli(capsys, "--data", tmp_path / "nope.jsonl")
    assert status == 2 and len(lines) == 1
    assert "data file not found" in lines[0] and "nope.jsonl" in lines[0]


def test_wrong_columns(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n' * 5)
    status, lines = run_cli(capsys, "--model", tiny_model_dir, "--data", path)
    assert status == 2 and len(lines) == 1
    assert "['input', 'output']" in lines[0] and "question+answer" in lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--strategy", "nosuch"], "unknown strategy 'nosuch'"),
        (["--mask-ratio", "1.5"], "mask_ratio must be in [0, 1)"),
        (["--mask-ratio", "-0.1"], "mask_ratio must be in [0, 1)"),
        (["--mask-ratio", "abc"], "invalid float value: 'abc'"),
        (["--scope", "layer"], "invalid choice: 'layer'"),
        (["--methods", "sft,magic"], "unknown method(s) ['magic']"),
        (["--optim", "adamw_nosuch"], "unknown optim 'adamw_nosuch'"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--lr-scheduler", "zigzag"], "unknown lr-scheduler 'zigzag'"),
    ],
)
def test_bad_options(capsys, tmp_path, argv, needle):
    status, lines = run_cli(capsys, *argv, "--output-dir", tmp_path)
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert needle in lines[0] and lines[0].startswith("gmt-plugins finetune: error:")
    assert not list(tmp_path.iterdir())  # failed before doing anything


def test_model_folder_errors(capsys, tmp_path):
    status, lines = run_cli(capsys, "--model", tmp_path / "missing")
    assert status == 2 and lines == [f"gmt-plugins finetune: error: model folder not found: {tmp_path / 'missing'}"]
    status, lines = run_cli(capsys, "--model", tmp_path)
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
        capsys, "--model", tiny_model_dir, "--data", qa_file, "--methods", "sft,gmt,gmt-global,random", "--steps", 3,
        "--grad-accum", 2, "--batch-size", 2, "--max-length", 48, "--eval-size", 6, "--exact-match", 2,
        "--learning-rate", 1e-3, "--output-dir", out, "--no-progress",
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
            assert r["masked_fraction"] == [] and r["layer_fractions"] == {}
            continue
        assert r["gmt"]["mask_ratio"] == 0.2
        assert [s for s, _ in r["masked_fraction"]] == [1, 2, 3]
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


def test_tiny_run_with_lora(capsys, tmp_path, tiny_model_dir, qa_file):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    status, errors = run_cli(
        capsys, "--model", tiny_model_dir, "--data", qa_file, "--methods", "sft,gmt", "--lora", "--lora-r", 2,
        "--steps", 2, "--max-length", 40, "--eval-size", 4, "--output-dir", out, "--no-progress", "--no-plot", "--no-baseline",
    )
    assert status == 0, errors
    results = json.loads((out / "results.json").read_text())["results"]
    total = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    for r in results:
        assert r["lora"] and 0 < r["trainable_parameters"] < total / 5
    gmt = results[1]
    assert all(f == pytest.approx(0.2, abs=0.02) for _, f in gmt["masked_fraction"])
    assert gmt["layer_fractions"] and all("lora" not in k for k in gmt["layer_fractions"])
    assert not (out / "loss_curves.png").exists()
