"""The many-tensor kernel (one call per group, warm start, fused apply) against its twins: the
per-pass engine with the kernel off (torch passes) and, for whole masks, the sorting reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.cpu import rank as cpu_rank
from gmt_plugins.engine.keys import MagnitudeKeys, RandomKeys, stable_salt
from gmt_plugins.engine.dispatch import apply as apply_cut_counted, rank
from gmt_plugins.engine.types import Cut
from gmt_plugins.engine.keys import ScoreKeys
from fresh_process import outputs_with_and_without_avx2
from reference import reference_apply, reference_masks
from test_native import awkward

RATIOS = [0.0, 0.001, 0.2, 0.5, 0.999, 1.0]


def ranked_both_ways(monkeypatch, source, flats, **kwargs):
    """``rank`` through the group kernel and through the torch passes, its twin."""
    monkeypatch.setenv(dispatch.ENV, "1")
    fast = rank(source, flats, **kwargs)
    monkeypatch.setenv(dispatch.ENV, "0")
    slow = rank(source, flats, **{k: v for k, v in kwargs.items() if k != "warm"})
    return fast, slow


def ties_heavy(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Half the entries share one value: the boundary bin overflows the warm-start buffer."""
    x = awkward(n, dtype, seed)
    x[::2] = 0.25
    return x


GROUPS = {
    "f32": [torch.float32],
    "bf16_16bit": [torch.bfloat16],
    "fp16": [torch.float16],
    "f32_bf16": [torch.float32, torch.bfloat16],
    "bf16_pair": [torch.bfloat16, torch.bfloat16],
}


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("ratio", RATIOS)
def test_group_kernel_equals_torch_passes(monkeypatch, group, ratio):
    dtypes = GROUPS[group]
    source = MagnitudeKeys(dtypes)
    flats = [(i, awkward(3000 + 1234 * i, dt, seed=i + 3)) for i, dt in enumerate(dtypes)]
    fast, slow = ranked_both_ways(monkeypatch, source, flats, ratio=ratio)
    assert fast == slow


@pytest.mark.parametrize("make", [awkward, ties_heavy], ids=["awkward", "ties_heavy"])
@pytest.mark.parametrize("n", [2000, 300_000], ids=["one_table", "four_tables"])
def test_warm_start_gives_the_same_cut_whatever_the_hint(monkeypatch, make, n):
    source = MagnitudeKeys([torch.float32])
    flats = [(0, make(n, torch.float32, seed=5))]
    _, slow = ranked_both_ways(monkeypatch, source, flats, ratio=0.3)
    monkeypatch.setenv(dispatch.ENV, "1")
    warm: dict[str, int] = {}
    first = rank(source, flats, 0.3, warm=warm, group="g")
    assert first == slow and "g" in warm
    right = warm["g"]
    for hint in [right, right - 1, right + 1, right + 5, 0, 0x7FFF]:
        assert rank(source, flats, 0.3, warm={"g": hint}, group="g") == slow, hint


def test_warm_start_skips_the_second_pass_and_overflow_falls_back():
    lib = dispatch.kernel()
    keys = [cpu_rank.NativeKeys(cpu_rank.KIND_F32)]
    x = awkward(300_000, torch.float32, seed=1)
    # a hint far from the boundary: the window misses, the histogram passes run
    cold = cpu_rank.rank_group(lib, [x], keys, key_bits=32, cap=0x7F80_0000, ratio=0.3, k=None, hint=0x7000)
    warm = cpu_rank.rank_group(lib, [x], keys, key_bits=32, cap=0x7F80_0000, ratio=0.3, k=None, hint=cold.boundary)
    assert cold.second_pass and not warm.second_pass
    assert (cold.threshold, cold.ties) == (warm.threshold, warm.ties)
    y = torch.full((300_000,), 0.25)
    y[:1000] = awkward(1000, torch.float32, seed=2)  # the boundary bin holds far more than the buffer
    cold = cpu_rank.rank_group(lib, [y], keys, key_bits=32, cap=0x7F80_0000, ratio=0.3, k=None)
    again = cpu_rank.rank_group(lib, [y], keys, key_bits=32, cap=0x7F80_0000, ratio=0.3, k=None, hint=cold.boundary)
    assert again.second_pass and (again.threshold, again.ties) == (cold.threshold, cold.ties)


