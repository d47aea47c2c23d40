"""id3's C growth step (gmt_plugins/engine/cpu/id3.py) against its torch twin (ScoreKeys chunks,
cut_for_count, mark): the same updatable sets, zeroed gradients and statistics at every step, over
growth and after it, with ties, non-finite gradients, several exponents and eps, warm windows that
hold the answer or miss it, and across a save/resume."""

from __future__ import annotations

import pytest
import torch

from gmt_plugins import GradientMasker
from gmt_plugins.engine.cpu import loader
from gmt_plugins.engine.cpu import histogram as cpu_histogram
from gmt_plugins.engine.cpu import moves as cpu_moves
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.cpu import id3 as cpu_id3
from fresh_process import outputs_with_and_without_avx2

SHAPES = {"embed": (300, 64), "norm": (64,), "proj": (96, 64), "odd": (37, 11)}
BIG = {"embed": (600, 500), "proj": (130, 77)}  # over 2**18 entries: the four-table histograms


def make_params(shapes: dict[str, tuple[int, ...]], kind: str, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in shapes.items():
        theta = torch.randn(shape, generator=gen) * 0.02
        if kind == "ties":  # few distinct |theta|: many equal scores
            theta = (theta * 200).round() / 200
        theta.view(-1)[:5] = 0.0  # the score divides by eps alone there
        out.append((name, torch.nn.Parameter(theta)))
    if kind == "nonfinite":
        with torch.no_grad():
            out[0][1].view(-1)[7] = float("inf")  # |g| / inf = 0
            out[0][1].view(-1)[8] = float("nan")  # NaN score ranks lowest
    return out


def make_grads(params, kind: str, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for _, p in params]
    if kind == "ties":
        grads = [(g * 2000).round() / 2000 for g in grads]
    if kind == "nonfinite" and step % 3 == 1:  # the masker keeps the state of such a step
        grads[0].view(-1)[3] = float("nan")
        grads[-1].view(-1)[-1] = float("-inf")
    if kind == "nonfinite" and step % 3 == 2:  # huge gradients: scores overflow to inf
        grads[0].view(-1)[11] = 3e38
    return grads


def run(monkeypatch, mode: str, params, options: dict, steps: int, kind: str, *, ratio: float = 0.3, calls: list | None = None):
    """Every step's updatable masks, zeroed gradients and statistics, with the kernel on (``"1"``) or off."""
    monkeypatch.setenv(dispatch.ENV, mode)
    if calls is not None:
        original = cpu_id3.grow

        def counted(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append(result)
            return result

        monkeypatch.setattr(cpu_id3, "grow", counted)
    masker = GradientMasker(params, strategy="id3", mask_ratio=ratio, strategy_options=options)
    return [observe(masker, params, make_grads(params, kind, step)) for step in range(steps)]


def observe(masker: GradientMasker, params, grads: list[torch.Tensor]):
    for (_, p), g in zip(params, grads):
        p.grad = g.clone()
    stats = masker.apply()
    updatable = {n: u.clone() for n, u in masker.strategy.updatable.items()}
    zeroed = [p.grad.clone() for _, p in params]
    return updatable, zeroed, [(t.name, t.masked, t.nonfinite) for t in stats.tensors], masker.strategy.growth_steps


def assert_same(fast, slow) -> None:
    assert len(fast) == len(slow)
    for step, ((fu, fz, fs, fg), (su, sz, ss, sg)) in enumerate(zip(fast, slow)):
        assert fu.keys() == su.keys(), step
        assert all(torch.equal(fu[n], su[n]) for n in fu), step
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(fz, sz)), step  # bit for bit
        assert fs == ss, step
        assert fg == sg, step


OPTIONS = {
    "default": {"steps_to_budget": 6},
    "exponent0_eps": {"steps_to_budget": 5, "exponent": 0.0, "eps": 0.05},
    "exponent2_eps": {"steps_to_budget": 4, "exponent": 2.0, "eps": 1e-2},
    "exponent3": {"steps_to_budget": 5, "exponent": 3.0, "eps": 3e-3},
    "one_step": {"steps_to_budget": 1},
    "many_steps": {"steps_to_budget": 40},
}


@pytest.mark.parametrize("kind", ["random", "ties", "nonfinite"])
@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_kernel_grows_exactly_as_the_torch_path(monkeypatch, options, kind):
    opts = OPTIONS[options]
    steps = min(opts["steps_to_budget"], 8) + 2  # growth, then the fixed mask
    calls: list = []
    fast = run(monkeypatch, "1", make_params(SHAPES, kind), opts, steps, kind, calls=calls)
    slow = run(monkeypatch, "0", make_params(SHAPES, kind), opts, steps, kind)
    assert_same(fast, slow)
    assert calls, "the kernel never ran"
    if opts["steps_to_budget"] >= 4:  # both ways to the threshold were compared
        assert any(c.warm for c in calls) and any(not c.warm for c in calls), [c.warm for c in calls]


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_kernel_with_four_histogram_tables(monkeypatch, kind):
    opts = {"steps_to_budget": 5, "eps": 2e-3}
    fast = run(monkeypatch, "1", make_params(BIG, kind), opts, 6, kind, ratio=0.2)
    slow = run(monkeypatch, "0", make_params(BIG, kind), opts, 6, kind, ratio=0.2)
    assert_same(fast, slow)


WINDOWS = {
    "far_above": lambda b: (0, 5),  # the k-th key lies above the window: histogram passes
    "far_below": lambda b: (0x7F00, 0x7F7F),  # more than k keys below it: the read stops early
    "one_digit": lambda b: (b[-1], b[-1]) if b else (-1, -2),
    "everything": lambda b: (0, 0x8000),
}


@pytest.mark.parametrize("window", sorted(WINDOWS))
def test_the_window_never_changes_the_result(monkeypatch, window):
    slow = run(monkeypatch, "0", make_params(SHAPES, "ties"), {"steps_to_budget": 6}, 7, "ties")
    monkeypatch.setattr(cpu_id3, "window", WINDOWS[window])
    fast = run(monkeypatch, "1", make_params(SHAPES, "ties"), {"steps_to_budget": 6}, 7, "ties")
    assert_same(fast, slow)


@pytest.mark.parametrize("limit", ["MAX_LIST", "MAX_CANDIDATES"])
def test_full_buffers_fall_back_to_the_passes(monkeypatch, limit):
    monkeypatch.setattr(cpu_id3, limit, 3)
    monkeypatch.setattr(cpu_id3, "_scratch", type(cpu_id3._scratch)())  # buffers sized afresh
    calls: list = []
    fast = run(monkeypatch, "1", make_params(SHAPES, "random"), {"steps_to_budget": 6}, 7, "random", calls=calls)
    slow = run(monkeypatch, "0", make_params(SHAPES, "random"), {"steps_to_budget": 6}, 7, "random")
    assert_same(fast, slow)
    assert calls and not any(c.warm for c in calls)


def test_running_counts_and_masks_follow_a_loaded_state(monkeypatch):
    """A resume in the middle of growth: the C path derives masks and counts again from the loaded
    ``updatable``, whichever path wrote it; the state keeps its format (``updatable``, ``growth_steps``)."""
    opts = {"steps_to_budget": 6}
    slow = run(monkeypatch, "0", make_params(SHAPES, "random"), opts, 7, "random")
    for first, second in (("1", "1"), ("0", "1"), ("1", "0")):
        params = make_params(SHAPES, "random")
        monkeypatch.setenv(dispatch.ENV, first)
        masker = GradientMasker(params, strategy="id3", mask_ratio=0.3, strategy_options=opts)
        before = [observe(masker, params, make_grads(params, "random", s)) for s in range(3)]
        state = masker.state_dict()
        assert set(state["strategy_state"]) == {"updatable", "growth_steps"}
        assert all(v.dtype == torch.bool for v in state["strategy_state"]["updatable"].values())
        state = {**state, "strategy_state": {**state["strategy_state"], "updatable": {n: t.clone() for n, t in state["strategy_state"]["updatable"].items()}}}
        monkeypatch.setenv(dispatch.ENV, second)
        resumed = GradientMasker(params, strategy="id3", mask_ratio=0.3, strategy_options=opts)
        resumed.load_state_dict(state)
        after = [observe(resumed, params, make_grads(params, "random", s)) for s in range(3, 7)]
        assert_same(before + after, slow)


def test_after_growth_the_stored_masks_are_reused_not_derived_again(monkeypatch):
    params = make_params(SHAPES, "random")
    calls: list = []
    run_steps = run(monkeypatch, "1", params, {"steps_to_budget": 2}, 2, "random", calls=calls)
    assert len(calls) == 2 and run_steps[-1][3] == 2
    masker = GradientMasker(params, strategy="id3", mask_ratio=0.3, strategy_options={"steps_to_budget": 2})
    for step in range(2):
        observe(masker, params, make_grads(params, "random", step))
    held = {n: d.masked for n, d in masker.strategy._derived.items()}
    for step in range(2, 5):
        observe(masker, params, make_grads(params, "random", step))
        assert all(masker.strategy._derived[n].masked is m for n, m in held.items())
        assert all(torch.equal(m, ~masker.strategy.updatable[n].view(-1)) for n, m in held.items())


@pytest.mark.parametrize("exponent", [0.5, 1.5])
def test_exponents_the_kernel_cannot_reproduce_take_the_torch_path(monkeypatch, exponent):
    calls: list = []
    opts = {"steps_to_budget": 3, "exponent": exponent}
    fast = run(monkeypatch, "1", make_params(SHAPES, "random"), opts, 4, "random", calls=calls)
    slow = run(monkeypatch, "0", make_params(SHAPES, "random"), opts, 4, "random")
    assert_same(fast, slow)
    assert calls == []


def test_bfloat16_parameters_take_the_torch_path(monkeypatch):
    params = [(n, torch.nn.Parameter(p.detach().to(torch.bfloat16))) for n, p in make_params(SHAPES, "random")]
    calls: list = []
    monkeypatch.setenv(dispatch.ENV, "1")
    monkeypatch.setattr(cpu_id3, "grow", lambda *a, **k: calls.append(1))
    masker = GradientMasker(params, strategy="id3", mask_ratio=0.3, strategy_options={"steps_to_budget": 2})
    for (_, p), g in zip(params, make_grads(params, "random", 0)):
        p.grad = g.to(torch.bfloat16)
    masker.apply()
    assert calls == [] and sum(int(u.sum()) for u in masker.strategy.updatable.values()) > 0


def test_grow_refuses_what_it_cannot_compute():
    lib = dispatch.kernel()
    if lib is None:
        pytest.skip("the C kernel does not build here")
    g, t = torch.zeros(8), torch.zeros(8)
    u, m = torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="exponent"):
        cpu_id3.grow(lib, [g], [t], [u], [m], eps=1e-3, exponent=1.5, k=1)
    with pytest.raises(ValueError, match="k must be positive"):
        cpu_id3.grow(lib, [g], [t], [u], [m], eps=1e-3, exponent=1.0, k=0)
    with pytest.raises(ValueError, match="float32"):
        cpu_id3.grow(lib, [g.double()], [t], [u], [m], eps=1e-3, exponent=1.0, k=1)
    with pytest.raises(ValueError, match="one size"):
        cpu_id3.grow(lib, [g], [t], [u[:4]], [m], eps=1e-3, exponent=1.0, k=1)


