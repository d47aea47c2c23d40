"""Stored masks read as packed bits (StoredMask, gmt_pack_mask_bits, gmt_apply_mask_bits, the kept
flag of KIND_MASK) and gradient sums in one C pass (gmt_accumulate_finite_f32), each against its
twin: the byte kernel, the torch keys (kernel off) and torch's nan_to_num/square_/add_."""

from __future__ import annotations

import gc

import pytest
import torch

from gmt_plugins.engine import dispatch, reference
from gmt_plugins.engine.cpu import rank as cpu_rank
from gmt_plugins.engine.dispatch import apply as apply_cut_counted, rank
from gmt_plugins.engine.types import Cut
from gmt_plugins.strategies import _masks
from gmt_plugins.engine.keys import MaskKeys, StoredMask
from gmt_plugins.engine.reference import accumulate_finite as reference_accumulate_finite
from gmt_plugins.strategies._masks import accumulate_finite, stored_mask
from test_native import awkward

SIZES = [0, 1, 63, 64, 65, 4095, 4096, 4097, 4096 * 3 + 130]

needs_kernel = pytest.mark.skipif(dispatch.kernel() is None, reason="the compiled kernel does not build here")


def kept_set(n: int, share: float, seed: int) -> torch.Tensor:
    """A kept set with runs of kept and of masked entries, so whole 64-entry words and 4096-entry
    blocks with no masked entry occur next to mixed ones."""
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(n, generator=gen) < share
    if n > 8192:
        kept[4096:8192] = True  # a block of the bits kernel (and its words) with nothing masked
        kept[8192 : 8192 + 128] = False  # and two words with everything masked
    return kept