def scaled_rows(n: int, seed: int) -> torch.Tensor:
    """A weight-gradient-like tensor: rows of 64 whose scales differ by up to 1000x, a few NaN and inf,
    zeros, and runs of equal values; a strided sample of it is biased unless it is stratified."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x *= torch.logspace(-3, 0, 64).repeat(n // 64 + 1)[:n]
    x[::997] = float("nan")
    x[5::1999] = float("inf")
    x[100:5000] = 0.0
    x[7000:9000] = 1e-3
    return x


SAMPLED = {
    "awkward": lambda: [awkward(300_000, torch.float32, seed=4)],
    "ties_heavy": lambda: [ties_heavy(200_000, torch.float32, seed=6)],
    "rows": lambda: [scaled_rows(500_000, seed=7)],
    "zeros": lambda: [torch.cat([torch.zeros(150_000), awkward(50_000, torch.float32, seed=8)])],
    "global": lambda: [scaled_rows(70_000, 1), torch.tensor([0.5, -0.0, float("nan")]), torch.empty(0), ties_heavy(90_000, torch.float32, seed=3)],
}


@pytest.mark.parametrize("case", sorted(SAMPLED))
@pytest.mark.parametrize("ratio", RATIOS)
def test_sampled_window_equals_torch_passes(monkeypatch, case, ratio):
    """Groups of 65,536 fp32 entries or more, with no hint: the kernel samples a window (where its
    AVX2 scan serves) and must give the torch passes' cut, whatever the data do to the sample."""
    flats = [(i, f) for i, f in enumerate(SAMPLED[case]())]
    source = MagnitudeKeys([torch.float32] * len(flats))
    fast, slow = ranked_both_ways(monkeypatch, source, flats, ratio=ratio)
    assert fast == slow
    for k in (1, 12_345, 10**9):
        fast, slow = ranked_both_ways(monkeypatch, source, flats, k=k)
        assert fast == slow, k


def test_sampled_window_skips_the_second_pass_on_smooth_gradients():
    lib = dispatch.kernel()
    keys = [cpu_rank.NativeKeys(cpu_rank.KIND_F32)]
    x = scaled_rows(400_000, seed=9)
    result = cpu_rank.rank_group(lib, [x], keys, key_bits=32, cap=0x7F80_0000, ratio=0.2, k=None)
    if cpu_rank.avx2_scan(lib):
        assert not result.second_pass
    y = torch.full((400_000,), 0.25)  # one top digit holds every key: the sample declines the window
    y[:1000] = awkward(1000, torch.float32, seed=2)
    assert cpu_rank.rank_group(lib, [y], keys, key_bits=32, cap=0x7F80_0000, ratio=0.3, k=None).second_pass


def test_portable_scan_equals_the_avx2_scan(tmp_path):
    """``GMT_PLUGINS_NO_AVX2_SCAN=1`` (read when the kernel loads) makes fp32 windows take the
    portable scan: in a fresh process, both scans give every hinted window's cut."""
    from pathlib import Path

    import gmt_plugins

    root = Path(gmt_plugins.__file__).resolve().parents[1]  # this checkout, not an installed copy
    script = tmp_path / "scan.py"
    script.write_text(
        "import torch, sys\n"
        "from gmt_plugins.engine import dispatch\nfrom gmt_plugins.engine.cpu import rank as cpu_rank\n"
        f"sys.path.insert(0, {str(root / 'tests')!r})\n"
        "from test_native_group import scaled_rows, ties_heavy\n"
        "lib = dispatch.kernel()\n"
        "keys = [cpu_rank.NativeKeys(cpu_rank.KIND_F32)]\n"
        "for x in (scaled_rows(300_000, 3), ties_heavy(100_003, torch.float32, 4)):\n"
        "    for ratio in (0.001, 0.2, 0.7):\n"
        "        cold = cpu_rank.rank_group(lib, [x], keys, key_bits=32, cap=0x7F800000, ratio=ratio, k=None, hint=0x7000)\n"
        "        for hint in (cold.boundary, cold.boundary - 1, cold.boundary + 2):\n"
        "            r = cpu_rank.rank_group(lib, [x], keys, key_bits=32, cap=0x7F800000, ratio=ratio, k=None, hint=hint)\n"
        "            print(r.threshold, r.ties, r.rankable, r.nonfinite, r.second_pass)\n"
        "print('avx2', cpu_rank.avx2_scan(lib))\n"
    )
    outputs = outputs_with_and_without_avx2(tmp_path, script.read_text())
    assert outputs[1][-1] == "avx2 False"
    assert outputs[0][:-1] == outputs[1][:-1]