def test_grow_marks_the_best_scores_with_ties_in_order():
    """A hand-checked case: scores |g| / (eps + |theta|) over two tensors, one entry already updatable."""
    lib = dispatch.kernel()
    if lib is None:
        pytest.skip("the C kernel does not build here")
    g = [torch.tensor([1.0, 4.0, 2.0, float("nan")]), torch.tensor([4.0, 2.0, 2.0])]
    t = [torch.zeros(4), torch.tensor([1.0, 0.0, 0.0])]
    u = [torch.tensor([False, True, False, False]), torch.zeros(3, dtype=torch.bool)]
    m = [~x for x in u]
    # eps = 1: scores [1, (excluded), 2, (non-finite)] and [2, 2, 2]; the best three: the first three 2s
    result = cpu_id3.grow(lib, g, t, u, m, eps=1.0, exponent=1.0, k=3)
    assert [x.tolist() for x in u] == [[False, True, True, False], [True, True, False]]
    assert all(torch.equal(a, ~b) for a, b in zip(m, u))
    assert result.marked == [1, 2] and result.nonfinite == [1, 0] and result.rankable == 5
    two = torch.tensor([2.0]).view(torch.int32).item()
    assert (result.threshold, result.ties) == (0x7F7FFFFF - two, 3)  # every chosen key ties at the threshold


