"""How the fine-tuning job reports time per step: wall clock and CPU time side by side, and the
GMT/SFT ratio by both clocks (the table and the ratio lines are what a user judges the cost by)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the fine-tuning job needs the finetune extra")

from gmt_plugins.finetune.report import format_table  # noqa: E402
from gmt_plugins.finetune.run import step_ratios  # noqa: E402
from gmt_plugins.finetune.training import MethodResult  # noqa: E402


def result(method: str, *, wall: float, cpu: float, steps: int = 20) -> MethodResult:
    return MethodResult(
        method=method, lora=False, gmt=None, learning_rate=3e-5, steps=steps, train_seconds=wall, train_cpu_seconds=cpu,
        heldout={"loss": 1.0, "perplexity": 2.72}, exact_match=None, losses=[(1, 1.0)], masked_fraction=[],
        layer_fractions={}, trainable_parameters=1000,
    )


def test_table_shows_wall_and_cpu_seconds_per_step():
    table = format_table([result("sft", wall=100.0, cpu=80.0), result("gmt", wall=110.0, cpu=82.0)], None)
    header, _, sft, gmt = table.splitlines()
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[-3:] == ["train s", "s/step", "CPU s/step"]
    assert [c.strip() for c in sft.strip("|").split("|")][-3:] == ["100", "5.00", "4.00"]
    assert [c.strip() for c in gmt.strip("|").split("|")][-3:] == ["110", "5.50", "4.10"]


def test_step_ratios_by_both_clocks_against_sft():
    results = [result("sft", wall=100.0, cpu=80.0), result("gmt", wall=110.0, cpu=82.0), result("random", wall=60.0, cpu=50.0, steps=10)]
    assert step_ratios(results) == [
        "gmt / sft per step: 1.100 wall, 1.025 CPU",
        "random / sft per step: 1.200 wall, 1.250 CPU",
    ]
    assert step_ratios([result("gmt", wall=1.0, cpu=1.0)]) == []  # no SFT run: nothing to compare with