@pytest.mark.parametrize("k", [0, 1, 777, 2999, 10**9])
def test_group_kernel_takes_counts(monkeypatch, k):
    source = MagnitudeKeys([torch.float32])
    flats = [(0, awkward(3000, torch.float32, seed=2))]
    fast, slow = ranked_both_ways(monkeypatch, source, flats, k=k)
    assert fast == slow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("ratio", [0.001, 0.3, 0.999])
def test_random_keys_in_c_equal_the_torch_hash(monkeypatch, dtype, ratio):
    source = RandomKeys([stable_salt(0, 3, "a"), stable_salt(0, 3, "b")])
    flats = [(0, awkward(5000, dtype, seed=8)), (1, awkward(70_000, dtype, seed=9))]
    fast, slow = ranked_both_ways(monkeypatch, source, flats, ratio=ratio)
    assert fast == slow
    for index, flat in flats:
        fast_one, slow_one = ranked_both_ways(monkeypatch, source, [(index, flat)], ratio=ratio)
        assert fast_one == slow_one


def test_score_keys_in_c_equal_torch(monkeypatch):
    grads = [awkward(4000, torch.float32, seed=4), awkward(900, torch.float32, seed=6)]
    scores = [awkward(4000, torch.float32, seed=7), awkward(900, torch.float32, seed=10)]
    source = ScoreKeys.from_tensors(scores)
    assert cpu_rank.describe(source, 0, grads[0]) is not None
    assert cpu_rank.describe(ScoreKeys.from_tensors(scores, largest=True), 0, grads[0]) is None
    for flats in ([(0, grads[0]), (1, grads[1])], [(1, grads[1])]):
        for ratio in RATIOS:
            fast, slow = ranked_both_ways(monkeypatch, source, flats, ratio=ratio)
            assert fast == slow


SOURCES = {
    "f32": (lambda: MagnitudeKeys([torch.float32]), torch.float32),
    "bf16_wide": (lambda: MagnitudeKeys([torch.float32, torch.bfloat16]), torch.bfloat16),
    "fp16": (lambda: MagnitudeKeys([torch.float16]), torch.float16),
    "random_bf16": (lambda: RandomKeys([12345]), torch.bfloat16),
    "random_f32": (lambda: RandomKeys([12345]), torch.float32),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("record", [False, True])
def test_fused_apply_equals_the_chunked_apply(monkeypatch, name, record):
    make_source, dtype = SOURCES[name]
    source = make_source()
    flat = awkward(6000, dtype, seed=12)
    flat[9:] = (torch.randint(-3, 4, (6000 - 9,), generator=torch.Generator().manual_seed(1)) * 0.5).to(dtype)
    monkeypatch.setenv(dispatch.ENV, "0")
    cut, _ = rank(source, [(0, flat)], 0.4)
    assert cut.ties > 0 or name.startswith("random")  # the repeated values straddle the cut
    for c in [cut, Cut(cut.threshold, 0), Cut(cut.threshold, 10**9), Cut(0), Cut(None)]:
        results = {}
        for mode in ("1", "0"):
            monkeypatch.setenv(dispatch.ENV, mode)
            y = flat.clone()
            rec = torch.ones(y.numel(), dtype=torch.bool) if record else None
            counts = apply_cut_counted(source, 0, y, c, chunk_numel=1000, record=rec)
            results[mode] = (y, counts, rec)
        (y1, c1, r1), (y0, c0, r0) = results["1"], results["0"]
        assert torch.equal(y1.view(torch.uint8), y0.view(torch.uint8)) and c1 == c0, c
        assert not record or torch.equal(r1, r0)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("strategy", ["gmt", "random", "gmt_momentum"])
def test_strategies_on_the_group_kernel_equal_the_torch_engine(monkeypatch, scope, strategy):
    def run(mode):
        monkeypatch.setenv(dispatch.ENV, mode)
        gen = torch.Generator().manual_seed(3)
        params = []
        for i, shape in enumerate([(300, 70), (17,), (5000,), (600, 600)]):
            p = torch.nn.Parameter(torch.zeros(shape))
            params.append((f"w{i}", p))
        masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope, strategy=strategy))
        out = []
        for _ in range(3):  # later steps take the warm start
            for _, p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            stats = masker.apply()
            out.append(([p.grad.clone() for _, p in params], [t.masked for t in stats.tensors]))
        return out

    assert all(
        all(torch.equal(a, b) for a, b in zip(fa, fb)) and ma == mb for (fa, ma), (fb, mb) in zip(run("1"), run("0"))
    )


