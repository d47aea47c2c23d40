"""The compiled histogram kernel against its twin, the pure-torch passes, and how it is chosen (how it is
built, cached and loaded: test_kernel_cache.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.engine.cpu import loader
from gmt_plugins.engine.cpu import histogram as cpu_histogram
from gmt_plugins.engine.cpu import moves as cpu_moves
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.keys import MagnitudeKeys, RandomKeys
from gmt_plugins.engine.dispatch import rank
from gmt_plugins.engine.reference import _histogram
from gmt_plugins.engine.types import NUM_BINS
from reference import reference_apply, reference_masks

SUPPORTED = [(torch.float32, 32), (torch.bfloat16, 32), (torch.bfloat16, 16), (torch.float16, 16)]


def awkward(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values over several scales plus ±0, ±inf, NaN, subnormals and exact ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 3, (n,), generator=gen)
    x[torch.randint(0, n, (n // 10,), generator=gen)] = 0.5
    tiny = torch.finfo(dtype).tiny
    x[:9] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), tiny / 2, -tiny, 1.0, -1.0])
    return x.to(dtype)


def kernel_histogram(flat: torch.Tensor, key_bits: int, base: int, shift: int) -> torch.Tensor:
    hist = torch.zeros(cpu_histogram.HIST_BINS, dtype=torch.int64)
    cpu_histogram.add_histogram(dispatch.kernel(), flat, key_bits, base, shift, hist)
    return hist


def torch_histogram(flat: torch.Tensor, key_bits: int, base: int, shift: int) -> torch.Tensor:
    """The C loop written out in torch: below, the 65,536 digits, above."""
    keys = MagnitudeKeys([flat.dtype] if key_bits == 16 else [torch.float32]).keys(0, flat, 0).long()
    digits = (keys - base) >> shift
    inside = (keys >= base) & (digits < NUM_BINS)
    hist = torch.zeros(cpu_histogram.HIST_BINS, dtype=torch.int64)
    hist[1 : NUM_BINS + 1] = torch.bincount(digits[inside], minlength=NUM_BINS)
    hist[0] = int((keys < base).sum())
    hist[NUM_BINS + 1] = int((~inside & (keys >= base)).sum())
    return hist


@pytest.fixture(autouse=True)
def require_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "1")


@pytest.mark.parametrize("dtype,key_bits", SUPPORTED, ids=str)
def test_kernel_equals_torch_for_any_base_and_shift(dtype, key_bits):
    flat = awkward(20_000, dtype, seed=key_bits)
    gen = torch.Generator().manual_seed(7)
    shifts = [0] if key_bits == 16 else [0, 3, 16]
    for shift in shifts:
        for base in [0, 1, *torch.randint(0, 1 << key_bits, (6,), generator=gen, dtype=torch.int64).tolist(), (1 << key_bits) - 1]:
            assert torch.equal(kernel_histogram(flat, key_bits, base, shift), torch_histogram(flat, key_bits, base, shift)), (base, shift)


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], [torch.bfloat16, torch.float32, torch.float16]], ids=str)
def test_engine_passes_equal_with_and_without_kernel(dtypes):
    """Top pass and refine pass, through _histogram, on a group mixing dtypes (fp16 widened to
    32 bits is not in the kernel: that flat takes the torch passes inside the same call)."""
    source = MagnitudeKeys(dtypes)
    flats = [(i, awkward(5000 + 777 * i, dt, seed=i)) for i, dt in enumerate(dtypes)]
    top_shift = source.key_bits - 16
    found = {}
    for use_native in (True, False):
        kernel = dispatch.histogram_kernel(source, flats) if use_native else None
        assert (kernel is not None) == use_native
        nonfinite: list[int] = []
        top = _histogram(source, flats, shift=top_shift, base=None, chunk_numel=1000, nonfinite=nonfinite, kernel=kernel)
        found[use_native] = [top, nonfinite]
        if top_shift:
            bucket = int(top[: source.cap >> top_shift].argmax())
            found[use_native].append(_histogram(source, flats, shift=0, base=bucket << 16, chunk_numel=1000, kernel=kernel))
    assert found[True][1] == found[False][1] == [3] * len(dtypes)  # inf, -inf and NaN in each
    assert all(torch.equal(a, b) for a, b in zip(found[True][::2], found[False][::2]))
    assert len(found[True]) == 2 or torch.equal(found[True][2], found[False][2])


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_with_kernel_match_reference(scope, dtype):
    gen = torch.Generator().manual_seed(11)
    params = []
    for i, shape in enumerate([(300, 70), (17,), (5000,)]):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 10.0 ** (i - 1)).to(dtype)
        params.append((f"w{i}", p))
    before = [p.grad.clone() for _, p in params]
    GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope)).apply()
    for (_, p), want in zip(params, reference_apply(before, reference_masks(before, 0.3, scope))):
        assert torch.equal(p.grad, want)


def test_kernel_is_not_used_for_other_keys_or_devices():
    flat = torch.randn(100)
    assert not cpu_histogram.supports(flat[::2], 32)  # not contiguous
    assert not cpu_histogram.supports(flat.double(), 64)
    assert not cpu_histogram.supports(flat.half(), 32)
    assert dispatch.histogram_kernel(RandomKeys([1]), [(0, flat)]) is None  # only magnitude keys
    assert dispatch.histogram_kernel(MagnitudeKeys([torch.float64]), [(0, flat.double())]) is None
    with pytest.raises(ValueError, match="kernel cannot histogram"):
        cpu_histogram.add_histogram(dispatch.kernel(), flat, 32, 0, 17, torch.zeros(cpu_histogram.HIST_BINS, dtype=torch.int64))
    with pytest.raises(ValueError, match="hist must be"):
        cpu_histogram.add_histogram(dispatch.kernel(), flat, 32, 0, 16, torch.zeros(NUM_BINS, dtype=torch.int64))


def test_invalid_mode_names_the_variable_and_the_values(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "yes")
    with pytest.raises(ValueError, match=r"GMT_PLUGINS_NATIVE='yes' is not valid; allowed values: auto, 0, 1"):
        rank(MagnitudeKeys([torch.float32]), [(0, torch.randn(10))], 0.5)


def test_missing_compiler_required_raises_auto_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/gmt-cc")
    with pytest.raises(loader.NativeUnavailable, match="no C compiler found"):
        dispatch.kernel()
    monkeypatch.setenv(dispatch.ENV, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a group the kernel cannot serve (fp64) never asks for it
        _histogram(MagnitudeKeys([torch.float64]), [(0, torch.randn(100, dtype=torch.float64))], shift=48, base=None, chunk_numel=64)
    flat = torch.randn(3000)
    want = reference_apply([flat.clone()], reference_masks([flat.clone()], 0.25, "tensor"))[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p = torch.nn.Parameter(torch.zeros(3000))
            p.grad = flat.clone()
            GradientMasker([("w", p)], mask_ratio=0.25).apply()
            assert torch.equal(p.grad, want)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-torch" in messages[0] and "GMT_PLUGINS_NATIVE=0" in messages[0]
    monkeypatch.setenv(dispatch.ENV, "0")
    assert dispatch.kernel() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_masked_moves_equal_boolean_indexing(dtype):
    flat = awkward(9999, dtype, seed=3)
    gen = torch.Generator().manual_seed(9)
    mask = torch.rand(9999, generator=gen) < 0.3
    lib = dispatch.kernel()
    saved = cpu_moves.gather_masked(lib, flat, mask, int(mask.sum()))
    assert torch.equal(saved[:-1].view(torch.uint8), flat[mask].view(torch.uint8))  # bits, so NaN and -0.0 count
    moved = torch.zeros_like(flat)
    cpu_moves.scatter_masked(lib, moved, mask, saved)
    expected = torch.zeros_like(flat)
    expected[mask] = flat[mask]
    assert torch.equal(moved.view(torch.uint8), expected.view(torch.uint8))


def test_masked_moves_refuse_a_wrong_count_without_overrunning():
    flat, mask = torch.arange(100, dtype=torch.float32), torch.zeros(100, dtype=torch.bool)
    mask[::3] = True
    lib = dispatch.kernel()
    with pytest.raises(RuntimeError, match="mask holds 34 entries, expected 10"):
        cpu_moves.gather_masked(lib, flat, mask, 10)
    saved = cpu_moves.gather_masked(lib, flat, mask, 34)
    mask[1] = True
    with pytest.raises(RuntimeError, match="mask holds 35 entries, 34 were saved"):
        cpu_moves.scatter_masked(lib, flat.clone(), mask, saved)
    with pytest.raises(ValueError, match="mask must be"):
        cpu_moves.gather_masked(lib, flat, mask[:50], 1)
    assert not cpu_moves.supports_moves(flat[::2])
