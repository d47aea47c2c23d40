"""The device path of ``gmt`` (:mod:`gmt_plugins.engine.cuda`), run on CPU tensors.

It is what CUDA gradients take; here ``dispatch.DEVICE_MODE = "always"`` forces it on CPU. Its masks are
compared bit for bit with :mod:`reference` (sorting Python lists), its statistics and plans with the
host backends (``DEVICE_MODE = "never"``: the CPU kernel or :mod:`gmt_plugins.engine.reference`), and its
host synchronisations are counted by a dispatch mode that records every operation which reads a device
tensor back on CUDA (a CPU proxy of ``torch.cuda.set_sync_debug_mode``, which only works with a GPU).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.engine import cuda
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.keys import MagnitudeKeys, RandomKeys
from gmt_plugins.strategies.base import MaskPlan
from reference import reference_apply, reference_masks

SHAPES = [(300, 70), (17,), (1, 1), (40, 70, 2), (0,), (2500,), (3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RATIOS = [0.0, 1e-3, 0.3, 0.99]


@pytest.fixture(autouse=True, params=["spread", "spill"])
def device_path(request, monkeypatch):
    """The device path on CPU, with chunks of 1,024 entries (carries across chunks) and groups of
    3 tensors in the tensor scope (several groups); a later digit's pass counts the keys outside its
    bucket both as on CUDA (spread over bins) and as on CPU (two spill bins)."""
    monkeypatch.setattr(dispatch, "DEVICE_MODE", "always")
    monkeypatch.setattr(cuda, "SPREAD_SPILLS", request.param == "spread")
    monkeypatch.setattr(cuda, "CHUNK_NUMEL", 1000)
    monkeypatch.setattr(cuda, "GROUP_ROWS", 3)


def make_params(dtypes, kind: str, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, (shape, dtype) in enumerate(zip(SHAPES, dtypes)):
        if kind == "ties":  # integer-valued: many entries share the threshold
            g = torch.randint(-3, 4, shape, generator=gen).float() * 0.5
        elif kind == "zeros":  # mostly ±0, the cut falls among them
            g = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.2)
            g.view(-1)[::3] = -0.0
        else:
            g = torch.randn(shape, generator=gen) * 10.0 ** (i % 3 - 1)
        if g.numel() > 10:
            g.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0, -float("inf")])
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = g.to(dtype)
        params.append((f"layer{i}.weight", p))
    return params


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run(params, mode: str, **config):
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(dispatch, "DEVICE_MODE", mode)
        masker = GradientMasker(params, GMTConfig(chunk_numel=1024, **config))
        return masker.apply()


def clone(params):
    out = []
    for name, p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append((name, q))
    return out


def check_against_reference(params, ratio: float, scope: str) -> None:
    before = [p.grad.clone() for _, p in params]
    host = clone(params)
    stats = run(params, "always", mask_ratio=ratio, scope=scope)
    host_stats = run(host, "never", mask_ratio=ratio, scope=scope)
    masks = reference_masks(before, ratio, scope)
    for (name, p), want, mask, g, t in zip(params, reference_apply(before, masks), masks, before, stats.tensors):
        assert torch.equal(bits(p.grad), bits(want)), name  # bitwise: NaN equals itself, -0.0 differs from +0.0
        assert t.masked == int(mask.sum()), name
        assert t.masked_nonzero == int((mask & (g != 0)).sum()), name
        assert t.nonfinite == int((~torch.isfinite(g)).sum()), name
    # thresholds and every count as the host path reports them
    assert stats.tensors == host_stats.tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_device_path_matches_reference_and_host_path(dtype, scope, kind, ratio):
    check_against_reference(make_params([dtype] * len(SHAPES), kind), ratio, scope)


MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_mixed_dtypes(scope, kind):
    """fp32, bf16 and fp16 interleaved: ranked together in 32-bit keys (global scope), or in groups
    of one key space each whose rows are not in tensor order (tensor scope)."""
    for ratio in (1e-3, 0.3, 0.99):
        check_against_reference(make_params(MIXED, kind, seed=3), ratio, scope)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True])
def test_ratio_one_masks_every_finite_entry(dtype, shared):
    """``GMTConfig`` refuses ``mask_ratio=1.0``; the engine itself masks every finite entry then."""
    params = make_params([dtype] * len(SHAPES), "ties")
    flats = [p.grad.view(-1) for _, p in params]
    before = [p.grad.clone() for _, p in params]
    if shared:
        sources = [MagnitudeKeys([f.dtype for f in flats])] * len(flats)
    else:
        sources = [MagnitudeKeys([f.dtype]) for f in flats]
    cuts = cuda.rank_on_device(sources, flats, 1.0, shared=shared, chunk_numel=1024)
    done = cuda.apply_on_device(cuts)
    masks = reference_masks(before, 1.0, "global" if shared else "tensor")
    for (_, p), want, mask, d in zip(params, reference_apply(before, masks), masks, done):
        assert torch.equal(bits(p.grad), bits(want))
        assert d.masked == int(mask.sum())


def test_signed_zeros_at_the_threshold():
    """A cut among ±0 (key 0) takes the first zeros in flat order, whatever their sign, and masked zeros
    count as masked but not as masked_nonzero."""
    g = torch.tensor([-0.0, 1.0, 0.0, -0.0, 2.0, 0.0, -3.0, -0.0] * 300)
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    check_against_reference([("w", p)], 0.3, "tensor")


def test_plan_reads_back_the_host_paths_plan(monkeypatch):
    """A plan ranked on the device (read back once) is the host path's plan: the same cuts (threshold
    key and ties), non-finite counts and shared tie budget."""
    for scope in ("tensor", "global"):
        for kind, dtypes in (("normal", MIXED), ("ties", MIXED), ("ties", [torch.float32] * len(SHAPES))):
            params = make_params(dtypes, kind)
            masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope))
            entries = masker._entries()[0]
            plan = masker.strategy.plan(entries, step=0)
            assert {p.ranking.backend for p in plan.tensors} == {"cuda"}
            with monkeypatch.context() as patch:
                patch.setattr(dispatch, "DEVICE_MODE", "never")
                host = masker.strategy.plan(entries, step=0)
            assert "cuda" not in {p.ranking.backend for p in host.tensors}
            got = [(p.local_index, p.cut, p.nonfinite) for p in plan.tensors]
            assert got == [(p.local_index, p.cut, p.nonfinite) for p in host.tensors]
            assert plan.shared_ties == host.shared_ties
            assert plan.threshold_values() == host.threshold_values()


def test_strict_mode_and_coverage_on_the_device_path():
    """Strict mode holds exactly the reference mask's entries through an optimizer step, and coverage
    counts are those of the host path."""
    params = make_params([torch.float32] * len(SHAPES), "ties")
    before = [p.grad.clone() for _, p in params]
    host = clone(params)
    config = dict(mask_ratio=0.3, scope="global", strict=True, track_coverage=True)
    device_masker = GradientMasker(params, GMTConfig(**config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "DEVICE_MODE", "never")
        host_stats = GradientMasker(host, GMTConfig(**config)).apply()
    stats = device_masker.apply()
    assert stats.tensors == host_stats.tensors
    assert stats.coverage is not None
    for _, p in params:
        p.data.add_(1.0)  # an optimizer step that moves every entry, masked ones too
    assert device_masker.restore_masked() == stats.masked
    for (name, p), mask in zip(params, reference_masks(before, 0.3, "global")):
        assert torch.equal(p.data, torch.where(mask, 0.0, 1.0)), name


def test_which_path_is_taken(monkeypatch):
    params = make_params([torch.float32] * 3, "normal")
    flats = [e.flat for e in GradientMasker(params, GMTConfig())._entries()[0]]
    sources = [MagnitudeKeys([f.dtype]) for f in flats]
    monkeypatch.setattr(dispatch, "DEVICE_MODE", "auto")
    assert not dispatch.serves_on_device(flats, sources, ratio=0.2, reducer=None)  # CPU tensors keep the compiled kernel
    monkeypatch.setattr(dispatch, "DEVICE_MODE", "always")
    assert dispatch.serves_on_device(flats, sources, ratio=0.2, reducer=None)
    assert not dispatch.serves_on_device(flats, sources, ratio=None, reducer=None)  # a count (ratio_of="nonzero")
    assert not dispatch.serves_on_device([], [], ratio=0.2, reducer=None)
    assert not dispatch.serves_on_device(flats, sources, ratio=0.2, reducer=object())  # sharded: histograms are all-reduced
    assert not dispatch.serves_on_device(flats, [RandomKeys([1])] * 3, ratio=0.2, reducer=None)
    monkeypatch.setattr(dispatch, "DEVICE_MODE", "never")
    assert not dispatch.serves_on_device(flats, sources, ratio=0.2, reducer=None)
    monkeypatch.setattr(dispatch, "DEVICE_MODE", "cuda")
    with pytest.raises(ValueError, match=r"dispatch.DEVICE_MODE must be one of \('auto', 'always', 'never'\)"):
        dispatch.serves_on_device(flats, sources, ratio=0.2, reducer=None)


def test_nonzero_ratio_keeps_the_host_path():
    params = make_params([torch.float32] * 3, "normal")
    masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, ratio_of="nonzero"))
    assert type(masker.strategy.plan(masker._entries()[0], step=0)) is MaskPlan


# --- host synchronisations ------------------------------------------------------------------------

# Operations that read a CUDA tensor back on the host (or wait for the device) before they return.
_SYNCING = {
    "aten._local_scalar_dense",  # .item(), int(), float(), bool()
    "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select", "aten.bincount", "aten.histc",
    "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
    "aten.lift_fresh",  # torch.tensor(host data): a blocking host-to-device copy on CUDA
}


class SyncCounter(TorchDispatchMode):
    """Records, in ``self.syncs``, every operation that would synchronise with a CUDA device: the ops
    above, boolean indexing (``index``/``index_put`` with a bool index run ``nonzero``),
    ``repeat_interleave`` without ``output_size``, copies between devices, and ``tolist``/``cpu``/
    ``numpy``/``item`` called from Python (patched by :meth:`patch`)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self._python_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def] # dispatch protocol
        kwargs = kwargs or {}
        if not self._python_depth and self._synchronises(func, args, kwargs):
            self.syncs.append(str(func))
        return func(*args, **kwargs)

    @staticmethod
    def _synchronises(func, args, kwargs) -> bool:  # type: ignore[no-untyped-def] # aten arguments
        name = str(func.overloadpacket)
        if name in _SYNCING:
            return True
        if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name == "aten.repeat_interleave":
            return kwargs.get("output_size") is None
        if name == "aten._to_copy":
            return "device" in kwargs and torch.device(kwargs["device"]) != args[0].device
        if name == "aten.copy_":
            return args[0].device != args[1].device
        return False

    @contextlib.contextmanager
    def patch(self):
        counter = self
        with pytest.MonkeyPatch.context() as patch:
            for method in ("tolist", "cpu", "numpy", "item"):
                original = getattr(torch.Tensor, method)

                def counted(tensor, *args, __original=original, __method=method, **kwargs):
                    counter.syncs.append(f"Tensor.{__method}")
                    counter._python_depth += 1
                    try:
                        return __original(tensor, *args, **kwargs)
                    finally:
                        counter._python_depth -= 1

                patch.setattr(torch.Tensor, method, counted)
            with self:
                yield self


