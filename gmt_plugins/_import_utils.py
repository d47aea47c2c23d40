"""Cached availability checks, so that ``import gmt_plugins`` never imports the heavy stacks."""

from __future__ import annotations

import importlib.util
from functools import lru_cache


@lru_cache
def _is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_transformers_available() -> bool:
    return _is_available("transformers")


def is_peft_available() -> bool:
    return _is_available("peft")


def is_bitsandbytes_available() -> bool:
    return _is_available("bitsandbytes")


def is_trl_available() -> bool:
    return _is_available("trl")
