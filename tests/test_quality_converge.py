"""The converged comparison's bookkeeping (benchmarks/converge.py): which learning rate wins, which
runs the summary takes, per-seed differences to SFT, the plateau measure. No training here."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("converge", Path(__file__).resolve().parents[1] / "benchmarks" / "converge.py")
converge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(converge)


def _run(task, method, lr, seed, final, curve=None):
    return {"task": task, "method": method, "learning_rate": lr, "seed": seed, "final": final,
            "curve": curve or [(0, 2.0), (10, final + 0.1), (20, final + 0.01), (30, final)], "seconds": 10.0,
            "masked_fraction": None if method == "sft" else 0.2}


def test_best_lr_follows_the_metric_direction():
    runs = [_run("llm", "sft", lr, 0, final) for lr, final in [(1e-5, 1.3), (3e-5, 1.1), (1e-4, 1.2)]]
    assert converge.best_lr(runs, "llm", "sft", 0) == 3e-5  # loss: lower wins
    runs = [_run("cls", "sft", lr, 0, final) for lr, final in [(1e-5, 0.80), (3e-5, 0.90), (1e-4, 0.85)]]
    assert converge.best_lr(runs, "cls", "sft", 0) == 3e-5  # accuracy: higher wins
    assert converge.best_lr(runs, "cls", "random", 0) is None


def test_summary_takes_the_best_lr_runs_and_differences_per_seed():
    runs = [
        _run("cls", "sft", 1e-4, 0, 0.90), _run("cls", "sft", 2e-4, 0, 0.80),
        _run("cls", "sft", 1e-4, 1, 0.86), _run("cls", "sft", 1e-4, 2, 0.88),
        _run("cls", "gmt-tensor", 1e-4, 0, 0.85), _run("cls", "gmt-tensor", 2e-4, 0, 0.91),
        _run("cls", "gmt-tensor", 2e-4, 1, 0.87), _run("cls", "gmt-tensor", 2e-4, 2, 0.87),
        _run("cls", "gmt-tensor", 1e-4, 1, 0.10),  # not at its best lr: must not be counted
    ]
    opts = {"tasks": ["cls"], "methods": ["sft", "gmt-tensor"], "seeds": [0, 1, 2]}
    s = converge.summarise(runs, opts)["cls"]
    assert s["sft"]["best_lr"] == 1e-4 and s["gmt-tensor"]["best_lr"] == 2e-4
    assert s["gmt-tensor"]["finals"] == [0.91, 0.87, 0.87]
    assert s["gmt-tensor"]["sweep"] == {1e-4: 0.85, 2e-4: 0.91}
    assert s["gmt-tensor"]["delta_vs_sft"] == pytest.approx([0.01, 0.01, -0.01])
    assert s["gmt-tensor"]["mean"] == pytest.approx((0.91 + 0.87 + 0.87) / 3)
    assert s["sft"]["std"] == pytest.approx(0.02)
    text = converge.table({"cls": s}, "cls")
    assert "| gmt-tensor | 0.0001: 0.8500, 0.0002: 0.9100 | 0.0002 |" in text
    assert "+0.0100, +0.0100, -0.0100" in text


def test_plateau_is_the_share_of_the_change_left_for_the_last_third():
    assert converge._plateau([(0, 2.0), (10, 1.5), (20, 1.0), (30, 1.0)]) == 0.0
    assert converge._plateau([(0, 2.0), (10, 1.5), (20, 1.5), (30, 1.0)]) == pytest.approx(0.5)
    assert math.isnan(converge._plateau([(0, 2.0), (30, 1.0)]))


def test_spread_takes_rows_at_an_even_stride_so_an_ordered_split_stays_balanced():
    rows = [{"label": 1}] * 600 + [{"label": 0}] * 400  # ordered by label, as the movie-review split is
    picked = converge.spread(rows, 100)
    assert len(picked) == 100 and sum(r["label"] for r in picked) == 60
    assert converge.spread(rows, 0) == rows and converge.spread(rows, 5000) == rows
    assert converge.spread(list(range(10)), 4) == [0, 2, 5, 7]