@needs_kernel
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("invert", [False, True])
def test_pack_mask_bits_equals_its_twin(n, invert):
    mask = kept_set(n, 0.3, seed=n)
    bits = cpu_rank.pack_mask_bits(dispatch.kernel(), mask, invert=invert)
    assert torch.equal(bits, reference.pack_mask_bits(mask, invert=invert))
    # read back entry by entry: bit i % 64 of word i // 64, nothing set past the end
    unpacked = [(int(bits[i // 64]) >> (i % 64)) & 1 for i in range((n + 63) // 64 * 64)]
    expected = ((~mask) if invert else mask).tolist() + [False] * ((n + 63) // 64 * 64 - n)
    assert unpacked == [int(b) for b in expected]


@needs_kernel
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("record", [False, True])
def test_apply_mask_bits_equals_the_byte_kernel_and_zeroes_exactly_the_masked_finite_entries(n, record):
    lib = dispatch.kernel()
    grad = awkward(max(n, 9), torch.float32, seed=n)[:n].contiguous()  # NaN, inf, -0.0, ties
    kept = kept_set(n, 0.3, seed=n + 1)
    masked = ~kept
    bits = cpu_rank.pack_mask_bits(lib, kept, invert=True)
    fast, slow = grad.clone(), grad.clone()
    rec_fast = torch.ones(n, dtype=torch.bool) if record else None  # every byte must be written
    rec_slow = torch.zeros(n, dtype=torch.bool) if record else None
    got = cpu_rank.apply_mask_bits(lib, fast, bits, rec_fast)
    want = cpu_rank.apply(lib, slow, cpu_rank.NativeKeys(cpu_rank.KIND_MASK, mask=masked), 1, 0, rec_slow)
    assert got == want
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    # against the definition: masked finite entries become +0.0, everything else keeps its bits
    hit = masked & torch.isfinite(grad)
    expected = torch.where(hit, torch.zeros_like(grad), grad)
    assert torch.equal(fast.view(torch.int32), expected.view(torch.int32))
    assert got == (int(hit.sum()), 0, int((hit & (grad != 0)).sum()))
    if record:
        assert torch.equal(rec_fast, hit) and torch.equal(rec_slow, hit)


@needs_kernel
@pytest.mark.parametrize("record", [False, True])
def test_kept_flag_and_bits_equal_the_torch_keys(monkeypatch, record):
    """A StoredMask through the kernel (bits at threshold 1; the kept-flag byte kernel for other cuts
    and for ranking) against the same source with the kernel off."""
    n = 4096 * 2 + 77
    flats = [awkward(n, torch.float32, seed=s) for s in range(3)]
    kepts = [kept_set(n, share, seed=10 + s) for s, share in enumerate((0.2, 0.9, 0.5))]
    stored = [stored_mask(k) for k in kepts]
    masks = [stored[0], True, stored[1], False, stored[2]]
    grads = [flats[0], flats[1], flats[1], flats[2], flats[2]]
    source = MaskKeys(masks)
    assert cpu_rank.describe(source, 0, grads[0]).bits is not None and cpu_rank.describe(source, 0, grads[0]).kept
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(dispatch.ENV, mode)
        out = []
        for i, grad in enumerate(grads):
            for cut in (Cut(1), Cut(1, 5), Cut(2), Cut(0, 7)):  # the stored-mask step, then the byte kernel
                y = grad.clone()
                rec = torch.zeros(n, dtype=torch.bool) if record else None
                applied = apply_cut_counted(source, i, y, cut, chunk_numel=1000, record=rec)
                out.append((y.view(torch.int32), applied, rec))
        out.append(rank(source, list(enumerate(grads)), 0.5))
        results[mode] = out
    for a, b in zip(results["1"][:-1], results["0"][:-1]):
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert not record or torch.equal(a[2], b[2])
    assert results["1"][-1] == results["0"][-1]
    # the stored-mask step zeroed exactly the finite entries outside the kept set
    y = grads[0].clone()
    monkeypatch.setenv(dispatch.ENV, "1")
    apply_cut_counted(source, 0, y, Cut(1))
    hit = ~kepts[0] & torch.isfinite(grads[0])
    assert torch.equal(y.view(torch.int32), torch.where(hit, 0.0, grads[0]).view(torch.int32))


def test_stored_mask_packs_once_per_set_and_again_after_an_in_place_change():
    if dispatch.kernel() is None:
        pytest.skip("the compiled kernel does not build here: nothing is packed")
    kept = kept_set(1000, 0.5, seed=0).view(10, 100)
    first, again = stored_mask(kept), stored_mask(kept)
    assert isinstance(first, StoredMask) and first.bits is again.bits  # cached, not packed again
    assert torch.equal(first.kept, kept.view(-1))
    kept[0, 0] = not bool(kept[0, 0])  # in place: the version moves, the bits are rebuilt
    changed = stored_mask(kept)
    assert changed.bits is not first.bits
    assert torch.equal(changed.bits, reference.pack_mask_bits(kept.view(-1), invert=True))
    key = id(kept)
    del kept, first, again, changed
    gc.collect()
    assert key not in dispatch._PACKED  # the cache does not keep a freed set alive


def test_stored_mask_of_an_inference_tensor_is_packed_every_time():
    with torch.inference_mode():
        kept = kept_set(200, 0.5, seed=3)  # no version counter: an in-place change could not be seen
    first, again = stored_mask(kept), stored_mask(kept)
    assert id(kept) not in dispatch._PACKED
    assert torch.equal(first.kept, kept) and (first.bits is None or first.bits is not again.bits)


def test_stored_mask_without_the_kernel_has_no_bits(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "0")
    kept = kept_set(300, 0.5, seed=1)
    stored = stored_mask(kept)
    assert stored.bits is None
    grad = awkward(300, torch.float32, seed=2)
    y = grad.clone()
    applied = apply_cut_counted(MaskKeys([stored]), 0, y, Cut(1))
    hit = ~kept & torch.isfinite(grad)
    assert applied.masked == int(hit.sum())
    assert torch.equal(y.view(torch.int32), torch.where(hit, 0.0, grad).view(torch.int32))


def test_mask_plan_refuses_a_stored_mask_of_another_size():
    from gmt_plugins.strategies.base import GradEntry

    param = torch.nn.Parameter(torch.zeros(10))
    entry = GradEntry(0, "w", param, torch.zeros(10))
    with pytest.raises(ValueError, match="stored mask of 'w' has 9 entries"):
        _masks.mask_plan([entry], [stored_mask(torch.ones(9, dtype=torch.bool))], 1000)


# --- gradient sums ----------------------------------------------------------------------------


@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("n", [0, 1, 15, 4096 + 3])
def test_accumulate_finite_equals_its_torch_twin_bit_for_bit(monkeypatch, square, n):
    grads = [awkward(max(n, 9), torch.float32, seed=s)[:n].contiguous() for s in range(3)]
    grads[1][: min(n, 4)] = -0.0  # -0.0 + -0.0 stays -0.0, -0.0 + NaN's +0.0 becomes +0.0
    originals = [g.clone() for g in grads]
    sums = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(dispatch.ENV, mode)
        acc = None
        for g in grads:
            acc = accumulate_finite(acc, g, square=square)
        sums[mode] = acc
    twin = None
    for g in grads:
        twin = reference_accumulate_finite(twin, g, square=square)
    assert torch.equal(sums["1"].view(torch.int32), twin.view(torch.int32))
    assert torch.equal(sums["0"].view(torch.int32), twin.view(torch.int32))
    for g, o in zip(grads, originals):  # the gradients are read, never written
        assert torch.equal(g.view(torch.int32), o.view(torch.int32))
    # against the definition, in float64 (exact here for the finite small sums only: spot-check signs)
    finite = [torch.where(torch.isfinite(g), g, 0.0) for g in grads]
    expected = sum((f * f if square else f) for f in finite) if n else torch.zeros(0)
    assert torch.allclose(twin.double(), expected.double(), rtol=1e-5, atol=0.0)


def test_accumulate_finite_updates_in_place_and_takes_other_dtypes_through_the_twin():
    acc = torch.zeros(100)
    grad = awkward(100, torch.float32, seed=5)
    out = accumulate_finite(acc, grad)
    assert out is acc and torch.equal(acc, torch.where(torch.isfinite(grad), grad, 0.0))
    half = awkward(100, torch.bfloat16, seed=6)
    sum_bf16 = accumulate_finite(None, half)
    assert sum_bf16.dtype == torch.float32
    assert torch.equal(sum_bf16, torch.nan_to_num(half.float(), nan=0.0, posinf=0.0, neginf=0.0))


@needs_kernel
def test_accumulate_finite_f32_refuses_mismatched_tensors():
    with pytest.raises(ValueError, match="contiguous CPU float32 tensors of one size"):
        cpu_rank.accumulate_finite_f32(dispatch.kernel(), torch.zeros(4), torch.zeros(5), first=False, square=False)
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        cpu_rank.accumulate_finite_f32(dispatch.kernel(), torch.zeros(4, dtype=torch.float64), torch.zeros(4), first=True, square=False)


# --- the strategies, kernel on against kernel off -----------------------------------------------

STORED = ["sift", "spt", "lift", "sara", "dsee", "spiel", "lt_sft"]


def strategy_run(monkeypatch, strategy: str, mode: str, scope: str):
    """Eight steps with NaN/inf in some gradients (one step's state must not move), weights moving;
    per step the gradients after masking (bits) and the masked counts, then the final state."""
    from test_strategies_common import CONFIG, OPTIONS, SPARSE_OPTIONS, grads_for, make_model, masker_for

    monkeypatch.setenv(dispatch.ENV, mode)
    params = make_model()
    options = {**OPTIONS, **SPARSE_OPTIONS, "spiel": {"density": 0.3, "update_interval": 3, "drop_fraction": 0.5}}[strategy]
    masker = masker_for(params, strategy, options, **{**CONFIG, "scope": scope})
    steps = []
    for step in range(8):
        grads = grads_for(params, step)
        if step in (2, 5):
            for g in grads[::2]:
                g.view(-1)[1], g.view(-1)[-2] = float("nan"), float("-inf")
        grads[0].view(-1)[:3] = -0.0
        for (_, p), g in zip(params, grads):
            p.grad = g.clone()
        stats = masker.apply()
        steps.append(([p.grad.view(torch.int32).clone() for _, p in params], stats.masked, stats.nonfinite,
                      [t.masked_nonzero for t in stats.tensors]))
        with torch.no_grad():
            for _, p in params:
                p -= 0.1 * torch.nan_to_num(p.grad)
    return steps, masker.strategy.state_dict()


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    return a == b


@needs_kernel
@pytest.mark.parametrize(("strategy", "scope"), [(s, "tensor") for s in STORED] + [("sift", "global"), ("lift", "global")])
def test_strategies_mask_and_accumulate_alike_with_the_kernel_on_and_off(monkeypatch, strategy, scope):
    fast, fast_state = strategy_run(monkeypatch, strategy, "1", scope)
    slow, slow_state = strategy_run(monkeypatch, strategy, "0", scope)
    for (g1, m1, n1, z1), (g2, m2, n2, z2) in zip(fast, slow):
        assert (m1, n1, z1) == (m2, n2, z2)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))  # gradients bit for bit, NaN/inf kept
    assert any(m for _, m, _, _ in fast)
    assert same_state(fast_state, slow_state)


# --- selection into masks in C: mark, top_count_over (spiel's drop and regrow, dsee, lt_sft) -------


@needs_kernel
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.999])
def test_mark_in_c_equals_the_torch_loop_with_ties_shared_in_order(monkeypatch, ratio):
    from gmt_plugins.engine.keys import MagnitudeKeys
    from gmt_plugins.engine.keys import ScoreKeys
    from gmt_plugins.strategies._masks import mark

    flats = [awkward(n, torch.float32, seed=n) for n in (3000, 17, 5000)]
    for f in flats[::2]:
        f[100:117] = 0.5  # ties at the boundary, across flats
    sources = [MagnitudeKeys([torch.float32] * 3), ScoreKeys.from_tensors([f.abs() for f in flats])]
    for source in sources:
        pairs = list(enumerate(flats))
        monkeypatch.setenv(dispatch.ENV, "0")
        cut, _ = rank(source, pairs, ratio, chunk_numel=1000)
        slow = mark(source, pairs, cut, 1000)
        monkeypatch.setenv(dispatch.ENV, "1")
        assert dispatch._described(source, pairs) is not None  # the C marks below
        before = [f.clone() for f in flats]
        fast = mark(source, pairs, cut, 1000)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(flats, before))  # nothing modified
        assert sum(int(m.sum()) for m in fast) == int(ratio * sum(int(torch.isfinite(f).sum()) for f in flats))


