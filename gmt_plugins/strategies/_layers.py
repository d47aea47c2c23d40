"""Grouping parameters into layers by the numeric index in their names (``model.layers.3.mlp...``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from gmt_plugins.strategies.base import GradEntry


def layer_key(name: str) -> str | None:
    """The name up to and including its first all-digit component (``model.layers.3``), or ``None``.

    The prefix is kept, so ``encoder.layers.0`` and ``decoder.layers.0`` are different layers, and
    only the first index counts, so ``layers.3.mlp.experts.7.w1`` belongs to layer 3.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _order(key: str) -> tuple[str, int]:
    prefix, _, index = key.rpartition(".")
    return prefix, int(index)


def layer_groups(entries: Sequence[GradEntry]) -> tuple[list[str], dict[str, list[int]], list[int]]:
    """``(layers, members, others)``: the layer keys in natural order, the entry indices of each
    layer, and the indices of entries with no layer index."""
    members: dict[str, list[int]] = {}
    others: list[int] = []
    for i, entry in enumerate(entries):
        key = layer_key(entry.name)
        if key is None:
            others.append(i)
        else:
            members.setdefault(key, []).append(i)
    return sorted(members, key=_order), members, others


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)
