"""The examples run offline (tiny models built in-process) and print what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


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
    ],
)
def test_trainer_examples_tiny(name, pattern, tmp_path):
    out = run_example(name, "--tiny", "--max-steps", "2", "--output-dir", str(tmp_path), tmp_path=tmp_path)
    assert re.search(pattern, out), out
