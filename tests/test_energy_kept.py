"""The energy kept (``track_energy``): the sums of ``g ** 2`` every apply path takes before and after
masking, against ``math.fsum`` of Python floats over the gradient saved before the apply and the
gradient it left; and the logged shares, overall and per layer, against the same sums of saved
gradients, through ``GradientMasker`` and through the Trainer.

The sums are never compared with a torch sum: the reference is ``fsum`` of the finite entries'
squares (exact, then rounded once). Every path must also mask exactly what it masks without the
sums (same gradient bits, same record, same counts).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.engine import dispatch, reference
from gmt_plugins.engine.cpu import rank as cpu_rank
from gmt_plugins.engine.keys import MagnitudeKeys, MaskKeys, RandomKeys, ScoreKeys, StoredMask
from gmt_plugins.engine.types import Cut, Energy
from gmt_plugins.stats import MaskStats, TensorStats
from test_mask_stability import CASES
from test_mask_stats import LAYER, batch, masked_steps, tracked_model

REL = 1e-12


def square_sum(values: torch.Tensor) -> float:
    """``fsum`` of the squares of the finite entries, from Python floats (exact in double)."""
    return math.fsum(v * v for v in values.flatten().double().tolist() if math.isfinite(v))


def close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=REL, abs_tol=1e-300)


def awkward(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values over a wide range, repeated values (ties), NaN, +-inf, +-0 and a subnormal."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)).to(dtype)
    if n >= 40:
        flat[::9] = flat[1]  # ties at many keys
        flat[3], flat[11], flat[12] = float("nan"), float("inf"), float("-inf")
        flat[5], flat[6] = 0.0, -0.0
        flat[20] = torch.finfo(dtype).tiny / 4
    return flat


def assert_energy(energy: Energy, before: torch.Tensor, after: torch.Tensor, what: str) -> None:
    want_before, want_after = square_sum(before), square_sum(after)
    assert close(energy.total, want_before), (what, energy.total, want_before)
    assert close(energy.kept, want_after), (what, energy.kept, want_after)


class GenericOnly:
    """The same keys without the fast path or the kernel: the reference's generic chunks."""

    def __init__(self, source) -> None:
        self.source, self.key_bits, self.cap = source, source.key_bits, source.cap

    def keys(self, index, chunk, start):
        return self.source.keys(index, chunk, start)


SIZES = [0, 1, 7, 5000, 70_001]  # 70,001: several 4,096-entry blocks and 8,192-entry tracked blocks, a tail
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.999])
def test_every_magnitude_apply_path_sums_what_it_masks(dtype, n, ratio, monkeypatch):
    """The kernel's apply (with and without a record), its coverage-fused apply, the reference's fast
    path and generic chunks, and the device path: the sums before and after equal the Python sums of
    the saved gradient and of what the apply left, the mask is the one the apply gives without sums,
    and the kernel gives the same sums at every call."""
    flat = awkward(n, dtype, seed=n + 1)
    source = MagnitudeKeys([dtype])
    ranking = dispatch.rank(source, [(0, flat)], ratio)
    cut = ranking.cut
    plain, plain_record = flat.clone(), torch.zeros(n, dtype=torch.bool)
    plain_applied = dispatch.apply(source, 0, plain, cut, ranking=ranking, record=plain_record)
    sums = []
    for run in ("kernel", "kernel again", "kernel without record", "fast", "generic"):
        y, record, energy = flat.clone(), torch.zeros(n, dtype=torch.bool), Energy()
        if run.startswith("kernel"):
            applied = dispatch.apply(
                source, 0, y, cut, ranking=ranking, record=None if "without" in run else record, energy=energy
            )
        else:
            src = source if run == "fast" else GenericOnly(source)
            applied = reference.apply_cut(src, 0, y, cut, chunk_numel=1024, record=record, energy=energy)
        assert applied == plain_applied and torch.equal(y.view(torch.uint8), plain.view(torch.uint8)), run
        if "without" not in run:
            assert torch.equal(record, plain_record), run
        assert_energy(energy, flat, y, run)
        sums.append((energy.total, energy.kept))
    assert sums[0] == sums[1] == sums[2]  # the kernel's are the same at every call
    if dtype != torch.float64 and cut.threshold is not None:  # the fused coverage apply: 32-bit keys and fewer
        y, energy = flat.clone(), Energy()
        done = dispatch.apply_tracked(source, 0, y, cut, dispatch.tracked_bits(None, None, n), ranking=ranking, energy=energy)
        assert done is not None and done[0] == plain_applied and torch.equal(y.view(torch.uint8), plain.view(torch.uint8))
        assert_energy(energy, flat, y, "tracked")
    if n:
        monkeypatch.setattr(dispatch, "DEVICE_MODE", "always")
        y, record, energy = flat.clone(), torch.zeros(n, dtype=torch.bool), Energy()
        (device_ranking,) = dispatch.rank_step([(source, [(0, y)])], ratio)
        (done,) = dispatch.apply_on_device([device_ranking], [record], [energy])
        assert torch.equal(record, plain_record) and done.masked == plain_applied.masked
        assert_energy(energy, flat, y, "device")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [5000, 70_001])
