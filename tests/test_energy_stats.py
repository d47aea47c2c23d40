"""Energy kept, mask stability (Jaccard) and each layer's share of the updated entries, against
numbers computed here from a saved copy of the gradient and the masks compared directly.

The reference energy is ``math.fsum`` of Python floats (the squares of the finite entries), never a
torch sum; the reference Jaccard compares bool masks of consecutive steps; the masks come from
:func:`reference.reference_masks` (``gmt``) or from where the gradient became zero (gradients
without exact zeros), as in ``tests/test_mask_stats.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.engine import dispatch, reference
from gmt_plugins.engine.cpu import rank as cpu_rank
from gmt_plugins.engine.keys import MagnitudeKeys, MaskKeys, RandomKeys
from gmt_plugins.engine.types import Cut
from test_mask_stats import LAYER, OPTIONS, EmbedNet, batch, masks_of

REL = 1e-9


def energies(before: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Sums of g ** 2 over the finite entries and over the masked ones, from Python floats."""
    values = before.flatten().double().tolist()
    flags = mask.flatten().tolist()
    finite = [v * v for v in values if math.isfinite(v)]
    masked = [v * v for v, m in zip(values, flags) if m]
    return math.fsum(finite), math.fsum(masked)


def close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=REL, abs_tol=0.0)


def awkward(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values over a wide range, repeated values (ties), NaN, +-inf, +-0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)).to(dtype)
    if n >= 40:
        flat[::9] = flat[1]  # ties at many keys
        flat[3], flat[11], flat[12] = float("nan"), float("inf"), float("-inf")
        flat[5], flat[6] = 0.0, -0.0
        flat[20] = torch.finfo(dtype).tiny / 4  # a subnormal
    return flat


def expected_from_record(before: torch.Tensor, record: torch.Tensor, applied) -> None:
    want_all, want_masked = energies(before, record)
    assert applied.masked == int(record.sum())
    assert close(applied.energy, want_all), (applied.energy, want_all)
    assert close(applied.masked_energy, want_masked), (applied.masked_energy, want_masked)


class GenericOnly:
    """The same keys without the fast path nor the kernel: the reference's generic chunks."""

    def __init__(self, source) -> None:
        self.source, self.key_bits, self.cap = source, source.key_bits, source.cap

    def keys(self, index, chunk, start):
        return self.source.keys(index, chunk, start)


SIZES = [0, 1, 7, 5000, 70_001]  # 70,001: several 4,096-entry blocks and 8,192-entry tracked blocks, a tail
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_magnitude_energy_of_every_apply_path(dtype, n, ratio, monkeypatch):
    """gmt_apply (record or not), gmt_apply_tracked, the reference's fast path and generic chunks and
    the device path: one mask, and energies within 1e-9 of the Python sums; the kernel's are the same
    at every call."""
    flat = awkward(n, dtype, seed=n + 1)
    source = MagnitudeKeys([dtype])
    ranking = dispatch.rank(source, [(0, flat)], ratio)
    cut = ranking.cut
    records = []
    for run in ("dispatch", "dispatch again", "fast", "generic"):
        y, record = flat.clone(), torch.zeros(n, dtype=torch.bool)
        if run.startswith("dispatch"):
            applied = dispatch.apply(source, 0, y, cut, ranking=ranking, record=record)
        else:
            src = source if run == "fast" else GenericOnly(source)
            applied = reference.apply_cut(src, 0, y, cut, chunk_numel=1024, record=record)
        expected_from_record(flat, record, applied)
        records.append((record, applied))
    assert all(torch.equal(r, records[0][0]) for r, _ in records)
    first, again = records[0][1], records[1][1]
    assert (first.energy, first.masked_energy) == (again.energy, again.masked_energy)  # deterministic
    if dtype != torch.float64 and cut.threshold is not None:  # the fused coverage apply serves magnitudes of 32 bits and fewer
        y = flat.clone()
        bits = dispatch.tracked_bits(None, None, n)
        done = dispatch.apply_tracked(source, 0, y, cut, bits, ranking=ranking)
        assert done is not None
        expected_from_record(flat, records[0][0], done[0])
    monkeypatch.setattr(dispatch, "DEVICE_MODE", "always")
    if n:
        y, record = flat.clone(), torch.zeros(n, dtype=torch.bool)
        (device_ranking,) = dispatch.rank_step([(source, [(0, y)])], ratio)
        (done,) = dispatch.apply_on_device([device_ranking], [record])
        assert torch.equal(record, records[0][0]) and done.masked == first.masked
        want_all, want_masked = energies(flat, record)
        assert close(done.energy, want_all) and close(done.masked_energy, want_masked)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [5000, 70_001])