def test_warm_read_and_passes_agree_around_empty_tensors():
    """The kernel alone, an empty tensor between two others: the warm read (given the boundary the
    passes found) and the passes mark the same entries, whatever the window."""
    lib = dispatch.kernel()
    if lib is None:
        pytest.skip("the C kernel does not build here")
    gen = torch.Generator().manual_seed(3)
    sizes = [5000, 0, 7001, 0]
    g = [torch.randn(n, generator=gen) for n in sizes]
    t = [torch.randn(n, generator=gen) * 0.02 for n in sizes]

    def grown(boundaries):
        u = [torch.zeros(n, dtype=torch.bool) for n in sizes]
        m = [~x for x in u]
        result = cpu_id3.grow(lib, g, t, u, m, eps=1e-3, exponent=1.0, k=600, boundaries=boundaries)
        return u, result

    cold, first = grown(())
    assert not first.warm and sum(first.marked) == 600 and first.marked[1] == first.marked[3] == 0
    for boundaries in ([first.boundary], [first.boundary - 3, first.boundary], [first.boundary + 40, first.boundary]):
        warm, result = grown(boundaries)
        assert all(torch.equal(a, b) for a, b in zip(warm, cold)), boundaries
        assert result.marked == first.marked and (result.threshold, result.ties) == (first.threshold, first.ties)
    assert grown([first.boundary])[1].warm