def test_random_keys_preselected_hashing_and_reference_applies_sum_alike(dtype, n):
    """Random keys: the apply that reads the ranking's bits and candidates (block by block with the
    sums), the one that hashes the keys again, and the reference."""
    flat = awkward(n, dtype, seed=7)
    source = RandomKeys([12345])
    ranking = dispatch.rank(source, [(0, flat)], 0.4)
    assert ranking.backend == "cpu" and ranking.state.selection is not None  # the preselected apply serves
    plain = flat.clone()
    plain_applied = dispatch.apply(source, 0, plain, ranking.cut, ranking=ranking)
    for how in ("preselected", "hashing", "reference"):
        y, energy = flat.clone(), Energy()
        if how == "reference":
            applied = reference.apply_cut(source, 0, y, ranking.cut, chunk_numel=1024, energy=energy)
        else:
            applied = dispatch.apply(source, 0, y, ranking.cut, ranking=ranking if how == "preselected" else None, energy=energy)
        assert applied == plain_applied and torch.equal(y.view(torch.uint8), plain.view(torch.uint8)), how
        assert_energy(energy, flat, y, how)


@pytest.mark.parametrize("n", [7, 5000, 70_001])
def test_score_keys_kernel_and_reference_applies_sum_alike(n):
    """Scores (gmt_momentum's and sift's keys): the kernel computes them block by block from the stored
    score, the reference from the score function; both sum what they mask."""
    flat = awkward(n, torch.float32, seed=11)
    score = torch.rand(n, generator=torch.Generator().manual_seed(5))
    source = ScoreKeys.from_tensors([score])
    ranking = dispatch.rank(source, [(0, flat)], 0.4)
    plain = flat.clone()
    plain_applied = reference.apply_cut(source, 0, plain, ranking.cut, chunk_numel=1024)
    for how in ("kernel", "reference"):
        y, energy = flat.clone(), Energy()
        if how == "kernel":
            applied = dispatch.apply(source, 0, y, ranking.cut, energy=energy)
        else:
            applied = reference.apply_cut(source, 0, y, ranking.cut, chunk_numel=1024, energy=energy)
        assert applied == plain_applied and torch.equal(y.view(torch.int32), plain.view(torch.int32)), how
        assert_energy(energy, flat, y, how)


@pytest.mark.parametrize("n", [1, 63, 4096, 70_001])
def test_stored_mask_bits_and_byte_applies_sum_bit_for_bit(n):
    """The packed-bits apply and the byte-mask apply add the same squares in the same blocks; a block
    with no bit set is read for its sum, and not written."""
    lib = dispatch.kernel()
    flat = awkward(n, torch.float32, seed=n)
    kept = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.6
    if n > 4096:
        kept[:4096] = True  # a whole block with no bit set
    bits = cpu_rank.pack_mask_bits(lib, kept, invert=True)
    fast, slow, ref = flat.clone(), flat.clone(), flat.clone()
    e_fast, e_slow, e_ref = Energy(), Energy(), Energy()
    got = cpu_rank.apply_mask_bits(lib, fast, bits, None, e_fast)
    want = cpu_rank.apply(lib, slow, cpu_rank.NativeKeys(cpu_rank.KIND_MASK, mask=~kept), 1, 0, None, e_slow)
    assert got == want and torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    assert got[0] == int((~kept & torch.isfinite(flat)).sum())
    assert (e_fast.total, e_fast.kept) == (e_slow.total, e_slow.kept)
    assert_energy(e_fast, flat, fast, "bits")
    reference.apply_cut(MaskKeys([StoredMask(kept, bits)]), 0, ref, Cut(1), chunk_numel=1000, energy=e_ref)
    assert torch.equal(ref.view(torch.int32), fast.view(torch.int32))
    assert_energy(e_ref, flat, ref, "reference")