def test_gmt_with_group_kernel_matches_reference_with_ties(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "1")
    for scope in ("tensor", "global"):
        gen = torch.Generator().manual_seed(0)
        params = []
        for i, shape in enumerate([(400, 700), (33,), (4, 5)]):
            p = torch.nn.Parameter(torch.zeros(shape))
            p.grad = torch.randint(-3, 4, shape, generator=gen).float() * 0.5
            params.append((f"w{i}", p))
        before = [p.grad.clone() for _, p in params]
        GradientMasker(params, GMTConfig(mask_ratio=0.37, scope=scope)).apply()
        for (_, p), want in zip(params, reference_apply(before, reference_masks(before, 0.37, scope))):
            assert torch.equal(p.grad.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.37, 0.999])
def test_momentum_ema_in_c_equals_torch_bit_for_bit(monkeypatch, beta):
    from gmt_plugins.engine import reference

    lib = dispatch.kernel()
    fast, slow = torch.empty(3000), torch.empty(3000)
    for step in range(4):
        grad = awkward(3000, torch.float32, seed=step)  # NaN, inf, subnormals, ties
        cpu_rank.ema_f32(lib, fast, grad, beta, first=step == 0)
        reference.ema_update(slow, grad, beta, first=step == 0)
        assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


@pytest.mark.parametrize("record", [False, True])
def test_stored_masks_in_c_equal_torch(monkeypatch, record):
    from gmt_plugins.engine.keys import MaskKeys
    from gmt_plugins.strategies.base import count_nonfinite

    flats = [awkward(5000, torch.float32, seed=s) for s in range(3)]
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(5000, generator=gen) < 0.4, True, torch.zeros(5000, dtype=torch.bool)]
    source = MaskKeys(masks)
    assert cpu_rank.describe(source, 0, flats[0]) is not None and cpu_rank.describe(source, 1, flats[1]) is not None
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(dispatch.ENV, mode)
        out = []
        for i, flat in enumerate(flats):
            y = flat.clone()
            rec = torch.zeros(5000, dtype=torch.bool) if record else None
            counts = apply_cut_counted(source, i, y, Cut(1), chunk_numel=1000, record=rec)
            out.append((y.view(torch.int32), counts, rec, count_nonfinite(flat, 1000)))
        out.append(rank(source, [(i, f) for i, f in enumerate(flats)], 0.5))
        results[mode] = out
    for a, b in zip(results["1"][:-1], results["0"][:-1]):
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[3] == b[3]
        assert not record or torch.equal(a[2], b[2])
    assert results["1"][-1] == results["0"][-1]


# --- random keys hashed once, gmt_momentum's fused EMA ranking ----------------


def random_group(dtypes, sizes, seed=0):
    flats = [awkward(n, dt, seed=seed + i) for i, (dt, n) in enumerate(zip(dtypes, sizes))]
    source = RandomKeys([stable_salt(7, seed, f"w{i}") for i in range(len(flats))])
    return source, flats


def torch_cut_and_masks(monkeypatch, source, flats, *, ratio=None, k=None, record=False):
    """The twin: the torch passes rank, the chunked torch apply masks (shared ties in order)."""
    monkeypatch.setenv(dispatch.ENV, "0")
    cut, ranked = rank(source, list(enumerate(flats)), ratio, k=k, chunk_numel=1000)
    out, ties = [], cut.ties
    for i, flat in enumerate(flats):
        y = flat.clone()
        rec = torch.zeros(y.numel(), dtype=torch.bool) if record else None
        masked, used, _ = apply_cut_counted(source, i, y, Cut(cut.threshold, ties), chunk_numel=1000, record=rec)
        ties -= used
        out.append((y, masked, rec))
    return cut, ranked, out


def preselected_masks(lib, keys, flats, result, selection, record=False):
    out, ties = [], result.ties
    for i, flat in enumerate(flats):
        y = flat.clone()
        rec = torch.zeros(y.numel(), dtype=torch.bool) if record else None
        if result.threshold is None:
            out.append((y, 0, rec))
            continue
        member = dataclasses.replace(keys[i], selection=selection, member=i)
        masked, used, nonzero = cpu_rank.apply(lib, y, member, result.threshold, ties, rec)
        assert nonzero == int(((flat != 0) & (y == 0) & torch.isfinite(flat)).sum())
        ties -= used
        out.append((y, masked, rec))
    return out