def test_portable_warm_read_equals_the_avx2_one(tmp_path):
    """``GMT_PLUGINS_NO_AVX2_SCAN=1`` (read when the kernel loads) makes the warm read take the portable
    loop (id3_scan_*): in fresh processes, both give the same results and masks for every exponent,
    with ties, zero and non-finite parameters and gradients, sizes that are not multiples of 32, and
    windows that hold the answer or miss it (then the passes decide, the same for both)."""
    from pathlib import Path

    import gmt_plugins

    root = Path(gmt_plugins.__file__).resolve().parents[1]
    script = tmp_path / "id3_scan.py"
    script.write_text(
        "import hashlib, torch\n"
        "from gmt_plugins.engine import dispatch\nfrom gmt_plugins.engine.cpu import id3 as cpu_id3\n"
        "lib = dispatch.kernel()\n"
        "gen = torch.Generator().manual_seed(3)\n"
        "sizes = [70_003, 31, 4_096, 100_000]\n"
        "thetas = [torch.randn(n, generator=gen) * 0.02 for n in sizes]\n"
        "thetas[0][:50] = 0.0\n"
        "thetas[0][50] = float('inf')\n"
        "thetas[0][51] = float('nan')\n"
        "thetas[3] = (thetas[3] * 200).round() / 200\n"
        "def digest(ts):\n"
        "    return hashlib.sha256(b''.join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in ts)).hexdigest()[:16]\n"
        "for exponent in (0.0, 1.0, 2.0, 3.0):\n"
        "    updatable = [torch.zeros(n, dtype=torch.bool) for n in sizes]\n"
        "    masked = [torch.ones(n, dtype=torch.bool) for n in sizes]\n"
        "    bounds = []\n"
        "    for step in range(5):\n"
        "        grads = [torch.randn(n, generator=gen) * 1e-3 for n in sizes]\n"
        "        grads[3] = (grads[3] * 2000).round() / 2000\n"
        "        grads[0][7] = float('nan')\n"
        "        grads[2][9] = float('-inf')\n"
        "        grads[0][11] = 3e38\n"
        "        window = bounds if step != 3 else [bounds[-1] + 40]  # step 3: a window that misses\n"
        "        r = cpu_id3.grow(lib, grads, thetas, updatable, masked, eps=1e-3, exponent=exponent, k=9_000, boundaries=window)\n"
        "        bounds = [*bounds[-1:], r.boundary]\n"
        "        print(exponent, step, r.marked, r.nonfinite, r.threshold, r.ties, r.rankable, r.boundary, r.warm, r.below, r.candidates, digest(updatable), digest(masked), sep=';')\n"
        "print('avx2', dispatch.kernel().gmt_avx2_scan())\n"
    )
    outputs = outputs_with_and_without_avx2(tmp_path, script.read_text())
    assert outputs[1][-1] == "avx2 0"
    warm = [line.split(';')[8] for line in outputs[0][:-1]]
    assert warm.count("True") >= 4 and warm.count("False") >= 4  # both paths ran
    assert outputs[0][:-1] == outputs[1][:-1]
