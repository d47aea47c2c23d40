"""Per-layer statistics from the Trainer's logs: the ``gmt/layer/<layer>/<quantity>`` keys that
``log_layers=True`` adds (``layer_stats``, layers in model order), and the older per-tensor
``gmt/masked_fraction/<tensor>`` keys summed per layer (``layer_fractions``)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

LAYER_PREFIX = "gmt/layer/"


def layer_name(parameter: str) -> str:
    """The ``<layer>`` of a parameter in the ``gmt/layer/`` keys (:func:`gmt_plugins.coverage.layer_of`:
    ``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``, ``model.norm.weight`` -> ``model.norm``)."""
    from gmt_plugins.coverage import layer_of  # imports torch: only when a model's names are at hand

    return layer_of(parameter)


def _fallback_order(layer: str) -> tuple[int, str, int]:
    """Embeddings, then numbered layers by prefix and index, then the rest (norms, heads) by name."""
    prefix, _, index = layer.rpartition(".")
    if index.isdigit():
        return (1, prefix, int(index))
    return (0 if "embed" in layer else 2, layer, 0)


def model_order(layers: Any, parameter_names: Any = ()) -> list[str]:
    """``layers`` in the order their parameters appear in ``parameter_names`` (``model.named_parameters()``
    order); layers not found there follow, embeddings first, numbered layers by index, the rest by name."""
    rank: dict[str, int] = {}
    for name in parameter_names:
        rank.setdefault(layer_name(name), len(rank))
    layers = list(dict.fromkeys(layers))
    return sorted((x for x in layers if x in rank), key=rank.__getitem__) + sorted(
        (x for x in layers if x not in rank), key=_fallback_order
    )


def layer_stats(history: list[dict[str, Any]], parameter_names: Any = ()) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{quantity: {layer: [(step, value), ...]}}`` from the ``gmt/layer/<layer>/<quantity>`` keys of
    ``trainer.state.log_history``; layers in model order (see :func:`model_order`), steps as logged."""
    found: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for entry in history:
        for key, value in entry.items():
            if key.startswith(LAYER_PREFIX) and "/" in key[len(LAYER_PREFIX) :]:
                layer, _, quantity = key[len(LAYER_PREFIX) :].rpartition("/")
                found[quantity][layer].append((entry["step"], float(value)))
    return {q: {layer: found[q][layer] for layer in model_order(found[q], parameter_names)} for q in sorted(found)}


# -- per-layer masked fractions ---------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
PER_TENSOR_PREFIX = "gmt/masked_fraction/"


def layer_of(name: str) -> str:
    """``"12"`` for ``model.layers.12.mlp.up_proj.weight``; ``"embed"`` for embeddings; ``"other"`` otherwise."""
    match = _LAYER.search(name)
    if match:
        return match.group(1)
    return "embed" if "embed" in name else "other"


def _layer_order(key: str) -> tuple[int, int]:
    return (0, -1) if key == "embed" else (2, 0) if key == "other" else (1, int(key))


def layer_fractions(history: list[dict[str, Any]], numels: dict[str, int]) -> dict[str, list[tuple[int, float]]]:
    """Masked fraction of each layer (entries-weighted over its tensors) at each logged step."""
    result: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in history:
        per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for key, value in entry.items():
            if key.startswith(PER_TENSOR_PREFIX):
                name = key[len(PER_TENSOR_PREFIX) :]
                weight = numels.get(name, 1)
                acc = per_layer[layer_of(name)]
                acc[0] += value * weight
                acc[1] += weight
        for layer, (masked, total) in per_layer.items():
            result[layer].append((entry["step"], masked / total if total else 0.0))
    return {k: result[k] for k in sorted(result, key=_layer_order)}