def same_masks(a, b):
    return all(
        torch.equal(ya.view(torch.uint8), yb.view(torch.uint8)) and ma == mb and (ra is None or torch.equal(ra, rb))
        for (ya, ma, ra), (yb, mb, rb) in zip(a, b)
    )


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16, torch.float16, torch.float64, torch.float32]], ids=["one", "mixed"])
@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.3, 0.999, 1.0])
@pytest.mark.parametrize("record", [False, True])
def test_random_keys_hashed_once_equal_the_torch_hash(monkeypatch, dtypes, ratio, record):
    source, flats = random_group(dtypes, [70_001, 9, 129, 5000][: len(dtypes)])
    cut, ranked, want = torch_cut_and_masks(monkeypatch, source, flats, ratio=ratio, record=record)
    monkeypatch.setenv(dispatch.ENV, "1")
    lib = dispatch.kernel()
    keys = [cpu_rank.describe(source, i, f) for i, f in enumerate(flats)]
    result, selection = cpu_rank.random_rank_group(lib, flats, keys, ratio=ratio, k=None)
    assert (result.threshold, result.ties if result.threshold is not None else 0) == (cut.threshold, cut.ties)
    assert result.rankable == ranked.rankable and result.nonfinite == ranked.nonfinite
    assert same_masks(preselected_masks(lib, keys, flats, result, selection, record), want)


def test_random_keys_hashed_once_break_hash_collisions_in_position_order(monkeypatch):
    # 31-bit keys of 300,000 entries collide about 21 times: put the k-th key on a collision
    source, flats = random_group([torch.float32, torch.float32], [200_000, 100_000], seed=4)
    monkeypatch.setenv(dispatch.ENV, "0")
    keys_all = torch.cat([source.keys(i, f, 0) for i, f in enumerate(flats)])
    values, counts = torch.unique(keys_all[keys_all < source.cap], return_counts=True)
    assert (counts > 1).any(), "no collision in this draw"
    collided = int(values[counts > 1][len(values[counts > 1]) // 2])
    k = int((keys_all < collided).sum()) + 1  # takes the first of the equal keys only
    cut, _, want = torch_cut_and_masks(monkeypatch, source, flats, k=k)
    assert cut == Cut(collided, 1)
    monkeypatch.setenv(dispatch.ENV, "1")
    lib = dispatch.kernel()
    keys = [cpu_rank.describe(source, i, f) for i, f in enumerate(flats)]
    result, selection = cpu_rank.random_rank_group(lib, flats, keys, ratio=None, k=k)
    assert (result.threshold, result.ties) == (collided, 1)
    assert same_masks(preselected_masks(lib, keys, flats, result, selection), want)


def test_random_window_miss_falls_back_to_the_histograms(monkeypatch):
    source, flats = random_group([torch.float32], [50_000])
    monkeypatch.setenv(dispatch.ENV, "1")
    lib = dispatch.kernel()
    keys = [cpu_rank.describe(source, 0, flats[0])]
    monkeypatch.setattr(cpu_rank, "_window", lambda *a, **kw: (20000, 20001))  # far above the 30% key
    assert cpu_rank.random_rank_group(lib, flats, keys, ratio=0.3, k=None) is None
    # a cut outside a selection's window is not served from it
    result_window = cpu_rank.Preselection(torch.zeros(1, dtype=torch.int64), [0], torch.zeros(1, dtype=torch.int32),
                                             torch.zeros(1, dtype=torch.int64), [0, 0], 1 << 16, 2 << 16)
    assert not result_window.covers(5, 0) and result_window.covers(1 << 16, 3) and not result_window.covers(2 << 16, 1)


def masker_steps(monkeypatch, mode, strategy, scope, *, steps=4, grads=None, shapes=((300, 70), (17,), (5000,), (600, 600)),
                 state=None, start=0, strict=False):
    """Masks, counts and state of ``steps`` masker calls; step 2 holds a NaN and an inf."""
    monkeypatch.setenv(dispatch.ENV, mode)
    gen = torch.Generator().manual_seed(3)
    params = [(f"w{i}", torch.nn.Parameter(torch.zeros(shape))) for i, shape in enumerate(shapes)]
    masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope, strategy=strategy, mask_seed=11, strict=strict))
    if state is not None:
        masker.load_state_dict(state)
    out = []
    for step in range(start + steps):
        for i, (_, p) in enumerate(params):
            g = (grads or torch.randn)(p.shape, generator=gen) * (1e-3 * (1 + step))
            if step == 2 and i == 0:
                g.view(-1)[::97] = float("nan")
                g.view(-1)[5] = float("inf")
            p.grad = g
        if step < start:
            continue
        stats = masker.apply()
        out.append(([p.grad.clone() for _, p in params], [t.masked for t in stats.tensors]))
        if strict:
            masker.restore_masked()
    return out, masker


