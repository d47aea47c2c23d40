"""The statistics of a mask (masked_nonzero, coverage, never-updated, churn, per layer) against counts
computed here, independently, from the gradients before masking and the masks; and ``ratio_of``.

References: for ``gmt`` the mask is :func:`reference.reference_masks` (sorting Python lists); for the
other strategies the model's gradients have no exact zeros (checked), so the mask is where the
gradient became zero, and a tensor left without a gradient (frozen) is masked whole. Coverage and
churn are then plain bool tensors carried across steps, never packed bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from torch import nn

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.coverage import CoverageTracker, layer_of
from gmt_plugins.engine.bits import pack_bits, pack_bits_reference, popcount, popcount_reference, unpack_bits
from gmt_plugins.engine.dispatch import apply as apply_cut_counted
from gmt_plugins.engine.types import Cut
from gmt_plugins.stats import MaskStats
from fresh_process import outputs_with_and_without_avx2
from reference import reference_apply, reference_masks


# --- models and references ----------------------------------------------------------------------

LAYER = {
    "embed.weight": "embed", "layers.0.weight": "layers.0", "layers.0.bias": "layers.0", "layers.1.weight": "layers.1",
    "layers.1.bias": "layers.1", "head.weight": "head", "head.bias": "head",
}
"""The iface's layer cut, written out by hand for these names."""


class EmbedNet(nn.Module):
    """An embedding whose rows 12.. are never looked up (their gradient is exactly zero, as unused
    vocabulary rows are), then two tanh layers and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).mean(1)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x).squeeze(-1)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 12, (16, 5), generator=g), torch.randn(16, generator=g)


class Reference:
    """Coverage and churn from bool masks, carried across steps."""

    def __init__(self, layers: dict[str, str]) -> None:
        self.layers = layers
        self.updated: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}

    def step(self, masks: dict[str, torch.Tensor], before: dict[str, torch.Tensor | None]) -> dict[str, float]:
        expected: dict[str, float] = {}
        numel = sum(m.numel() for m in masks.values())
        masked = sum(int(m.sum()) for m in masks.values())
        nonzero = {n: int((m & (before[n] != 0) & before[n].isfinite()).sum()) if before[n] is not None else 0 for n, m in masks.items()}
        changed = {n: int((m != self.previous[n]).sum()) for n, m in masks.items() if n in self.previous}
        for n, m in masks.items():
            self.updated[n] = ~m if n not in self.updated else self.updated[n] | ~m
        updated = {n: int(self.updated[n].sum()) for n in masks}
        expected["gmt/masked"] = masked
        expected["gmt/masked_fraction"] = masked / numel
        expected["gmt/masked_nonzero"] = sum(nonzero.values())
        expected["gmt/masked_nonzero_fraction"] = sum(nonzero.values()) / numel
        expected["gmt/coverage"] = sum(updated.values()) / numel
        expected["gmt/never_updated"] = numel - sum(updated.values())
        if changed:
            expected["gmt/churn"] = sum(changed.values()) / sum(masks[n].numel() for n in changed)
        for layer in dict.fromkeys(self.layers[n] for n in masks):
            names = [n for n in masks if self.layers[n] == layer]
            size = sum(masks[n].numel() for n in names)
            p = f"gmt/layer/{layer}/"
            expected[p + "masked_fraction"] = sum(int(masks[n].sum()) for n in names) / size
            expected[p + "masked_nonzero_fraction"] = sum(nonzero[n] for n in names) / size
            expected[p + "coverage"] = sum(updated[n] for n in names) / size
            if all(n in changed for n in names):
                expected[p + "churn"] = sum(changed[n] for n in names) / size
        self.previous = {n: m.clone() for n, m in masks.items()}
        return expected


def assert_logged(logs: dict[str, float], expected: dict[str, float], what: str) -> None:
    for key, value in expected.items():
        assert key in logs, f"{what}: {key} not logged"
        assert math.isclose(logs[key], value, rel_tol=1e-12, abs_tol=1e-12), f"{what}: {key} = {logs[key]}, expected {value}"
    if "gmt/churn" not in expected:
        assert "gmt/churn" not in logs, f"{what}: churn logged on the first step"


def masks_of(strategy: str, before, after, config: GMTConfig, shapes) -> dict[str, torch.Tensor]:
    names = [n for n in before if before[n] is not None]
    if strategy == "gmt":
        ref = reference_masks([before[n] for n in names], config.mask_ratio, config.scope, ratio_of=config.ratio_of)
        masks = dict(zip(names, ref))
        expected = reference_apply([before[n] for n in names], ref)
        for n, e in zip(names, expected):
            assert torch.equal(after[n], e), n
    else:
        assert all(bool((before[n] != 0).all()) for n in names), "the reference needs gradients without zeros"
        masks = {n: after[n] == 0 for n in names}
    # a tensor without a gradient at this step (frozen before the forward pass) is masked whole
    return {n: masks[n] if n in masks else torch.ones(shapes[n], dtype=torch.bool) for n in before}


OPTIONS = {"lisa": {"interval": 1, "active_layers": 1}, "sift": {}, "gmt_momentum": {"beta": 0.5}}
CASES = [
    ("gmt", "tensor", "all"), ("gmt", "global", "all"), ("gmt", "tensor", "nonzero"), ("gmt", "global", "nonzero"),
    ("random", "tensor", "all"), ("random", "global", "all"), ("gmt_momentum", "global", "all"), ("sift", "tensor", "all"),
    ("lisa", "tensor", "all"),
]


def tracked_model(strategy: str, scope: str, **config) -> tuple[nn.Module, GMTConfig]:
    """EmbedNet (seeded) and the tracked, per-layer config the statistics tests train it with."""
    torch.manual_seed(0)
    model = EmbedNet()
    if strategy != "gmt":  # every row looked up: dense gradients, no exact zeros
        model.embed = nn.Embedding(12, 8)
    cfg = GMTConfig(
        mask_ratio=0.3, scope=scope, strategy=strategy, strategy_options=OPTIONS.get(strategy), chunk_numel=1024,
        track_coverage=True, log_layers=True, mask_seed=3, **config,
    )
    return model, cfg


class Step(NamedTuple):
    """One optimizer step of :func:`masked_steps`: what ``apply()`` returned, every gradient just before
    and just after it (``None`` for a tensor without one), the masker, and the parameters' shapes."""

    stats: MaskStats
    before: dict[str, torch.Tensor | None]
    after: dict[str, torch.Tensor | None]
    masker: GradientMasker
    shapes: dict[str, torch.Size]

    def masks(self, strategy: str) -> dict[str, torch.Tensor]:
        """This step's masks, flat (:func:`masks_of`)."""
        return {n: m.flatten() for n, m in masks_of(strategy, self.before, self.after, self.masker.config, self.shapes).items()}