def test_random_keys_energy_of_the_preselected_and_hashing_applies(dtype, n):
    """Random keys: gmt_apply_preselected (the ranking's bits and candidates), gmt_apply hashing
    again, and the reference."""
    flat = awkward(n, dtype, seed=7)
    source = RandomKeys([12345])
    ranking = dispatch.rank(source, [(0, flat)], 0.4)
    assert ranking.backend == "cpu" and ranking.state.selection is not None  # the preselected apply serves
    results = []
    for how in ("preselected", "hashing", "reference"):
        y, record = flat.clone(), torch.zeros(n, dtype=torch.bool)
        if how == "reference":
            applied = reference.apply_cut(source, 0, y, ranking.cut, chunk_numel=1024, record=record)
        else:
            applied = dispatch.apply(source, 0, y, ranking.cut, ranking=ranking if how == "preselected" else None, record=record)
        expected_from_record(flat, record, applied)
        results.append(record)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("n", [1, 63, 4096, 70_001])
def test_stored_mask_bits_energy_equals_the_byte_apply_bit_for_bit(n):
    """gmt_apply_mask_bits and gmt_apply's KIND_MASK pass add the same squares in the same order."""
    from gmt_plugins.engine.keys import StoredMask

    lib = dispatch.kernel()
    flat = awkward(n, torch.float32, seed=n)
    g = torch.Generator().manual_seed(3)
    kept = torch.rand(n, generator=g) < 0.6
    kept[: min(n, 4096)] = True  # a whole block with no bit set: read for its energy, not written
    bits = cpu_rank.pack_mask_bits(lib, kept, invert=True)
    fast, slow, ref = flat.clone(), flat.clone(), flat.clone()
    got = cpu_rank.apply_mask_bits(lib, fast, bits, None)
    want = cpu_rank.apply(lib, slow, cpu_rank.NativeKeys(cpu_rank.KIND_MASK, mask=~kept), 1, 0, None)
    assert got == want and (got.energy, got.masked_energy) == (want.energy, want.masked_energy)
    masked = ~kept & torch.isfinite(flat)
    expected_from_record(flat, masked, got)
    source = MaskKeys([StoredMask(kept, bits)])
    through = dispatch.apply(source, 0, flat.clone(), Cut(1))
    by_torch = reference.apply_cut(source, 0, ref, Cut(1), chunk_numel=1000)
    for applied in (through, by_torch):
        expected_from_record(flat, masked, applied)