def rounded(shape, generator):
    """Gradients of few distinct values: long runs of equal keys and EMAs."""
    return torch.randint(-4, 5, shape, generator=generator).float()


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("strategy", ["random", "gmt_momentum"])
@pytest.mark.parametrize("grads", [None, rounded], ids=["normal", "ties"])
def test_fused_strategy_paths_equal_the_torch_engine(monkeypatch, scope, strategy, grads):
    calls = []
    for name in ("random_rank_group", "ema_rank_groups"):
        real = getattr(cpu_rank, name)
        monkeypatch.setattr(cpu_rank, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    fast, _ = masker_steps(monkeypatch, "1", strategy, scope, grads=grads)
    slow, _ = masker_steps(monkeypatch, "0", strategy, scope, grads=grads)
    # gmt_momentum ranks a step's groups in one call (ema_rank_groups), random one group a call
    assert calls and all(c == ("random_rank_group" if strategy == "random" else "ema_rank_groups") for c in calls)
    for (fa, ma), (fb, mb) in zip(fast, slow):
        assert ma == mb and all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(fa, fb))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("strategy", ["random", "gmt_momentum"])
def test_fused_strategy_paths_in_strict_mode_and_resumed(monkeypatch, scope, strategy):
    whole, masker = masker_steps(monkeypatch, "0", strategy, scope, strict=True)
    # the torch engine's run against the kernel's: the first two steps, then a resume from its state
    first, fast_masker = masker_steps(monkeypatch, "1", strategy, scope, steps=2, strict=True)
    state = fast_masker.state_dict()
    rest, _ = masker_steps(monkeypatch, "1", strategy, scope, steps=2, start=2, state=state, strict=True)
    for (fa, ma), (fb, mb) in zip(first + rest, whole):
        assert ma == mb and all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(fa, fb))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("strategy", ["random", "gmt_momentum"])
def test_fused_strategy_paths_fall_back_when_the_window_overflows(monkeypatch, scope, strategy):
    # a one-key buffer: groups miss (all but a 17-entry tensor's exact bin), after the EMAs were
    # updated; the histogram passes rank them
    misses = []
    for name in ("random_rank_group", "ema_rank_groups"):
        real = getattr(cpu_rank, name)

        def recorded(*a, _real=real, _name=name, **kw):
            out = _real(*a, **kw)
            if _name == "ema_rank_groups":  # one (result, selection) per group
                misses.extend(result is None for result, _ in out)
            else:
                misses.append(out is None or out[0] is None)
            return out

        monkeypatch.setattr(cpu_rank, name, recorded)
    monkeypatch.setattr(cpu_rank, "MAX_CANDIDATES", 1)
    fast, _ = masker_steps(monkeypatch, "1", strategy, scope)
    slow, _ = masker_steps(monkeypatch, "0", strategy, scope)
    assert sum(misses) >= len(misses) * 3 // 4
    for (fa, ma), (fb, mb) in zip(fast, slow):
        assert ma == mb and all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(fa, fb))