def count_syncs(params, mode: str, scope: str, monkeypatch) -> list[str]:
    monkeypatch.setattr(dispatch, "DEVICE_MODE", mode)
    masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope, chunk_numel=1024))
    masker.apply()  # warm-up (caches, plugin manager)
    gen = torch.Generator().manual_seed(7)
    for _, p in params:
        p.grad.copy_(torch.randn(p.shape, generator=gen))
    with SyncCounter().patch() as counter:
        masker.apply()
    return counter.syncs


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_device_path_reads_back_once_per_step(scope, dtype, monkeypatch):
    params = make_params([dtype] * len(SHAPES), "normal")  # 7 tensors, several chunks and groups
    syncs = count_syncs(params, "always", scope, monkeypatch)
    assert syncs == ["Tensor.tolist"], syncs


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sync_counter_sees_the_host_paths_reads(scope, monkeypatch):
    """The counter can fail: the host path's torch passes read back per tensor and per digit."""
    monkeypatch.setenv("GMT_PLUGINS_NATIVE", "0")
    params = make_params([torch.bfloat16] * len(SHAPES), "normal")
    syncs = count_syncs(params, "never", scope, monkeypatch)
    assert len(syncs) > 2 * len(SHAPES), syncs
    assert "aten._local_scalar_dense.default" in syncs


