"""Whole-tensor strategies: hft (half of each layer frozen), lisa (a few random layers), ist
(layers sampled by learned importance)."""

from __future__ import annotations

from collections import Counter

import torch

from gmt_plugins.strategies._layers import layer_key
from test_strategies_common import LAYERS, make_model, masker_for, run_steps

OTHERS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def frozen_tensors(zeroed: dict[str, torch.Tensor]) -> set[str]:
    """Names of the tensors zeroed entirely; every other tensor must be untouched."""
    out = set()
    for name, z in zeroed.items():
        assert bool(z.all()) or not bool(z.any()), f"{name} is partly masked"
        if z.all():
            out.add(name)
    return out


def layer_members(layer: int) -> set[str]:
    return {n for n, _ in make_model() if layer_key(n) == f"model.layers.{layer}"}


def test_layer_key():
    assert layer_key("model.layers.3.mlp.experts.7.w1") == "model.layers.3"
    assert layer_key("encoder.block.0.layer.1.weight") == "encoder.block.0"
    assert layer_key("lm_head.weight") is None


# --- hft ----------------------------------------------------------------------------------------


def test_hft_freezes_half_of_every_layer_per_stage():
    params = make_model()
    steps = run_steps(masker_for(params, "hft", {"interval": 3}, mask_seed=5), params, 30)
    frozen = [frozen_tensors(z) for z in steps]
    for f in frozen:
        for layer in range(LAYERS):
            assert len(f & layer_members(layer)) == 2  # 4 tensors per layer: exactly half
        assert len(f & set(OTHERS)) in (1, 2)  # 3 tensors without a layer index: 1 or 2
    stages = [frozen[s : s + 3] for s in range(0, 30, 3)]
    assert all(a == b == c for a, b, c in stages)  # fixed within a stage
    assert len({frozenset(s[0]) for s in stages}) > 5  # re-drawn between stages
    # each tensor is frozen in about half of the stages
    counts = Counter(n for s in stages for n in s[0])
    assert all(1 <= counts[n] <= 9 for n, _ in params)


def test_hft_depends_on_seed_not_on_mask_ratio():
    def frozen(**config):
        params = make_model()
        return [frozen_tensors(z) for z in run_steps(masker_for(params, "hft", {"interval": 1}, **config), params, 4)]

    assert frozen(mask_seed=1, mask_ratio=0.0) == frozen(mask_seed=1, mask_ratio=0.9)
    assert frozen(mask_seed=1) != frozen(mask_seed=2)


# --- lisa ---------------------------------------------------------------------------------------


def test_lisa_updates_only_sampled_layers_plus_embeddings_and_head():
    params = make_model()
    steps = run_steps(masker_for(params, "lisa", {"active_layers": 1, "interval": 2}, mask_seed=1), params, 40)
    active_layers = []
    for zeroed in steps:
        frozen = frozen_tensors(zeroed)
        assert not frozen & set(OTHERS)
        active = [layer for layer in range(LAYERS) if not frozen & layer_members(layer)]
        assert len(active) == 1
        assert all(layer_members(layer) <= frozen for layer in range(LAYERS) if layer not in active)
        active_layers.append(active[0])
    assert all(active_layers[s] == active_layers[s + 1] for s in range(0, 40, 2))
    assert set(active_layers) == set(range(LAYERS))  # every layer gets its turn


def test_lisa_always_active_patterns_and_too_many_layers():
    params = make_model()
    masker = masker_for(params, "lisa", {"active_layers": 2, "always_active": [r"\.q\.weight$"]})
    frozen = frozen_tensors(run_steps(masker, params, 1)[0])
    assert not any(".q." in n for n in frozen)
    assert len({layer_key(n) for n in frozen}) == LAYERS - 2
    everything = masker_for(params, "lisa", {"active_layers": LAYERS + 3})
    assert frozen_tensors(run_steps(everything, params, 1)[0]) == set()


# --- ist ----------------------------------------------------------------------------------------


def test_ist_learns_to_sample_the_important_layer():
    params = make_model()
    loud = {n: 10.0 for n in layer_members(2)}  # layer 2 always has 10x larger gradients
    masker = masker_for(params, "ist", {"active_layers": 1, "interval": 1, "temperature": 0.2, "beta": 0.5}, mask_seed=4)
    steps = run_steps(masker, params, 40, scale=loud)
    chosen = []
    for zeroed in steps:
        frozen = frozen_tensors(zeroed)
        assert not frozen & set(OTHERS)
        active = [layer for layer in range(LAYERS) if not frozen & layer_members(layer)]
        assert len(active) == 1
        chosen.append(active[0])
    scores = masker.strategy.scores
    assert scores["model.layers.2"] == max(scores.values()) and scores["model.layers.2"] > 2.0
    assert Counter(chosen[10:])[2] >= 25  # once learned, the important layer dominates the draws


def test_ist_first_draw_is_uniform_and_state_is_plain_json():
    counts = Counter()
    for seed in range(40):
        params = make_model()
        masker = masker_for(params, "ist", {"active_layers": 1}, mask_seed=seed)
        frozen = frozen_tensors(run_steps(masker, params, 1, scale={n: 10.0 for n in layer_members(0)})[0])
        counts.update(layer for layer in range(LAYERS) if not frozen & layer_members(layer))
    assert all(counts[layer] >= 3 for layer in range(LAYERS))  # no layer favoured before learning
    state = masker.strategy.state_dict()
    assert set(state) == {"scores", "period", "active"} and isinstance(state["scores"]["model.layers.0"], float)


def test_whole_tensor_plan_counts_nonfinite_like_the_chunked_count():
    from gmt_plugins.strategies._layers import nonfinite
    from gmt_plugins.strategies.base import count_nonfinite

    big = torch.full((4096,), 3e38)  # finite entries whose float32 sum overflows: the exact count decides
    for flat in (torch.randn(5000), torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]), big):
        assert nonfinite(flat, 1024) == count_nonfinite(flat, 1024)
    assert nonfinite(torch.randn(3000, dtype=torch.bfloat16), 1024) == 0