def rows_f32(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """scaled_rows with awkward's signature: scales that vary along rows of 64 defeat a strided sample."""
    return scaled_rows(n, seed)


# tensor sizes of the groups below: groups of 65,536 entries or more sample their keys, smaller ones count all
EMA_GROUPS = {
    "tensor_scope": ([300_000, 10, 5000, 70_001, 64], [1, 1, 1, 1, 1]),
    "global_scope": ([300_000, 10, 5000, 70_001, 64], [5]),
    "mixed": ([300_000, 10, 5000, 70_001, 64], [2, 1, 2]),
}


@pytest.mark.parametrize("layout", sorted(EMA_GROUPS))
@pytest.mark.parametrize("make", [awkward, rows_f32, ties_heavy], ids=["awkward", "rows", "ties_heavy"])
def test_ema_rank_groups_equals_the_torch_twin_group_by_group(monkeypatch, layout, make):
    """One call for many groups: every EMA bit for bit ema_f32's, and every group's cut, non-finite
    counts and masks (through the shared bits and window keys) the torch passes' on its own updated
    EMAs; a group whose window overflows (ties_heavy's 300k tensor) gives (None, None) while the
    groups after it still rank from the buffer it did not use."""
    monkeypatch.setenv(dispatch.ENV, "1")
    lib = dispatch.kernel()
    sizes, groups = EMA_GROUPS[layout]
    fused = [torch.empty(n) for n in sizes]
    twin = [torch.empty(n) for n in sizes]
    ends = [sum(groups[: g + 1]) for g in range(len(groups))]
    missed = 0
    for step, ratio in enumerate((0.5, 0.2, 0.001)):
        grads = [make(n, torch.float32, seed=10 * step + i) for i, n in enumerate(sizes)]
        out = cpu_rank.ema_rank_groups(lib, grads, fused, [step == 0] * len(sizes), groups, beta=0.8, ratio=ratio, k=None)
        assert len(out) == len(groups)
        for e, g in zip(twin, grads):
            cpu_rank.ema_f32(lib, e, g, 0.8, first=step == 0)
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(fused, twin))
        ranked_groups = 0
        for (result, selection), start, end in zip(out, [0, *ends[:-1]], ends):
            members = list(range(start, end))
            source = ScoreKeys.from_tensors([twin[i] for i in members])
            cut, ranked, want = torch_cut_and_masks(monkeypatch, source, [grads[i] for i in members], ratio=ratio, record=True)
            monkeypatch.setenv(dispatch.ENV, "1")
            if result is None:
                assert make is ties_heavy and selection is None and sum(sizes[i] for i in members) >= 65_536
                continue
            ranked_groups += 1
            assert (result.threshold, result.ties if result.threshold is not None else 0) == (cut.threshold, cut.ties)
            assert result.nonfinite == ranked.nonfinite and result.rankable == ranked.rankable
            keys = [cpu_rank.describe(ScoreKeys.from_tensors([fused[i] for i in members]), j, grads[i]) for j, i in enumerate(members)]
            assert same_masks(preselected_masks(lib, keys, [grads[i] for i in members], result, selection, record=True), want)
        missed += len(groups) - ranked_groups
        assert make is ties_heavy or ranked_groups == len(groups)
    # ties_heavy: at ratio 0.5 the 300k tensor's boundary value holds half its keys, more than the window buffer
    assert (missed > 0) == (make is ties_heavy)


@pytest.mark.parametrize("groups", [[], [2, 2], [0, 5], [6]])
def test_ema_rank_groups_refuses_groups_that_do_not_cover_the_tensors(groups):
    lib = dispatch.kernel()
    grads = [torch.randn(10) for _ in range(5)]
    with pytest.raises(ValueError, match="groups must be positive tensor counts adding up to 5"):
        cpu_rank.ema_rank_groups(lib, grads, [torch.empty(10) for _ in range(5)], [True] * 5, groups, beta=0.9, ratio=0.3, k=None)


def test_ema_rank_groups_selection_turns_stale_when_its_buffers_are_reused():
    """ema_rank_groups reuses one thread's buffers from call to call: a selection applied after a later
    call is refused instead of masking from the later call's bits."""
    lib = dispatch.kernel()
    grads = [scaled_rows(100_000, seed=1), scaled_rows(5000, seed=2)]
    emas = [torch.empty(g.numel()) for g in grads]
    (result, selection), _ = cpu_rank.ema_rank_groups(lib, grads, emas, [True, True], [1, 1], beta=0.9, ratio=0.3, k=None)
    keys = dataclasses.replace(cpu_rank.describe(ScoreKeys.from_tensors(emas), 0, grads[0]), selection=selection, member=0)
    y = grads[0].clone()
    cpu_rank.apply(lib, y, keys, result.threshold, result.ties, None)  # fresh: applies
    assert int((y == 0).sum()) > 0
    cpu_rank.ema_rank_groups(lib, grads, emas, [False, False], [1, 1], beta=0.9, ratio=0.3, k=None)
    with pytest.raises(RuntimeError, match="reused by a later ema_rank_groups call"):
        cpu_rank.apply(lib, grads[0].clone(), keys, result.threshold, result.ties, None)