@needs_kernel
@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("with_excluded", [False, True])
def test_top_count_over_in_c_equals_the_torch_passes_and_the_sorting_reference(monkeypatch, largest, with_excluded):
    from gmt_plugins.engine.dispatch import score_keys as key_scores
    from gmt_plugins.strategies._sparse import reference_top_count, top_count, top_count_over

    scores = [awkward(n, torch.float32, seed=n + 3) for n in (2000, 9, 700)]
    scores[0][50:90] = -0.5  # ties (the sign is ignored)
    gen = torch.Generator().manual_seed(4)
    excluded = [torch.rand(s.numel(), generator=gen) < 0.3 for s in scores] if with_excluded else None
    assert key_scores(scores, largest=largest, excluded=excluded) is not None
    for k in (0, 1, 37, 1500, 10_000):
        monkeypatch.setenv(dispatch.ENV, "1")
        fast = top_count_over(scores, k, 256, largest=largest, excluded=excluded)
        monkeypatch.setenv(dispatch.ENV, "0")
        assert key_scores(scores, largest=largest, excluded=excluded) is None
        slow = top_count_over(scores, k, 256, largest=largest, excluded=excluded)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow)), k
    # one tensor against the stable sort
    monkeypatch.setenv(dispatch.ENV, "1")
    for k in (0, 5, 400, 5000):
        flag = None if excluded is None else excluded[0]
        got = top_count(scores[0], k, 256, largest=largest, excluded=flag)
        assert torch.equal(got, reference_top_count(scores[0], k, largest=largest, excluded=flag)), k


@needs_kernel
@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("with_excluded", [False, True])
def test_key_scores_in_c_equal_their_torch_twin_bit_for_bit(largest, with_excluded):
    from gmt_plugins.engine.dispatch import score_keys as key_scores
    from gmt_plugins.engine.reference import key_scores as reference_key_scores

    score = awkward(4099, torch.float32, seed=11)
    score[:4] = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, float("-nan"), -0.0])
    excluded = (torch.arange(4099) % 3 == 0) if with_excluded else None
    (fast,) = key_scores([score], largest=largest, excluded=None if excluded is None else [excluded])
    slow = reference_key_scores(score, excluded, largest=largest)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    cap = ~torch.isfinite(score) | (excluded if excluded is not None else False)
    assert torch.equal(torch.isinf(fast), cap)  # exactly the unrankable entries get the excluded key
