"""The fast engine against the slow reference twin: shapes, dtypes, ratios, ties, NaN/inf, scopes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.engine.keys import RandomKeys, stable_salt
from reference import reference_apply, reference_masks

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True, params=["native", "torch"])
def engine(request, monkeypatch):
    """Every test here runs twice: histograms from the compiled kernel (required, so a build failure
    fails the test) and from the pure-torch passes, its twin."""
    monkeypatch.setenv("GMT_PLUGINS_NATIVE", "1" if request.param == "native" else "0")
    return request.param
RATIOS = [0.0, 1e-3, 0.5, 0.99]
SMALL_CHUNK = 1024  # forces several chunks per tensor


def make_params(shapes, dtype, *, kind="normal", seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if kind == "normal":
            g = torch.randn(shape, generator=gen) * (10.0 ** (i % 3 - 1))
        elif kind == "zeros":
            g = torch.zeros(shape)
        elif kind == "ties":
            g = torch.randint(-3, 4, shape, generator=gen).float() * 0.5
        else:
            raise ValueError(kind)
        p.grad = g.to(dtype)
        params.append((f"layer{i}.weight", p))
    return params


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_engine(params, **config):
    grads = [None if p.grad is None else p.grad.clone() for _, p in params]
    masker = GradientMasker(params, GMTConfig(chunk_numel=SMALL_CHUNK, **config))
    stats = masker.apply()
    return grads, [p.grad for _, p in params], stats


def assert_matches_reference(params, ratio, scope):
    before, after, stats = run_engine(params, mask_ratio=ratio, scope=scope)
    masks = reference_masks(before, ratio, scope)
    expected = reference_apply(before, masks)
    for (name, _), got, want, mask, t in zip(params, after, expected, masks, stats.tensors):
        # bitwise, so NaN compares equal to itself and -0.0 differs from +0.0
        assert torch.equal(bits(got), bits(want)), name
        assert t.masked == int(mask.sum())
    assert stats.masked == sum(int(m.sum()) for m in masks)
    return stats


SHAPES = [[(3000,)], [(64, 50), (17,), (1, 1), (40, 70, 2)], [(0,), (2500,)]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("shapes", SHAPES, ids=["one", "mixed", "with_empty"])
def test_gmt_matches_reference(dtype, ratio, scope, shapes):
    assert_matches_reference(make_params(shapes, dtype), ratio, scope)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["zeros", "ties"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_all_zero_and_heavy_ties(dtype, kind, scope):
    stats = assert_matches_reference(make_params([(2048,), (3, 700)], dtype, kind=kind), 0.5, scope)
    if scope == "tensor":
        assert [t.masked for t in stats.tensors] == [1024, 1050]


def test_exact_count_per_tensor_is_floor():
    params = make_params([(1001,), (7,), (333, 3)], torch.float32)
    _, _, stats = run_engine(params, mask_ratio=0.37)
    assert [t.masked for t in stats.tensors] == [math.floor(0.37 * n) for n in (1001, 7, 999)]


def test_global_scope_mixed_dtypes_matches_reference():
    params = make_params([(1500,)], torch.float32) + make_params([(1200,)], torch.bfloat16, seed=1)
    params += make_params([(900,)], torch.float16, seed=2)
    params = [(f"p{i}", p) for i, (_, p) in enumerate(params)]
    assert_matches_reference(params, 0.4, "global")


def test_global_threshold_is_one_value():
    params = make_params([(2000,), (2000,)], torch.float32)
    _, after, stats = run_engine(params, mask_ratio=0.5, scope="global")
    # layer1 gradients are 10x larger than layer0's: the global threshold masks far more of layer0
    assert stats.tensors[0].masked > stats.tensors[1].masked
    assert len({t.threshold for t in stats.tensors}) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_nonfinite_never_ranked_nor_hidden(dtype, scope):
    params = make_params([(3000,), (1000,)], dtype)
    grad = params[0][1].grad
    grad[5], grad[17], grad[2999] = float("nan"), float("inf"), float("-inf")
    stats = assert_matches_reference(params, 0.5, scope)
    assert stats.nonfinite == 3
    assert stats.tensors[0].nonfinite == 3
    g = params[0][1].grad
    assert torch.isnan(g[5]) and g[17] == float("inf") and g[2999] == float("-inf")
    # the threshold was taken over finite entries only
    assert all(math.isfinite(t) for t in stats.thresholds())
    if scope == "tensor":
        assert stats.tensors[0].masked == math.floor(0.5 * 2997)


def test_grad_none_is_reported_not_an_error():
    params = make_params([(100,), (100,)], torch.float32)
    params[1][1].grad = None
    _, _, stats = run_engine(params, mask_ratio=0.5)
    assert stats.without_grad == ["layer1.weight"]
    assert stats.masked == 50


def test_no_gradients_at_all():
    params = make_params([(100,)], torch.float32)
    params[0][1].grad = None
    _, _, stats = run_engine(params, mask_ratio=0.5, scope="global")
    assert stats.masked == 0 and stats.total == 0 and stats.fraction == 0.0


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=4),
    ratio=st.floats(0.0, 0.999),
    scope=st.sampled_from(["tensor", "global"]),
    dtype=st.sampled_from(DTYPES),
    levels=st.integers(1, 1000),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(sizes, ratio, scope, dtype, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, n in enumerate(sizes):
        p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
        # few distinct levels -> many ties; many levels -> few
        p.grad = (torch.randint(-levels, levels + 1, (n,), generator=gen).float() / levels).to(dtype)
        params.append((f"t{i}", p))
    assert_matches_reference(params, ratio, scope)


# --- random strategy -------------------------------------------------------------------------


def random_params(shapes=((3000,), (50, 40))):
    return make_params(list(shapes), torch.float32)


def test_random_exact_count_and_reproducible():
    a = random_params()
    b = random_params()
    _, after_a, stats = run_engine(a, strategy="random", mask_ratio=0.3, mask_seed=7)
    _, after_b, _ = run_engine(b, strategy="random", mask_ratio=0.3, mask_seed=7)
    assert [t.masked for t in stats.tensors] == [900, 600]
    for x, y in zip(after_a, after_b):
        assert torch.equal(x, y)


def test_random_depends_on_seed_and_step():
    params = random_params()
    masker = GradientMasker(params, strategy="random", mask_ratio=0.5, mask_seed=1)
    grads = [p.grad.clone() for _, p in params]
    masker.apply()
    first = [p.grad == 0 for _, p in params]
    for (_, p), g in zip(params, grads):
        p.grad = g.clone()
    masker.apply()
    second = [p.grad == 0 for _, p in params]
    assert not torch.equal(first[0], second[0])
    other = random_params()
    GradientMasker(other, strategy="random", mask_ratio=0.5, mask_seed=2).apply()
    assert not torch.equal(first[0], other[0][1].grad == 0)


def test_random_matches_reference_on_its_keys():
    params = random_params()
    before = [p.grad.clone() for _, p in params]
    config = GMTConfig(strategy="random", mask_ratio=0.3, mask_seed=3, chunk_numel=SMALL_CHUNK)
    GradientMasker(params, config).apply()
    for (name, p), g in zip(params, before):
        keys = RandomKeys([stable_salt(3, 0, name)]).keys(0, g.view(-1), 0)  # whole tensor, one chunk
        mask = reference_masks([g], 0.3, "tensor", scores=[keys.double().reshape(g.shape)])[0]
        assert torch.equal(p.grad, reference_apply([g], [mask])[0])


def test_random_is_roughly_uniform():
    hits = torch.zeros(1000)
    for step in range(200):
        p = torch.nn.Parameter(torch.zeros(1000))
        p.grad = torch.ones(1000)
        masker = GradientMasker([("w", p)], strategy="random", mask_ratio=0.5)
        masker.step = step
        masker.apply()
        hits += (p.grad == 0).float()
    # each entry masked with probability 1/2 over 200 draws: mean 100, sd ~7
    assert hits.sum() == 200 * 500
    assert 60 < hits.min() and hits.max() < 140


def test_random_keys_independent_of_chunking_and_device_free():
    g = torch.randn(5000)
    src = RandomKeys([stable_salt(0, 0, "w")])
    whole = src.keys(0, g, 0)
    parts = torch.cat([src.keys(0, g[s : s + 777], s) for s in range(0, 5000, 777)])
    assert torch.equal(whole, parts)
    assert int(whole.min()) >= 0 and int(whole.max()) < 2**31


# --- the fast apply path against its generic twin ---------------------------------------------


class GenericOnly:
    """The same keys without the fast path, so apply_cut_counted takes the generic branch."""

    def __init__(self, inner):
        self.inner, self.key_bits, self.cap = inner, inner.key_bits, inner.cap

    def keys(self, index, chunk, start):
        return self.inner.keys(index, chunk, start)


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], [torch.float64], [torch.bfloat16, torch.float32, torch.float16]], ids=str)
def test_fast_apply_equals_generic_apply(dtypes):
    from gmt_plugins.engine.keys import MagnitudeKeys
    from gmt_plugins.engine.dispatch import apply as apply_cut_counted, rank

    gen = torch.Generator().manual_seed(1)
    flats = [(torch.randn(5000, generator=gen) * 3).to(dt) for dt in dtypes]
    flats[0][7] = float("nan")
    source = MagnitudeKeys(dtypes)
    assert source.exact_magnitude
    cut, _ = rank(source, list(enumerate(flats)), 0.37, chunk_numel=SMALL_CHUNK)
    if dtypes == [torch.float32]:
        assert cut.ties == 0  # no ties: every chunk takes the fast path (with ties, the chunks after the budget do)
    for i, flat in enumerate(flats):
        fast, slow = flat.clone(), flat.clone()
        n_fast, _, _ = apply_cut_counted(source, i, fast, cut, chunk_numel=SMALL_CHUNK)
        n_slow, _, _ = apply_cut_counted(GenericOnly(source), i, slow, cut, chunk_numel=SMALL_CHUNK)
        assert n_fast == n_slow and torch.equal(bits(fast), bits(slow))


def test_subclass_overriding_keys_loses_the_fast_path():
    from gmt_plugins.engine.keys import MagnitudeKeys

    class Reversed(MagnitudeKeys):
        def keys(self, index, chunk, start):
            return self.cap - 1 - super().keys(index, chunk, start)

    assert not Reversed([torch.float32]).exact_magnitude


def test_strict_record_equals_reference_mask():
    params = make_params([(3000,), (40, 50)], torch.float32)
    before = [p.grad.clone() for _, p in params]
    masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, strict=True, chunk_numel=SMALL_CHUNK))
    masker.apply()
    for (name, p), mask, (flat, held_mask, _, _) in zip(params, reference_masks(before, 0.3, "tensor"), masker._guard._held):
        assert torch.equal(held_mask, mask.view(-1)), name


@pytest.mark.parametrize("key_bits_dtype", [torch.float32, torch.float64], ids=str)
def test_refine_histogram_gather_branch_equals_clamp_branch(key_bits_dtype):
    """The CUDA branch (gather the bucket) and the CPU branch (offset + clamp) are twins."""
    from gmt_plugins.engine.keys import MagnitudeKeys
    from gmt_plugins.engine.reference import _histogram
    from gmt_plugins.engine.types import DIGIT_BITS

    gen = torch.Generator().manual_seed(3)
    flats = [(0, torch.randn(7000, generator=gen).to(key_bits_dtype)), (1, torch.randn(3000, generator=gen).to(key_bits_dtype))]
    source = MagnitudeKeys([key_bits_dtype])
    top_shift = source.key_bits - DIGIT_BITS
    top = _histogram(source, flats, shift=top_shift, base=None, chunk_numel=SMALL_CHUNK)
    bucket = int(top.argmax())
    shift = top_shift - DIGIT_BITS
    base = bucket << (shift + DIGIT_BITS)
    clamp = _histogram(source, flats, shift=shift, base=base, chunk_numel=SMALL_CHUNK, gather=False)
    gather = _histogram(source, flats, shift=shift, base=base, chunk_numel=SMALL_CHUNK, gather=True)
    assert torch.equal(clamp, gather) and int(clamp.sum()) == int(top[bucket])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_branchless_count_equals_count_nonzero(dtype):
    """The apply pass counts with bit tricks; torch.count_nonzero is its twin (±0, NaN, ±inf, subnormals)."""
    from gmt_plugins.engine.keys import count_nonzero_bits

    gen = torch.Generator().manual_seed(5)
    x = torch.nn.functional.hardshrink(torch.randn(4099, generator=gen), 0.7).to(dtype)
    tiny = torch.finfo(dtype).tiny
    x[:8] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), tiny / 2, -tiny / 4, -1.0]).to(dtype)
    assert int(count_nonzero_bits(x)) == int(torch.count_nonzero(x)) > 0
    assert int(count_nonzero_bits(torch.zeros(10, dtype=dtype).neg())) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_strict_holds_exactly_the_reference_entries(dtype, kind, scope):
    """Strict mode's record (fast path or tie breaking), copy-out and write-back, on every dtype:
    after an SGD step, the reference's masked entries are bit-identical and all others moved."""
    params = make_params([(2048,), (3, 700), (5,)], dtype, kind=kind, seed=4)
    for _, p in params:
        p.data.copy_(torch.linspace(-1, 1, p.numel()).view(p.shape).to(dtype) + 3)
    start = [p.detach().clone() for _, p in params]
    before = [p.grad.clone() for _, p in params]
    masker = GradientMasker(params, GMTConfig(mask_ratio=0.4, scope=scope, strict=True, chunk_numel=SMALL_CHUNK))
    stats = masker.apply()
    torch.optim.SGD([p for _, p in params], lr=0.5, weight_decay=0.1).step()
    assert masker.restore_masked() == stats.masked == sum(int(m.sum()) for m in reference_masks(before, 0.4, scope))
    for (name, p), p0, mask in zip(params, start, reference_masks(before, 0.4, scope)):
        assert torch.equal(bits(p.detach()[mask]), bits(p0[mask])), name
        assert not torch.equal(p.detach()[~mask], p0[~mask]), name  # weight decay moves the rest


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("nan", [False, True])
def test_tensor_scope_ranks_each_tensor_right_before_masking_it(ties, nan, monkeypatch):
    """gmt in the tensor scope defers each tensor's ranking to the masker's turn for it (rank t0, mask
    t0, rank t1, ...: the gradient is still in cache), with the masks and statistics of the reference.
    Only when the masker will put a strategy's state back after planning (a step with NaN/inf, for a
    strategy with state) does it rank every tensor first, and the masks are the same."""
    from gmt_plugins.engine import dispatch

    events = []
    real_rank, real_apply = dispatch.rank, dispatch.apply
    monkeypatch.setattr(dispatch, "rank", lambda source, flats, *a, **k: events.append(("rank", flats[0][1].numel())) or real_rank(source, flats, *a, **k))
    monkeypatch.setattr(dispatch, "apply", lambda s, i, flat, *a, **k: events.append(("mask", flat.numel())) or real_apply(s, i, flat, *a, **k))
    shapes = [(30, 7), (17,), (5, 5, 2), (1000,)]
    gen = torch.Generator().manual_seed(3)
    grads = [(torch.randint(-3, 4, s, generator=gen).float() * 0.5 if ties else torch.randn(s, generator=gen)) for s in shapes]
    grads[0].view(-1)[:2] = torch.tensor([float("nan") if nan else 1.0, -0.0])
    masks = reference_masks(grads, 0.3, "tensor")
    want = reference_apply(grads, masks)
    sizes = (210, 17, 50, 1000)

    def run(stateful: bool):
        params = [(f"p{i}", torch.nn.Parameter(torch.zeros(s))) for i, s in enumerate(shapes)]
        for (_, p), g in zip(params, grads):
            p.grad = g.clone()
        masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope="tensor"))
        if stateful:  # a state of its own: the masker keeps a copy on a NaN/inf step and puts it back after planning
            state = {"calls": torch.zeros(1)}
            masker.strategy.load_state_dict = lambda held: state.update(held)
            monkeypatch.setattr(type(masker.strategy), "state_dict", lambda self: state)
        events.clear()
        stats = masker.apply()
        for (_, p), w in zip(params, want):
            assert torch.equal(p.grad.view(torch.int32), w.view(torch.int32))
        assert [t.masked for t in stats.tensors] == [int(m.sum()) for m in masks]
        assert [t.nonfinite for t in stats.tensors] == [int(nan), 0, 0, 0]
        assert masker.strategy.deferrable is False  # only while the masker plans
        return list(events)

    interleaved = [(kind, n) for n in sizes for kind in ("rank", "mask")]
    assert run(stateful=False) == interleaved
    ranked_first = [("rank", n) for n in sizes] + [("mask", n) for n in sizes]
    assert run(stateful=True) == (ranked_first if nan else interleaved)
