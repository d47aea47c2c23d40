"""The examples run offline (tiny models built in-process) and print what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, tmp_path: Path, env: dict[str, str] | None = None, status: int = 0) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == status, out.stderr[-3000:]
    return out.stdout if status == 0 else out.stderr


CPU_FORMS = {
    "plain_loop.py": "test_plain_loop",
    "sft_gmt.py": "test_trainer_examples_tiny",
    "lora_8bit_gmt.py": "test_trainer_examples_tiny",
    "dpo_gmt.py": "test_trainer_examples_tiny",
    "sft_multi_gpu.py": "test_trainer_examples_tiny",
    "deepspeed_loop.py": "test_deepspeed.py::test_plain_deepspeed_loop_example (2 CPU processes under torchrun)",
}
"""Each runnable example and the test that runs its CPU form; LLaMA-Factory's recipe has its own tests."""


def test_every_example_has_a_cpu_run():
    scripts = {p.name for p in EXAMPLES.glob("*.py")} - {"common.py"}
    scripts = {name for name in scripts if not name.startswith(("llamafactory", "grpo"))}
    assert scripts == set(CPU_FORMS)


def test_plain_loop(tmp_path):
    out = run_example("plain_loop.py", tmp_path=tmp_path)
    assert re.findall(r"masked 433/2177", out) and len(out.strip().splitlines()) == 3


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("sft_gmt.py", r"step 2: loss [\d.]+, masked fraction 0\.200"),
        ("lora_8bit_gmt.py", r"optimizer: bitsandbytes\.AdamW \(quantized state: True\)\nmasked 8 adapter tensors; last step masked fraction 0\.2\d\d"),
        ("dpo_gmt.py", r"step 2: loss [\d.]+, masked fraction 0\.200"),
        ("grpo_gmt.py", r"step 2: reward -[\d.]+, masked fraction 0\.500 \(59872/119744 entries\)"),
        ("sft_multi_gpu.py", r"step 2: loss [\d.]+, masked fraction 0\.200"),
    ],
)
def test_trainer_examples_tiny(name, pattern, tmp_path):
    out = run_example(name, "--tiny", "--max-steps", "2", "--output-dir", str(tmp_path), tmp_path=tmp_path)
    assert re.search(pattern, out), out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message given on a machine without a GPU")
@pytest.mark.parametrize("launcher", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_multi_gpu_launch_without_a_gpu_says_so(launcher, tmp_path):
    """As ``accelerate launch --config_file accelerate_configs/zero2.yaml`` (or fsdp2.yaml) sets it for the script."""
    err = run_example("sft_multi_gpu.py", "--tiny", tmp_path=tmp_path, env={launcher: "true"}, status=1)
    lines = [line for line in err.splitlines() if line.startswith("sft_multi_gpu.py")]
    assert len(lines) == 1 and "no GPU is visible" in lines[0] and "python examples/sft_multi_gpu.py --tiny" in lines[0]
    assert "Traceback" not in err