def test_avx2_and_portable_energy_loops_agree_bit_for_bit(tmp_path):
    """``GMT_PLUGINS_NO_AVX2_SCAN=1`` makes the kernel mask fp32 and sum the squares with the portable
    loops instead of the AVX2 ones: in fresh processes both give the same sums, to the last bit, for fp32
    and bf16 (with and without NaN/inf in a block, with a record or without), and the same masks."""
    from fresh_process import outputs_with_and_without_avx2

    body = (
        "import hashlib, torch\n"
        "from gmt_plugins.engine import dispatch\n"
        "from gmt_plugins.engine.keys import MagnitudeKeys\n"
        "from gmt_plugins.engine.cpu import rank as cpu_rank\n"
        "from test_energy_stats import awkward\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for n in (15, 16, 4097, 70_001):\n"
        "        for clean in (False, True):\n"
        "            flat = awkward(n, dtype, seed=n)\n"
        "            if clean:\n"
        "                flat = torch.nan_to_num(flat, 0.0, 0.0, 0.0)\n"
        "            source = MagnitudeKeys([dtype])\n"
        "            ranking = dispatch.rank(source, [(0, flat)], 0.3)\n"
        "            record = torch.zeros(n, dtype=torch.bool)\n"
        "            b = dispatch.apply(source, 0, flat.clone(), ranking.cut, ranking=ranking)\n"
        "            a = dispatch.apply(source, 0, flat, ranking.cut, ranking=ranking, record=record)\n"
        "            assert (a.energy, a.masked_energy) == (b.energy, b.masked_energy)\n"
        "            print(dtype, n, clean, tuple(a), a.energy.hex(), a.masked_energy.hex(), hashlib.sha256(record.numpy().tobytes()).hexdigest())\n"
        "print('avx2', cpu_rank.avx2_scan(dispatch.kernel()))\n"
    )
    with_avx2, portable = outputs_with_and_without_avx2(tmp_path, body)
    assert portable[-1] == "avx2 False" and len(with_avx2) == 17
    assert with_avx2[:-1] == portable[:-1]


# --- through the masker -------------------------------------------------------------------------


class Expected:
    """Energy kept, Jaccard and update share from saved gradients and bool masks, carried across steps."""

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] = {}

    def step(self, masks: dict[str, torch.Tensor], before: dict[str, torch.Tensor | None]) -> dict[str, float]:
        sums = {n: energies(before[n], m) if before[n] is not None else (0.0, 0.0) for n, m in masks.items()}
        both = {n: int((m & self.previous[n]).sum()) for n, m in masks.items() if n in self.previous}
        either = {n: int((m | self.previous[n]).sum()) for n, m in masks.items() if n in self.previous}
        updated = {n: int((~m).sum()) for n, m in masks.items()}
        out = {"gmt/energy_kept": kept_share(list(sums.values()))}
        if both:
            out["gmt/mask_jaccard"] = jaccard(sum(both.values()), sum(either.values()))
        for layer in dict.fromkeys(LAYER[n] for n in masks):
            names = [n for n in masks if LAYER[n] == layer]
            p = f"gmt/layer/{layer}/"
            out[p + "energy_kept"] = kept_share([sums[n] for n in names])
            out[p + "update_share"] = sum(updated[n] for n in names) / sum(updated.values())
            if all(n in both for n in names):
                out[p + "mask_jaccard"] = jaccard(sum(both[n] for n in names), sum(either[n] for n in names))
        self.previous = {n: m.clone() for n, m in masks.items()}
        return out


def kept_share(sums: list[tuple[float, float]]) -> float:
    total = math.fsum(a for a, _ in sums)
    return (total - math.fsum(m for _, m in sums)) / total if total else 1.0


def jaccard(both: int, either: int) -> float:
    return both / either if either else 1.0