def masked_steps(
    strategy: str, scope: str, steps: int = 4, *, resume_at: int | None = None, old_state: bool = False, **config
) -> Iterator[Step]:
    """SGD steps of EmbedNet (:func:`tracked_model`) with a masker, one :class:`Step` each. ``resume_at``: a
    fresh masker loads the state there (``old_state``: the state without the masked counts, which then come
    from the previous-step bits)."""
    model, cfg = tracked_model(strategy, scope, **config)
    masker = GradientMasker(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for step in range(steps):
        if step == resume_at:
            state = masker.state_dict()
            if old_state:
                del state["coverage"]["masked"]
            masker = GradientMasker(model, cfg)
            masker.load_state_dict(state)
        masker.begin_step()
        ids, y = batch(step)
        nn.functional.mse_loss(model(ids), y).backward()
        before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        stats = masker.apply()
        after = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        yield Step(stats, before, after, masker, shapes)
        optimizer.step()
        masker.restore_masked()
        optimizer.zero_grad()
    masker.unfreeze()


def run_steps(strategy: str, scope: str, steps: int = 4, **config):
    """Train ``steps`` SGD steps with a masker; returns (stats, expected log values, masker) per step."""
    reference = Reference(LAYER)
    out = []
    for s in masked_steps(strategy, scope, steps, **config):
        flat_before = {n: None if b is None else b.flatten() for n, b in s.before.items()}
        out.append((s.stats, reference.step(s.masks(strategy), flat_before), s.masker))
    return out


@pytest.mark.parametrize(("strategy", "scope", "ratio_of"), CASES)
def test_statistics_equal_the_reference_counts(engine, strategy, scope, ratio_of):
    runs = run_steps(strategy, scope, ratio_of=ratio_of)
    for step, (stats, expected, masker) in enumerate(runs):
        logs = stats.to_log_dict(per_layer=True)
        assert_logged(logs, expected, f"{strategy}/{scope} step {step}")
    assert runs[-1][2].last_stats is runs[-1][0]
    last = runs[-1][0]
    if strategy == "gmt":  # 224 of the 617 entries are unused embedding rows, whose gradient is zero
        assert last.masked > last.masked_nonzero and runs[-1][1]["gmt/never_updated"] > 0
        if (scope, ratio_of) == ("global", "all"):  # docs/RESULTS.md's finding: only already-zero entries masked
            assert last.masked_nonzero == 0
        if ratio_of == "nonzero":  # the zero rows masked every step (never updated), and 30% of the others
            assert last.masked_nonzero > 0 and runs[-1][1]["gmt/never_updated"] >= 224
    if strategy == "lisa":  # a frozen tensor: masked whole, coverage of untouched layers stays 0 until chosen
        assert any(not t.masked_nonzero and t.masked == t.numel for t in runs[0][0].tensors)


def test_without_track_coverage_only_the_counts_are_logged():
    runs = run_steps("gmt", "global", steps=2)
    torch.manual_seed(0)
    model = EmbedNet()
    masker = GradientMasker(model, mask_ratio=0.3, scope="global")
    ids, y = batch(0)
    nn.functional.mse_loss(model(ids), y).backward()
    logs = masker.apply().to_log_dict(per_layer=True)
    assert logs["gmt/masked_nonzero"] == runs[0][1]["gmt/masked_nonzero"]
    assert "gmt/coverage" not in logs and "gmt/churn" not in logs and "gmt/never_updated" not in logs
    assert "gmt/layer/embed/masked_fraction" in logs and "gmt/layer/embed/coverage" not in logs
    assert masker.coverage is None and "coverage" not in masker.state_dict()


# --- the apply pass: compiled kernel and torch twins ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("ties", [0, 5, 40])
def test_masked_nonzero_of_every_apply_path(engine, dtype, ties):
    """Kernel, the zero_below fast path and the generic chunks count the same masked_nonzero, which
    is the count of masked entries (+0 and -0 are zero) that were nonzero, NaN/inf never masked."""
    from gmt_plugins.engine.keys import MagnitudeKeys

    g = torch.Generator().manual_seed(1)
    flat = (torch.randint(-4, 5, (5000,), generator=g).float() * 0.25).to(dtype)
    flat[::7] = -0.0
    flat[3], flat[11] = float("nan"), float("inf")
    source = MagnitudeKeys([dtype])
    threshold = int(source.keys(0, torch.tensor([0.5], dtype=dtype), 0)[0])

    class GenericOnly:  # the same keys without the fast path nor the kernel
        key_bits, cap = source.key_bits, source.cap

        def keys(self, index, chunk, start):
            return source.keys(index, chunk, start)

    results = []
    for src in (source, GenericOnly()):
        y = flat.clone()
        record = torch.empty(y.numel(), dtype=torch.bool)
        applied = apply_cut_counted(src, 0, y, Cut(threshold, ties), chunk_numel=1024, record=record)
        masked_before = flat[record]
        assert applied.masked == int(record.sum())
        assert applied.masked_nonzero == int((masked_before != 0).sum())
        assert bool(torch.isfinite(masked_before).all()) and bool((y[record] == 0).all())
        results.append((applied, record))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


# --- packed bits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 1003])
def test_packed_bits_round_trip_and_count(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(packed, pack_bits_reference(mask))
    assert torch.equal(unpack_bits(packed, n), mask)
    assert popcount(packed) == popcount_reference(packed) == int(mask.sum())
    every = torch.arange(256, dtype=torch.uint8)  # every byte value, the sign bit of the words included
    assert popcount(every) == popcount_reference(every) == 8 * 128


def test_tracker_memory_is_two_bits_per_entry_and_checks_its_state():
    tracker = CoverageTracker()
    for name, n in (("a", 1003), ("b", 8)):
        tracker.observe(name, n, torch.zeros(n, dtype=torch.bool), torch.device("cpu"))
    assert tracker.memory_bytes() == 2 * (126 + 1)
    state = tracker.state_dict()
    state["updated"]["a"] = state["updated"]["a"][:-1]
    with pytest.raises(ValueError, match="'updated' of 'a'"):
        CoverageTracker().load_state_dict(state)
    with pytest.raises(ValueError, match="holds 1003 entries"):
        tracker.observe("a", 1004, torch.zeros(1004, dtype=torch.bool), torch.device("cpu"))


@pytest.mark.parametrize("n", [1, 7, 8, 64, 1003, 40_001])
def test_tracker_kernel_equals_its_torch_twin_step_by_step(n, monkeypatch):
    """gmt_coverage_observe against the torch operations on packed bytes and against plain bool
    algebra: counts and both bit sets, over steps with random masks, a frozen step (every entry
    masked) and a checkpoint round trip."""
    from gmt_plugins.engine import dispatch, reference
    from gmt_plugins.engine.cpu import rank as cpu_rank

    assert dispatch.kernel() is not None
    gen = torch.Generator().manual_seed(n)
    masks = [torch.rand(n, generator=gen) < p for p in (0.3, 0.9, 0.5)] + [None, torch.rand(n, generator=gen) < 0.2]
    fast, slow = CoverageTracker(), CoverageTracker()
    calls = []
    real = cpu_rank.coverage_observe
    monkeypatch.setattr(cpu_rank, "coverage_observe", lambda *a: calls.append(1) or real(*a))
    ever = torch.zeros(n, dtype=torch.bool)
    previous = None
    for step, mask in enumerate(masks):
        if step == 3:  # a save/load between steps: the kernel writes into copies of loaded tensors
            loaded = CoverageTracker()
            loaded.load_state_dict({k: dict(v) for k, v in fast.state_dict().items()})
            fast = loaded
        got = fast.observe("w", n, mask, torch.device("cpu"))
        updated, previous_bits, *want = reference.observe_coverage(mask, n, slow.updated.get("w"), slow.previous.get("w"), torch.device("cpu"))
        slow.updated["w"], slow.previous["w"] = updated, previous_bits
        want = tuple(want)
        full = torch.ones(n, dtype=torch.bool) if mask is None else mask
        ever |= ~full
        expected = (int(ever.sum()), None if previous is None else int((previous != full).sum()))
        previous = full
        assert got == want == expected, step
        assert torch.equal(fast.updated["w"], slow.updated["w"]) and torch.equal(fast.previous["w"], slow.previous["w"])
        assert torch.equal(unpack_bits(fast.updated["w"], n), ever)
    assert len(calls) == len(masks)  # every step went through the kernel


def test_tracker_kernel_avx2_and_portable_words_agree(tmp_path):
    """``GMT_PLUGINS_NO_AVX2_SCAN=1`` (read when the kernel loads) makes gmt_coverage_observe pack the
    mask with the portable multiply instead of AVX2 movemasks: in fresh processes both give the same
    counts and bit sets, step by step, for lengths around the 64-entry words."""
    from pathlib import Path

    import gmt_plugins

    root = Path(gmt_plugins.__file__).resolve().parents[1]  # this checkout, not an installed copy
    script = tmp_path / "cover.py"
    script.write_text(
        "import hashlib, torch\n"
        "from gmt_plugins.engine import dispatch\n"
        "from gmt_plugins.coverage import CoverageTracker\n"
        "assert dispatch.kernel() is not None\n"
        "for n in (1, 63, 64, 65, 1000, 4096, 100_003):\n"
        "    gen = torch.Generator().manual_seed(n)\n"
        "    tracker = CoverageTracker()\n"
        "    for p in (0.3, 0.9, None, 0.5):\n"
        "        mask = None if p is None else torch.rand(n, generator=gen) < p\n"
        "        got = tracker.observe('w', n, mask, torch.device('cpu'))\n"
        "        bits = hashlib.sha256(tracker.updated['w'].numpy().tobytes() + tracker.previous['w'].numpy().tobytes()).hexdigest()\n"
        "        print(n, got, bits)\n"
        "from gmt_plugins.engine.cpu import rank as cpu_rank\n"
        "print('avx2', cpu_rank.avx2_scan(dispatch.kernel()))\n"
    )
    outputs = outputs_with_and_without_avx2(tmp_path, script.read_text())
    assert outputs[1][-1] == "avx2 False"
    assert len(outputs[0]) == 29 and outputs[0][:-1] == outputs[1][:-1]


def test_tracker_state_is_a_snapshot_the_kernel_does_not_write_into():
    tracker = CoverageTracker()
    tracker.observe("w", 100, torch.arange(100) % 2 == 0, torch.device("cpu"))
    saved = tracker.state_dict()
    kept = {part: saved[part]["w"].clone() for part in ("updated", "previous")}
    resumed = CoverageTracker()
    resumed.load_state_dict(saved)
    for t in (tracker, resumed):
        t.observe("w", 100, torch.zeros(100, dtype=torch.bool), torch.device("cpu"))
    for part in ("updated", "previous"):
        assert torch.equal(saved[part]["w"], kept[part]), part
    assert torch.equal(tracker.updated["w"], resumed.updated["w"]) and not torch.equal(tracker.updated["w"], kept["updated"])


def test_layer_names_follow_the_interface():
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_of("model.norm.weight") == "model.norm"
    assert layer_of("bert.encoder.layer.11.output.dense.bias") == "bert.encoder.layer.11"
    assert layer_of("lm_head.weight") == "lm_head" and layer_of("bias") == "bias"


# --- ratio_of --------------------------------------------------------------------------------------


def test_ratio_of_is_validated_by_name():
    with pytest.raises(ValueError, match=r"ratio_of must be one of \('all', 'nonzero'\), got 'zeros'"):
        GMTConfig(ratio_of="zeros")
    for flag in ("track_coverage", "log_layers"):
        with pytest.raises(ValueError, match=f"{flag} must be True or False"):
            GMTConfig(**{flag: "yes"})


@pytest.mark.parametrize("strategy", ["random", "gmt_momentum", "sift", "lisa"])
def test_ratio_of_nonzero_is_refused_where_it_has_no_meaning(strategy):
    params = [("w", torch.nn.Parameter(torch.zeros(10)))]
    with pytest.raises(ValueError, match=f"ratio_of='nonzero' has no meaning for strategy '{strategy}'"):
        GradientMasker(params, strategy=strategy, ratio_of="nonzero", strategy_options=OPTIONS.get(strategy))
    pytest.importorskip("transformers")
    from gmt_plugins import GMTCallback

    with pytest.raises(ValueError, match="ratio_of='nonzero' has no meaning"):
        GMTCallback(strategy=strategy, ratio_of="nonzero", strategy_options=OPTIONS.get(strategy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_ratio_of_nonzero_equals_the_reference(engine, dtype, scope, ratio):
    g = torch.Generator().manual_seed(5)
    shapes = [(60, 40), (17,), (3, 500)]
    params = []
    for i, shape in enumerate(shapes):
        grad = torch.randn(shape, generator=g) * 10.0 ** (i - 1)
        grad[torch.rand(shape, generator=g) < 0.35 + 0.2 * i] = 0.0  # zeros, unequally many per tensor
        grad.view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")])
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = grad.to(dtype)
        params.append((f"t{i}", p))
    before = [p.grad.clone() for _, p in params]
    masker = GradientMasker(params, mask_ratio=ratio, scope=scope, ratio_of="nonzero", chunk_numel=1024)
    stats = masker.apply()
    masks = reference_masks(before, ratio, scope, ratio_of="nonzero")
    for (name, p), want, mask, t in zip(params, reference_apply(before, masks), masks, stats.tensors):
        assert torch.equal(p.grad.view(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
        assert t.masked == int(mask.sum())
    finite_nonzero = sum(int((b.isfinite() & (b != 0)).sum()) for b in before)
    if scope == "global":
        assert stats.masked_nonzero == math.floor(ratio * finite_nonzero)
    # "all" masks floor(r * finite) entries, zeros first: at this ratio that is fewer nonzero ones
    params_all = [(n, torch.nn.Parameter(torch.zeros_like(p))) for n, p in params]
    for (_, q), b in zip(params_all, before):
        q.grad = b.clone()
    stats_all = GradientMasker(params_all, mask_ratio=ratio, scope=scope, chunk_numel=1024).apply()
    assert stats_all.masked_nonzero <= stats.masked_nonzero


# --- through the Trainer, and across a resume ---------------------------------------------------------


def grad_recorder():
    """A TrainerCallback that copies every gradient at ``on_pre_optimizer_step``: placed before
    GMTCallback it sees them before masking, after it, masked."""
    from transformers import TrainerCallback

    class GradRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, torch.Tensor | None]] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.steps.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()})

    return GradRecorder()


TRAINER_LAYER = {
    "layers.0.weight": "layers.0", "layers.0.bias": "layers.0", "layers.1.weight": "layers.1", "layers.1.bias": "layers.1",
    "layers.2.weight": "layers.2", "layers.2.bias": "layers.2", "head.weight": "head", "head.bias": "head",
}


def trainer_with_recorders(folder, strategy: str, scope: str, **args):
    pytest.importorskip("transformers")
    from gmt_plugins import GMTCallback
    from tiny_trainer import OPTIONS as TRAINER_OPTIONS
    from tiny_trainer import tiny_trainer

    cb = GMTCallback(
        mask_ratio=0.3, scope=scope, strategy=strategy, strategy_options=TRAINER_OPTIONS.get(strategy), mask_seed=5,
        track_coverage=True, log_layers=True,
    )
    before, after = grad_recorder(), grad_recorder()
    trainer = tiny_trainer(folder, cb, callbacks=[after], **args)
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(callbacks.index(cb), before)
    return trainer, cb, before, after


def expected_history(strategy, scope, before_steps, after_steps, shapes):
    reference = Reference(TRAINER_LAYER)
    config = GMTConfig(mask_ratio=0.3, scope=scope)
    out = []
    for before, after in zip(before_steps, after_steps):
        masks = masks_of(strategy, before, after, config, shapes)
        flat_before = {n: None if b is None else b.flatten() for n, b in before.items()}
        out.append(reference.step({n: m.flatten() for n, m in masks.items()}, flat_before))
    return out


def logged_steps(trainer) -> list[dict[str, float]]:
    return [h for h in trainer.state.log_history if "gmt/masked_fraction" in h]


@pytest.mark.parametrize(("strategy", "scope"), [("gmt", "tensor"), ("gmt", "global"), ("random", "global"), ("lisa", "tensor")])
def test_trainer_logs_the_reference_statistics_and_resume_continues_them(tmp_path, strategy, scope):
    trainer, cb, before, after = trainer_with_recorders(tmp_path / "full", strategy, scope)
    trainer.train()
    logged = logged_steps(trainer)
    shapes = {n: p.shape for n, p in trainer.model.named_parameters()}
    expected = expected_history(strategy, scope, before.steps, after.steps, shapes)
    assert len(logged) == len(expected) == 4
    for step, (logs, want) in enumerate(zip(logged, expected)):
        assert_logged(logs, want, f"Trainer {strategy}/{scope} step {step + 1}")
    full_state = cb.masker.state_dict()
    assert "coverage" in full_state

    # resume from checkpoint-2 in another folder: steps 3-4 log the same coverage and churn
    resumed, rcb, _, _ = trainer_with_recorders(tmp_path / "resumed", strategy, scope)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    again = [h for h in logged_steps(resumed) if h["step"] > 2]  # steps 1-2 come from the checkpoint's history
    assert [h["step"] for h in again] == [3, 4]
    for logs, want in zip(again, expected[2:]):
        assert_logged(logs, want, f"resumed {strategy}/{scope} step {logs['step']}")
    for part in ("updated", "previous"):
        for name, bits in full_state["coverage"][part].items():
            assert torch.equal(rcb.masker.state_dict()["coverage"][part][name], bits), (part, name)


def test_resume_without_saved_coverage_warns(tmp_path):
    pytest.importorskip("transformers")
    from gmt_plugins import GMTCallback
    from tiny_trainer import tiny_trainer

    tiny_trainer(tmp_path / "plain", GMTCallback(mask_ratio=0.3)).train()
    cb = GMTCallback(mask_ratio=0.3, track_coverage=True)
    trainer = tiny_trainer(tmp_path / "later", cb)
    with pytest.warns(UserWarning, match="holds no coverage"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    assert "gmt/coverage" in logged_steps(trainer)[-1]


def test_resume_refuses_another_ratio_of_and_reads_checkpoints_from_before_the_field():
    from gmt_plugins.integrations.checkpoint import check_record

    config = GMTConfig(ratio_of="nonzero")
    saved = {**GMTConfig().to_dict()}
    record = {
        "format": 2, "step": 2, "config": saved, "parameters": {"count": 1, "sha256": ""}, "world_size": 1, "sharded": False,
        "state": {}, "tensors": None,
    }
    from gmt_plugins.integrations.checkpoint import parameter_digest

    record["parameters"]["sha256"] = parameter_digest(["w"])
    with pytest.raises(ValueError, match="ratio_of: saved 'all', now 'nonzero'"):
        check_record(record, config=config, names=["w"], world_size=1, global_step=2)
    del saved["ratio_of"]  # a checkpoint written before ratio_of existed masked as "all"
    check_record(record, config=GMTConfig(), names=["w"], world_size=1, global_step=2)
    with pytest.raises(ValueError, match="ratio_of: saved 'all'"):
        check_record(record, config=config, names=["w"], world_size=1, global_step=2)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_apply_and_coverage_equal_the_record_path(scope, dtype, monkeypatch):
    """With track_coverage and no strict mode, gmt's CPU gradients are masked and folded into the
    coverage bits by one kernel call (blocks of 8,192 entries, no per-entry record): the same
    gradients, counts, coverage, churn and bit sets as the record path (apply with a record, then
    observe), step by step, with ties, -0.0 and NaN/inf, tensors around the block size, a frozen
    step's coverage and a checkpoint round trip in between."""
    from gmt_plugins.engine.cpu import loader
    from gmt_plugins.engine.cpu import histogram as cpu_histogram
    from gmt_plugins.engine.cpu import moves as cpu_moves
    from gmt_plugins.engine import dispatch

    if dispatch.kernel() is None:
        pytest.skip("the compiled kernel is unavailable")
    real_tracked = dispatch.apply_tracked
    shapes = [(300, 70), (17,), (8192,), (8193,), (3, 5000), (0,)]
    params = [(f"t{i}.weight", torch.nn.Parameter(torch.zeros(s, dtype=dtype))) for i, s in enumerate(shapes)]
    runs = []
    for fused in (True, False):
        masker = GradientMasker(params, mask_ratio=0.3, scope=scope, track_coverage=True)
        calls = []
        if fused:
            monkeypatch.setattr(dispatch, "apply_tracked", lambda *a, **k: calls.append(real_tracked(*a, **k)) or calls[-1])
        else:
            monkeypatch.setattr(dispatch, "apply_tracked", lambda *a, **k: None)
        gen = torch.Generator().manual_seed(7)
        seen = []
        for step in range(4):
            if step == 2:  # resume from a checkpoint between steps
                state = masker.state_dict()
                masker = GradientMasker(params, mask_ratio=0.3, scope=scope, track_coverage=True)
                masker.load_state_dict(state)
            for i, (_, p) in enumerate(params):
                g = torch.randint(-3, 4, p.shape, generator=gen).float() * 0.5  # many ties
                if g.numel() > 10:
                    g.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0])
                p.grad = g.to(dtype)
            stats = masker.apply()
            seen.append((
                [(t.masked, t.masked_nonzero, t.nonfinite, t.updated, t.changed) for t in stats.tensors],
                [p.grad.clone() for _, p in params],
                {k: v.clone() for k, v in masker.coverage.updated.items()},
                {k: v.clone() for k, v in masker.coverage.previous.items()},
            ))
        runs.append((seen, calls))
    (fast, calls), (slow, _) = runs
    # the fused call served every tensor with something to mask at every step (the empty tensor's
    # own cut masks nothing in the tensor scope, so it takes the record path there)
    assert len(calls) == 4 * (len(shapes) - (scope == "tensor")) and all(c is not None for c in calls)
    for step, (a, b) in enumerate(zip(fast, slow)):
        assert a[0] == b[0], step
        assert all(torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)) for x, y in zip(a[1], b[1])), step
        assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) and torch.equal(a[3][k], b[3][k]) for k in a[2]), step
    assert fast[-1][0][0][4] is not None  # churn counted after the first step
