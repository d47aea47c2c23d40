"""Mask stability (``gmt/mask_jaccard``) and each layer's share of the updated entries
(``gmt/layer/<layer>/update_share``) against numbers computed here from masks compared directly: bool
masks recorded from the gradients before and after masking (or by the reference), carried across
steps as plain tensors, never as packed bits or counts.
"""

from __future__ import annotations

import math

import pytest
import torch

from gmt_plugins.coverage import CoverageTracker
from gmt_plugins.stats import MaskStats, TensorStats
from test_mask_stats import LAYER, masked_steps


def jaccard(both: int, either: int) -> float:
    return both / either if either else 1.0


class Expected:
    """Jaccard and update share from bool masks, the previous step's mask kept as a bool tensor."""

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] = {}

    def step(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        both = {n: int((m & self.previous[n]).sum()) for n, m in masks.items() if n in self.previous}
        either = {n: int((m | self.previous[n]).sum()) for n, m in masks.items() if n in self.previous}
        updated = {n: int((~m).sum()) for n, m in masks.items()}
        out = {}
        if both:
            out["gmt/mask_jaccard"] = jaccard(sum(both.values()), sum(either.values()))
        for layer in dict.fromkeys(LAYER[n] for n in masks):
            names = [n for n in masks if LAYER[n] == layer]
            out[f"gmt/layer/{layer}/update_share"] = sum(updated[n] for n in names) / sum(updated.values())
            if all(n in both for n in names):
                out[f"gmt/layer/{layer}/mask_jaccard"] = jaccard(sum(both[n] for n in names), sum(either[n] for n in names))
        self.previous = {n: m.clone() for n, m in masks.items()}
        return out


def train(strategy: str, scope: str, steps: int = 4, *, resume_at: int | None = None, old_state: bool = False, **config):
    """SGD steps of EmbedNet with a masker (tracked, per layer); per step the log dict and the expected
    numbers (:func:`test_mask_stats.masked_steps`, which also resumes)."""
    expected = Expected()
    return [
        (s.stats.to_log_dict(per_layer=True), expected.step(s.masks(strategy)))
        for s in masked_steps(strategy, scope, steps, resume_at=resume_at, old_state=old_state, **config)
    ]


CASES = [
    ("gmt", "tensor", {}), ("gmt", "global", {}), ("gmt", "tensor", {"strict": True}), ("gmt", "global", {"ratio_of": "nonzero"}),
    ("random", "tensor", {}), ("random", "global", {}), ("gmt_momentum", "global", {}), ("sift", "tensor", {}),
    ("lisa", "tensor", {}),
]


@pytest.mark.parametrize(("strategy", "scope", "config"), CASES, ids=lambda c: c if isinstance(c, str) else ",".join(c) or "-")
def test_logged_numbers_equal_the_ones_from_masks_compared_directly(engine, strategy, scope, config):
    runs = train(strategy, scope, **config)
    for step, (logs, want) in enumerate(runs):
        for key, value in want.items():
            assert key in logs, f"step {step}: {key} not logged"
            assert math.isclose(logs[key], value, rel_tol=1e-12, abs_tol=1e-12), f"step {step}: {key} = {logs[key]}, expected {value}"
        assert ("gmt/mask_jaccard" in logs) == (step > 0)
        assert {k for k in logs if "mask_jaccard" in k or "update_share" in k} == set(want), step
    shares = [v for k, v in runs[-1][0].items() if k.endswith("/update_share")]
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-12)
    assert all(0 <= logs["gmt/mask_jaccard"] <= 1 for logs, _ in runs[1:])


@pytest.mark.parametrize("old_state", [False, True], ids=["saved counts", "counted from the bits"])
def test_jaccard_resumes_exactly(old_state):
    """A masker loaded from a state (with the masked counts, or without them) logs the Jaccard the
    uninterrupted run logs, and the one computed from the masks."""
    straight = train("gmt", "tensor", steps=4)
    resumed = train("gmt", "tensor", steps=4, resume_at=2, old_state=old_state)
    for step, ((a, want), (b, _)) in enumerate(zip(straight, resumed)):
        jaccards = {k: v for k, v in a.items() if "mask_jaccard" in k}
        assert jaccards == {k: v for k, v in b.items() if "mask_jaccard" in k}, step
        assert bool(jaccards) == (step > 0)
        assert all(math.isclose(v, want[k], rel_tol=1e-12) for k, v in jaccards.items()), step