def test_sync_counter_flags_boolean_indexing_and_cross_device_copies():
    x = torch.arange(10.0)
    with SyncCounter().patch() as counter:
        x[x > 3]
        x.nonzero()
        x.sum().item()
        x.tolist()
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert counter.syncs == [
        "aten.index.Tensor", "aten.nonzero.default", "Tensor.item", "Tensor.tolist",
        "aten.lift_fresh.default", "aten.repeat_interleave.Tensor",
    ]


KEY_SPACES = [[torch.bfloat16], [torch.float16], [torch.float32], [torch.float64], [torch.float32, torch.bfloat16]]


@pytest.mark.parametrize("dtypes", KEY_SPACES, ids=str)
def test_key_value_is_key_to_value(dtypes):
    """Thresholds are converted on the host from the key's bits (no tensor, no .item())."""
    source = MagnitudeKeys(dtypes)
    gen = torch.Generator().manual_seed(0)
    keys = [0, 1, source.cap - 1, source.cap] + torch.randint(0, source.cap, (200,), generator=gen).tolist()
    for key in keys:
        assert cuda.key_value(source, key) == source.key_to_value(0, key), key


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def] # dispatch protocol
        if not func.is_view:  # views launch nothing
            self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_operations_per_tensor_stay_few(scope, monkeypatch):
    """Every torch operation is a kernel launch on a GPU: the device path dispatches about 17 per
    small bf16 tensor (one chunk, one digit pass). A regression guard on the count, not a timing."""
    monkeypatch.setattr(cuda, "GROUP_ROWS", 64)  # the default: one group here

    def ops_for(n_tensors: int) -> int:
        params = []
        for i in range(n_tensors):
            p = torch.nn.Parameter(torch.zeros(100, dtype=torch.bfloat16))
            p.grad = torch.randn(100, generator=torch.Generator().manual_seed(i)).bfloat16()
            params.append((f"t{i}", p))
        masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope))
        masker.apply()
        with OpCounter() as counter:
            masker.apply()
        return counter.ops

    per_tensor = (ops_for(40) - ops_for(20)) / 20
    assert per_tensor <= 18, per_tensor
