"""What every selective-update strategy must do, and helpers the per-strategy tests share.

Every strategy: registered by name, reproducible from the seed and step, options validated, NaN/inf
gradients never zeroed; stateful ones resume identically through ``save_state``/``load_state``.
"""

from __future__ import annotations

import pytest
import torch

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.plugins import strategy_registry
from gmt_plugins.state_io import load_state, save_state

NEW = ["hft", "sift", "id3", "lift", "spt", "lisa", "ist", "gmt_momentum"]
STATEFUL = ["sift", "id3", "lift", "spt", "ist", "gmt_momentum"]
SPARSE = ["sara", "dsee", "spiel", "lt_sft"]
SPARSE_OPTIONS = {  # the sparse fine-tuning strategies (their own tests: test_strategies_new.py)
    "sara": {"fraction": 0.2, "interval": 2},
    "dsee": {"rank": 2, "density": 0.2},
    "spiel": {"density": 0.3, "update_interval": 2, "drop_fraction": 0.5},
    "lt_sft": {"full_steps": 3, "density": 0.2},
}
LAYERS = 4


def model_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """A tiny decoder-like parameter layout: embedding, numbered layers, final norm, head."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (10, 6)}
    for i in range(layers):
        shapes[f"model.layers.{i}.attn.q.weight"] = (6, 6)
        shapes[f"model.layers.{i}.attn.k.weight"] = (6, 6)
        shapes[f"model.layers.{i}.mlp.up.weight"] = (12, 6)
        shapes[f"model.layers.{i}.norm.weight"] = (6,)
    shapes["model.norm.weight"] = (6,)
    shapes["lm_head.weight"] = (10, 6)
    return shapes


def make_model(seed: int = 0, layers: int = LAYERS) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in model_shapes(layers).items()]


def grads_for(params, step: int, seed: int = 100, scale: dict[str, float] | None = None) -> list[torch.Tensor]:
    """Deterministic, nowhere-zero gradients for ``step``."""
    gen = torch.Generator().manual_seed(seed + step)
    out = []
    for name, p in params:
        g = torch.randn(p.shape, generator=gen)
        g = torch.where(g == 0, 1e-3, g) * (scale or {}).get(name, 1.0)
        out.append(g)
    return out


def masker_for(params, strategy: str, options=None, **config) -> GradientMasker:
    return GradientMasker(params, GMTConfig(strategy=strategy, strategy_options=options, chunk_numel=1024, **config))


def step_once(masker: GradientMasker, params, grads, *, lr: float = 0.0) -> dict[str, torch.Tensor]:
    """Set ``grads``, apply the masker, return which entries it zeroed (by name), and optionally
    take an SGD step so the weights move."""
    for (_, p), g in zip(params, grads):
        p.grad = g.clone()
    masker.apply()
    zeroed = {}
    for (name, p), g in zip(params, grads):
        zeroed[name] = (p.grad == 0) & (g != 0)
        # the engine may only zero entries: whatever it did not zero is bit-identical (NaN included)
        assert torch.equal(torch.where(zeroed[name], g, p.grad).view(torch.int32), g.view(torch.int32)), name
    if lr:
        with torch.no_grad():
            for _, p in params:
                p -= lr * torch.nan_to_num(p.grad)
    return zeroed


def run_steps(masker, params, steps, *, start: int = 0, lr: float = 0.1, **grad_kwargs) -> list[dict[str, torch.Tensor]]:
    return [step_once(masker, params, grads_for(params, s, **grad_kwargs), lr=lr) for s in range(start, start + steps)]


def same_masks(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# Options per strategy that make every one of them mask something within a few steps.
OPTIONS = {
    "hft": {"interval": 2},
    "sift": {"warmup_steps": 2},
    "id3": {"steps_to_budget": 3},
    "lift": {"rank": 2, "interval": 2},
    "spt": {"warmup_steps": 2},
    "lisa": {"active_layers": 1, "interval": 2},
    "ist": {"active_layers": 1, "interval": 2, "temperature": 0.02},
    "gmt_momentum": {"beta": 0.5},
}
CONFIG = {"mask_ratio": 0.5, "mask_seed": 3}


def test_all_registered(pm):
    names = strategy_registry(pm).names()
    for name in NEW + ["gmt", "random"]:
        assert name in names


@pytest.mark.parametrize("strategy", NEW)
def test_reproducible_and_masks_something(strategy):
    runs = []
    for _ in range(2):
        params = make_model()
        runs.append(run_steps(masker_for(params, strategy, OPTIONS[strategy], **CONFIG), params, 5))
    assert same_masks(*runs)
    assert all(sum(int(m.sum()) for m in step.values()) > 0 for step in runs[0])


@pytest.mark.parametrize("strategy", NEW)
def test_nonfinite_gradients_are_never_zeroed(strategy):
    params = make_model()
    masker = masker_for(params, strategy, OPTIONS[strategy], **CONFIG)
    for step in range(5):
        grads = grads_for(params, step)
        for g in grads:  # a NaN and an inf in every tensor, every step
            g.view(-1)[0], g.view(-1)[-1] = float("nan"), float("inf")
        for (_, p), g in zip(params, grads):
            p.grad = g.clone()
        stats = masker.apply()
        assert stats.nonfinite == 2 * len(params)
        assert stats.masked > 0
        for _, p in params:
            assert torch.isnan(p.grad.view(-1)[0]) and p.grad.view(-1)[-1] == float("inf")


@pytest.mark.parametrize("strategy", STATEFUL)
def test_state_round_trip_gives_identical_masks(strategy, tmp_path):
    params = make_model()
    masker = masker_for(params, strategy, OPTIONS[strategy], **CONFIG)
    run_steps(masker, params, 3)
    save_state(masker.state_dict(), str(tmp_path))
    resumed_params = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
    resumed = masker_for(resumed_params, strategy, OPTIONS[strategy], **CONFIG)
    resumed.load_state_dict(load_state(str(tmp_path)))
    fresh_params = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
    fresh = masker_for(fresh_params, strategy, OPTIONS[strategy], **CONFIG)
    fresh.step = masker.step  # same step, no state: must not be able to reproduce the masks
    expected = run_steps(masker, params, 4, start=3)
    assert same_masks(run_steps(resumed, resumed_params, 4, start=3), expected)
    assert not same_masks(run_steps(fresh, fresh_params, 4, start=3), expected)


@pytest.mark.parametrize("strategy", STATEFUL + SPARSE)
def test_load_rejects_unknown_state(strategy):
    masker = masker_for(make_model(), strategy, {**OPTIONS, **SPARSE_OPTIONS}[strategy], **CONFIG)
    with pytest.raises(ValueError, match="unknown"):
        masker.strategy.load_state_dict({"bogus": 1})


BAD_OPTIONS = [
    ("hft", {"interval": 0}, "interval"),
    ("hft", {"interval": 1.5}, "interval"),
    ("sift", {"warmup_steps": 0}, "warmup_steps"),
    ("spt", {"warmup_steps": True}, "warmup_steps"),
    ("id3", {"eps": 0.0}, "eps"),
    ("id3", {"exponent": -1}, "exponent"),
    ("id3", {"steps_to_budget": 0}, "steps_to_budget"),
    ("lift", {"rank": 0}, "rank"),
    ("lift", {"interval": -2}, "interval"),
    ("lift", {"vectors": "skip"}, "vectors"),
    ("lisa", {"active_layers": 0}, "active_layers"),
    ("lisa", {"interval": "3"}, "interval"),
    ("lisa", {"always_active": "embed"}, "always_active"),
    ("lisa", {"always_active": ["("]}, "always_active"),
    ("ist", {"beta": 1.0}, "beta"),
    ("ist", {"temperature": 0}, "temperature"),
    ("ist", {"active_layers": -1}, "active_layers"),
    ("gmt_momentum", {"beta": 1.0}, "beta"),
    ("gmt_momentum", {"beta": -0.1}, "beta"),
    ("sara", {"fraction": 0.0}, "fraction"),
    ("sara", {"fraction": 1.5}, "fraction"),
    ("sara", {"interval": 0}, "interval"),
    ("dsee", {"rank": 0}, "rank"),
    ("dsee", {"density": -0.1}, "density"),
    ("dsee", {"num_sparse": 0}, "num_sparse"),
    ("dsee", {"dense": "lora_"}, "dense"),
    ("dsee", {"vectors": "magnitude"}, "vectors"),
    ("spiel", {"density": 0}, "density"),
    ("spiel", {"update_interval": 0}, "update_interval"),
    ("spiel", {"drop_fraction": 1.1}, "drop_fraction"),
    ("spiel", {"regrow": "momentum"}, "regrow"),
    ("lt_sft", {"full_steps": 0}, "full_steps"),
    ("lt_sft", {"sparse_steps": 0}, "sparse_steps"),
    ("lt_sft", {"density": 2}, "density"),
    ("lt_sft", {"num_entries": -5}, "num_entries"),
]


@pytest.mark.parametrize("strategy,options,option", BAD_OPTIONS)
def test_invalid_options_name_the_option(strategy, options, option):
    with pytest.raises(ValueError, match=option):
        masker_for(make_model(), strategy, options)


@pytest.mark.parametrize("strategy", NEW + SPARSE)
def test_unknown_option_is_rejected(strategy):
    with pytest.raises(ValueError, match="not options"):
        masker_for(make_model(), strategy, {"no_such_option": 1})