def train(strategy: str, scope: str, steps: int = 4, *, resume_at: int | None = None, old_state: bool = False, **config):
    """SGD steps of EmbedNet with a masker (tracked, per layer); per step the log dict, the expected
    numbers and the stats. ``resume_at``: a fresh masker loads the state there (``old_state``: saved
    without the masked counts, as states were before they were kept)."""
    torch.manual_seed(0)
    model = EmbedNet()
    if strategy != "gmt":  # every row looked up: dense gradients, no exact zeros
        model.embed = nn.Embedding(12, 8)
    cfg = GMTConfig(
        mask_ratio=0.3, scope=scope, strategy=strategy, strategy_options=OPTIONS.get(strategy), chunk_numel=1024,
        track_coverage=True, log_layers=True, mask_seed=3, **config,
    )
    masker = GradientMasker(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = Expected()
    out = []
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
        masks = masks_of(strategy, before, after, cfg, {n: p.shape for n, p in model.named_parameters()})
        flat = {n: m.flatten() for n, m in masks.items()}
        out.append((stats.to_log_dict(per_layer=True), expected.step(flat, before), stats, before, flat))
        optimizer.step()
        masker.restore_masked()
        optimizer.zero_grad()
    masker.unfreeze()
    return out


CASES = [
    ("gmt", "tensor", {}), ("gmt", "global", {}), ("gmt", "tensor", {"strict": True}), ("gmt", "global", {"ratio_of": "nonzero"}),
    ("random", "tensor", {}), ("random", "global", {}), ("gmt_momentum", "global", {}), ("sift", "tensor", {}),
    ("lisa", "tensor", {}),
]


@pytest.fixture(params=["native", "torch"])
def engine(request, monkeypatch):
    monkeypatch.setenv("GMT_PLUGINS_NATIVE", "1" if request.param == "native" else "0")
    return request.param


@pytest.mark.parametrize(("strategy", "scope", "config"), CASES, ids=lambda c: c if isinstance(c, str) else ",".join(c) or "-")
def test_logged_numbers_equal_the_ones_from_gradients_and_masks(engine, strategy, scope, config):
    runs = train(strategy, scope, **config)
    for step, (logs, want, stats, before, masks) in enumerate(runs):
        for key, value in want.items():
            assert key in logs, f"step {step}: {key} not logged"
            assert math.isclose(logs[key], value, rel_tol=REL, abs_tol=1e-12), f"step {step}: {key} = {logs[key]}, expected {value}"
        assert ("gmt/mask_jaccard" in logs) == (step > 0)
        for t in stats.tensors:  # per tensor too; a frozen tensor (no gradient) adds nothing
            want_all, want_masked = energies(before[t.name], masks[t.name]) if before[t.name] is not None else (0.0, 0.0)
            assert close(t.energy, want_all) and close(t.masked_energy, want_masked), t.name
    shares = [v for k, v in runs[-1][0].items() if k.endswith("/update_share")]
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-12)
    assert 0 < runs[-1][0]["gmt/energy_kept"] <= 1
    if strategy == "lisa":
        assert any(t.energy == 0 and t.masked == t.numel for t in runs[0][2].tensors)


@pytest.mark.parametrize("old_state", [False, True], ids=["saved counts", "counted from the bits"])
def test_jaccard_resumes_exactly(old_state):
    """A masker loaded from a state (with the masked counts, or without them as older states were)
    logs the Jaccard the uninterrupted run logs."""
    straight = train("gmt", "tensor", steps=4)
    resumed = train("gmt", "tensor", steps=4, resume_at=2, old_state=old_state)
    for step, ((a, *_), (b, *_)) in enumerate(zip(straight, resumed)):
        jaccards = {k: v for k, v in a.items() if "mask_jaccard" in k}
        assert jaccards == {k: v for k, v in b.items() if "mask_jaccard" in k}, step
        assert bool(jaccards) == (step > 0)


def test_jaccard_of_empty_masks_and_of_no_previous_step():
    from gmt_plugins.stats import MaskStats, TensorStats

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


def test_coverage_state_rejects_masked_counts_it_cannot_hold():
    from gmt_plugins.coverage import CoverageTracker

    tracker = CoverageTracker()
    tracker.observe("w", 100, torch.arange(100) % 3 == 0, torch.device("cpu"))
    assert tracker.note_masked("w", 34) is None
    state = tracker.state_dict()
    assert state["masked"] == {"w": 34}
    state["masked"] = {"w": 101}
    with pytest.raises(ValueError, match="'masked'"):
        CoverageTracker().load_state_dict(state)


# --- sharded: one all-reduce of counts and energies -----------------------------------------------


class Shards:
    """Two ranks' all-reduce: rank 1's numbers are recorded, then added to rank 0's."""

    def __init__(self) -> None:
        self.recorded: torch.Tensor | None = None

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.recorded is None:
            self.recorded = tensor.clone()
            return tensor
        return tensor.add_(self.recorded)