@pytest.mark.parametrize("native", [True, False])
def test_a_cut_that_masks_nothing_is_summed_once_and_kept_whole(native, monkeypatch):
    """``Cut(None)`` (a tensor a strategy leaves whole) with ``energy``: nothing changes, kept == before."""
    monkeypatch.setenv("GMT_PLUGINS_NATIVE", "1" if native else "0")
    flat = awkward(9000, torch.float32, seed=1)
    y, record, energy = flat.clone(), torch.ones(9000, dtype=torch.bool), Energy()
    applied = dispatch.apply(MagnitudeKeys([torch.float32]), 0, y, Cut(None), record=record, energy=energy)
    assert tuple(applied) == (0, 0, 0) and not record.any() and torch.equal(y.view(torch.int32), flat.view(torch.int32))
    assert energy.kept == energy.total and close(energy.total, square_sum(flat))


# --- through the masker -------------------------------------------------------------------------


def kept_share(pairs: list[tuple[float, float]]) -> float:
    before = math.fsum(b for b, _ in pairs)
    return math.fsum(a for _, a in pairs) / before if before else 1.0


def run(strategy: str, scope: str, steps: int = 3, **config):
    """SGD steps of EmbedNet with ``track_energy`` (and coverage, per layer); per step the log dict, the
    expected numbers from the gradients saved before and after each apply, the stats and the names with a
    gradient."""
    out = []
    for s in masked_steps(strategy, scope, steps, track_energy=True, **config):
        pairs = {n: (square_sum(g), square_sum(s.after[n])) for n, g in s.before.items() if g is not None}
        want = {"gmt/energy_kept": kept_share(list(pairs.values()))}
        for layer in dict.fromkeys(LAYER[n] for n in pairs):
            want[f"gmt/layer/{layer}/energy_kept"] = kept_share([p for n, p in pairs.items() if LAYER[n] == layer])
        out.append((s.stats.to_log_dict(per_layer=True), want, s.stats, set(pairs)))
    return out


@pytest.mark.parametrize(("strategy", "scope", "config"), CASES, ids=lambda c: c if isinstance(c, str) else ",".join(c) or "-")
def test_logged_energy_kept_equals_the_sums_of_the_saved_gradients(engine, strategy, scope, config):
    for step, (logs, want, stats, with_grad) in enumerate(run(strategy, scope, **config)):
        for key, value in want.items():
            assert key in logs, f"step {step}: {key} not logged"
            assert math.isclose(logs[key], value, rel_tol=1e-12), f"step {step}: {key} = {logs[key]}, expected {value}"
        assert 0 < logs["gmt/energy_kept"] <= 1
        for t in stats.tensors:  # a tensor frozen before the forward pass has no gradient, and no sums
            assert (t.energy is None) == (t.name not in with_grad), t.name
    if strategy == "lisa":  # lisa freezes layers: its frozen tensors are left out, the rest are kept whole
        frozen = [t for t in stats.tensors if t.energy is None]
        assert frozen and logs["gmt/energy_kept"] == 1.0
    if strategy == "gmt":  # the smallest 30% of |g| carry little of the norm
        assert logs["gmt/energy_kept"] > 0.9


def test_without_track_energy_nothing_is_summed_or_logged():
    model, cfg = tracked_model("gmt", "tensor")
    masker = GradientMasker(model, cfg)
    ids, y = batch(0)
    nn.functional.mse_loss(model(ids), y).backward()
    stats = masker.apply()
    assert all(t.energy is None and t.kept_energy is None for t in stats.tensors)
    assert stats.energy_kept is None
    assert not any("energy" in key for key in stats.to_log_dict(per_layer=True))


def test_energy_kept_of_zero_gradients_and_of_tensors_without_sums():
    zero = TensorStats("a.w", 4, 2, 0, None, energy=0.0, kept_energy=0.0)
    assert MaskStats(0, "gmt", "tensor", [zero]).energy_kept == 1.0
    half = TensorStats("b.w", 4, 2, 0, None, energy=4.0, kept_energy=1.0)
    frozen = TensorStats("c.w", 4, 4, 0, None)
    stats = MaskStats(0, "gmt", "tensor", [zero, half, frozen])
    assert stats.energy_kept == 0.25 and half.energy_kept == 0.25 and frozen.energy_kept is None
    logs = stats.to_log_dict(per_layer=True)
    assert logs["gmt/energy_kept"] == 0.25 and logs["gmt/layer/b/energy_kept"] == 0.25 and "gmt/layer/c/energy_kept" not in logs
    assert half == TensorStats("b.w", 4, 2, 0, None)  # float sums are not part of equality