def test_jaccard_of_empty_masks_and_of_no_previous_step():
    empty = TensorStats("a.w", 10, 0, 0, None, updated=10, changed=0, previous_masked=0)
    assert MaskStats(0, "gmt", "tensor", [empty]).mask_jaccard == 1.0
    first = TensorStats("a.w", 10, 4, 0, None, updated=6, changed=None)
    assert MaskStats(0, "gmt", "tensor", [first]).mask_jaccard is None
    # prev {0,1,2}, cur {1,2,3,4}: changed {0,3,4}; AND 2, OR 5
    moved = TensorStats("a.w", 10, 4, 0, None, updated=8, changed=3, previous_masked=3)
    assert MaskStats(1, "gmt", "tensor", [moved]).mask_jaccard == 2 / 5
    untracked = TensorStats("a.w", 10, 4, 0, None)
    assert MaskStats(1, "gmt", "tensor", [untracked]).mask_jaccard is None
    assert "gmt/mask_jaccard" not in MaskStats(1, "gmt", "tensor", [untracked]).to_log_dict()


def test_coverage_state_keeps_masked_counts_and_rejects_ones_it_cannot_hold():
    tracker = CoverageTracker()
    tracker.observe("w", 100, torch.arange(100) % 3 == 0, torch.device("cpu"))
    assert tracker.note_masked("w", 34) is None
    state = tracker.state_dict()
    assert state["masked"] == {"w": 34}
    for old in (state, {k: v for k, v in state.items() if k != "masked"}):  # the count saved, or from the bits
        loaded = CoverageTracker()
        loaded.load_state_dict(old)
        loaded.observe("w", 100, torch.arange(100) % 2 == 0, torch.device("cpu"))
        assert loaded.note_masked("w", 50) == 34
    state["masked"] = {"w": 101}
    with pytest.raises(ValueError, match="'masked'"):
        CoverageTracker().load_state_dict(state)


def test_trainer_log_history_holds_the_numbers_of_the_masks_averaged_over_the_window(tmp_path):
    """A tiny Llama under SFTTrainer, logging every second step: the gradients GMT sees are saved at
    every step, their masks recomputed by the reference, and each logged value is the mean of the
    steps of its window that have one."""
    pytest.importorskip("trl")
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from gmt_plugins import GMTCallback
    from gmt_plugins.coverage import layer_of
    from reference import reference_masks
    from tiny import cpu_args, text_dataset, tiny_llama, tiny_tokenizer

    seen: list[dict[str, torch.Tensor]] = []

    class SaveGradients(TrainerCallback):  # runs before GMTCallback: the clipped gradient GMT masks
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    model = tiny_llama()
    config = SFTConfig(output_dir=str(tmp_path), **cpu_args(
        max_steps=4, logging_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=32,
        learning_rate=1e-2, lr_scheduler_type="constant",
    ))
    gmt = GMTCallback(mask_ratio=0.3, log_layers=True, track_coverage=True)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=text_dataset(), processing_class=tiny_tokenizer(), callbacks=[gmt],
        optimizers=(torch.optim.SGD(model.parameters(), lr=1e-2), None),
    )
    trainer.callback_handler.callbacks.insert(0, SaveGradients())
    trainer.train()
    logged = [e for e in trainer.state.log_history if "gmt/masked_fraction" in e]
    assert len(logged) == 2 and len(seen) == 4
    per_step: list[dict[str, float]] = []
    previous: dict[str, torch.Tensor] | None = None
    for grads in seen:
        names = list(grads)
        masks = dict(zip(names, (m.flatten() for m in reference_masks([grads[n] for n in names], 0.3, "tensor"))))
        updated = {n: int((~masks[n]).sum()) for n in names}
        want = {}
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(layer_of(n), []).append(n)
        for layer, group in groups.items():
            want[f"gmt/layer/{layer}/update_share"] = sum(updated[n] for n in group) / sum(updated.values())
        if previous is not None:
            for key, group in [("gmt/mask_jaccard", names)] + [(f"gmt/layer/{k}/mask_jaccard", g) for k, g in groups.items()]:
                both = sum(int((masks[n] & previous[n]).sum()) for n in group)
                want[key] = jaccard(both, sum(int((masks[n] | previous[n]).sum()) for n in group))
        per_step.append(want)
        previous = masks
    for window, entry in enumerate(logged):
        steps = per_step[2 * window : 2 * window + 2]
        keys = set().union(*steps)
        assert keys == {k for k in entry if "mask_jaccard" in k or "update_share" in k}, window
        for key in keys:
            values = [s[key] for s in steps if key in s]
            want = sum(values) / len(values)
            assert math.isclose(entry[key], want, rel_tol=1e-12), f"window {window}: {key} = {entry[key]}, expected {want}"
    assert "gmt/mask_jaccard" in logged[0] and 0 < logged[1]["gmt/mask_jaccard"] < 1