def test_sharded_counts_and_energies_are_summed_in_one_all_reduce():
    from gmt_plugins.engine.types import Applied
    from gmt_plugins.masker import _summed_over_shards

    shards = Shards()
    rank1 = [(Applied(3, 0, 2, 1.5, 0.25), (7, 1, 2)), (Applied(0, 0, 0, 0.0, 0.0), (4, 0, 0))]
    _summed_over_shards(rank1, True, shards, torch.device("cpu"))
    rank0 = [(Applied(5, 1, 4, 2.0, 0.5), (9, 3, 6)), (Applied(2, 0, 2, 1e-30, 1e-30), (1, 0, 2))]
    counts, sums = _summed_over_shards(rank0, True, shards, torch.device("cpu"))
    assert counts == [(8, 6, 16, 4, 8), (2, 2, 5, 0, 2)]
    assert sums == [(3.5, 0.75), (1e-30, 1e-30)]
    first = [(Applied(3, 0, 2, 1.0, 0.5), (7, None, None))]
    shards = Shards()
    _summed_over_shards(first, True, shards, torch.device("cpu"))
    assert _summed_over_shards(first, True, shards, torch.device("cpu"))[0] == [(6, 4, 14, None, None)]
    untracked = Shards()
    _summed_over_shards([(Applied(2**40 + 1, 0, 1, 0.0, 0.0), None)], False, untracked, torch.device("cpu"))
    assert _summed_over_shards([(Applied(2**40 + 1, 0, 1, 0.0, 0.0), None)], False, untracked, torch.device("cpu"))[0] == [
        (2**41 + 2, 2, None, None, None)
    ]


# --- through the Trainer --------------------------------------------------------------------------


def test_new_keys_reach_log_history_with_the_numbers_of_the_gradients(tmp_path):
    """A tiny Llama under SFTTrainer: the gradients GMT sees are saved at every step, their masks
    recomputed by the reference, and every new key of the log history checked against them."""
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
        max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=32, learning_rate=1e-2,
        lr_scheduler_type="constant",
    ))
    gmt = GMTCallback(mask_ratio=0.3, log_layers=True, track_coverage=True)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=text_dataset(), processing_class=tiny_tokenizer(), callbacks=[gmt],
        optimizers=(torch.optim.SGD(model.parameters(), lr=1e-2), None),
    )
    trainer.callback_handler.callbacks.insert(0, SaveGradients())
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == len(seen) == 3
    previous: dict[str, torch.Tensor] | None = None
    for step, (entry, grads) in enumerate(zip(logged, seen)):
        names = list(grads)
        masks = dict(zip(names, (m.flatten() for m in reference_masks([grads[n] for n in names], 0.3, "tensor"))))
        sums = {n: energies(grads[n], masks[n]) for n in names}
        updated = {n: int((~masks[n]).sum()) for n in names}
        layers = {n: layer_of(n) for n in names}
        want = {"gmt/energy_kept": kept_share(list(sums.values()))}
        if previous is not None:
            want["gmt/mask_jaccard"] = jaccard(
                sum(int((masks[n] & previous[n]).sum()) for n in names), sum(int((masks[n] | previous[n]).sum()) for n in names)
            )
        for layer in dict.fromkeys(layers.values()):
            group = [n for n in names if layers[n] == layer]
            want[f"gmt/layer/{layer}/energy_kept"] = kept_share([sums[n] for n in group])
            want[f"gmt/layer/{layer}/update_share"] = sum(updated[n] for n in group) / sum(updated.values())
            if previous is not None:
                both = sum(int((masks[n] & previous[n]).sum()) for n in group)
                want[f"gmt/layer/{layer}/mask_jaccard"] = jaccard(both, sum(int((masks[n] | previous[n]).sum()) for n in group))
        for key, value in want.items():
            assert key in entry, f"step {step}: {key} not in the log history"
            assert math.isclose(entry[key], value, rel_tol=REL, abs_tol=1e-12), f"step {step}: {key} = {entry[key]}, expected {value}"
        assert 0 < entry["gmt/energy_kept"] < 1 and ("gmt/mask_jaccard" in entry) == (step > 0)
        previous = masks