def test_track_energy_is_checked_by_name():
    with pytest.raises(ValueError, match="track_energy must be True or False, got 'yes'"):
        GMTConfig(track_energy="yes")


# --- through the Trainer --------------------------------------------------------------------------


def test_trainer_log_history_holds_the_energy_kept_averaged_over_the_window(tmp_path):
    """A tiny Llama under SFTTrainer, logging every second step: the gradients are saved before and
    after GMT masks them at every step, and each logged share is the mean of its window's steps."""
    pytest.importorskip("trl")
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from gmt_plugins import GMTCallback
    from gmt_plugins.coverage import layer_of
    from tiny import cpu_args, text_dataset, tiny_llama, tiny_tokenizer

    class SaveGradients(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, torch.Tensor]] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    model = tiny_llama()
    config = SFTConfig(output_dir=str(tmp_path), **cpu_args(
        max_steps=4, logging_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=32,
        learning_rate=1e-2, lr_scheduler_type="constant",
    ))
    gmt, before, after = GMTCallback(mask_ratio=0.3, log_layers=True, track_energy=True), SaveGradients(), SaveGradients()
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=text_dataset(), processing_class=tiny_tokenizer(), callbacks=[gmt, after],
        optimizers=(torch.optim.SGD(model.parameters(), lr=1e-2), None),
    )
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(callbacks.index(gmt), before)  # before GMTCallback: the clipped gradient it masks
    trainer.train()
    logged = [e for e in trainer.state.log_history if "gmt/masked_fraction" in e]
    assert len(logged) == 2 and len(before.steps) == len(after.steps) == 4
    per_step = []
    for b, a in zip(before.steps, after.steps):
        pairs = {n: (square_sum(b[n]), square_sum(a[n])) for n in b}
        want = {"gmt/energy_kept": kept_share(list(pairs.values()))}
        for layer in dict.fromkeys(layer_of(n) for n in pairs):
            want[f"gmt/layer/{layer}/energy_kept"] = kept_share([p for n, p in pairs.items() if layer_of(n) == layer])
        per_step.append(want)
    for window, entry in enumerate(logged):
        steps = per_step[2 * window : 2 * window + 2]
        for key in steps[0]:
            assert math.isclose(entry[key], sum(s[key] for s in steps) / 2, rel_tol=1e-9), (window, key)
        assert 0.5 < entry["gmt/energy_kept"] < 1


def test_avx2_and_portable_sums_agree_bit_for_bit(tmp_path):
    """``GMT_PLUGINS_NO_AVX2_SCAN=1`` makes the kernel sum fp32 and bf16 squares with the portable loop
    instead of the AVX2 one: in fresh processes both give the same sums to the last bit (with NaN/inf
    in a block and without, whole tensors and masked ones), and the same masks."""
    from fresh_process import outputs_with_and_without_avx2

    body = (
        "import hashlib, torch\n"
        "from gmt_plugins.engine import dispatch\n"
        "from gmt_plugins.engine.cpu import rank as cpu_rank\n"
        "from gmt_plugins.engine.keys import MagnitudeKeys\n"
        "from gmt_plugins.engine.types import Cut, Energy\n"
        "from test_energy_kept import awkward\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for n in (15, 16, 4097, 70_001):\n"
        "        for clean in (False, True):\n"
        "            flat = awkward(n, dtype, seed=n)\n"
        "            if clean:\n"
        "                flat = torch.nan_to_num(flat, 0.0, 0.0, 0.0)\n"
        "            source = MagnitudeKeys([dtype])\n"
        "            ranking = dispatch.rank(source, [(0, flat)], 0.3)\n"
        "            masked, whole = Energy(), Energy()\n"
        "            dispatch.apply(source, 0, flat.clone(), Cut(None), energy=whole)\n"
        "            dispatch.apply(source, 0, flat, ranking.cut, ranking=ranking, energy=masked)\n"
        "            sums = [masked.total.hex(), masked.kept.hex(), whole.total.hex()]\n"
        "            print(dtype, n, clean, sums, hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest())\n"
        "print('avx2', cpu_rank.avx2_scan(dispatch.kernel()))\n"
    )
    with_avx2, portable = outputs_with_and_without_avx2(tmp_path, body)
    assert portable[-1] == "avx2 False" and len(with_avx2) == 17
    assert with_avx2[:-1] == portable[:-1]
