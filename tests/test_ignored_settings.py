"""Strategies that do not use ``mask_ratio`` or ``scope`` warn (once) when a value was given explicitly."""

from __future__ import annotations

import dataclasses
import pickle
import warnings

import pytest

from gmt_plugins import GMTConfig
from gmt_plugins.config import resolve_config
from gmt_plugins.plugins import strategy_registry
from gmt_plugins.strategies import base

IGNORED = {"hft": ("mask_ratio", "scope"), "lisa": ("mask_ratio", "scope"), "ist": ("mask_ratio", "scope"), "spt": ("scope",), "id3": ("scope",)}


@pytest.fixture(autouse=True)
def fresh_warnings():
    base._warned.clear()
    yield
    base._warned.clear()


def test_given_tells_an_explicit_value_from_the_default():
    config = GMTConfig()
    assert not config.given("mask_ratio") and not config.given("scope")
    assert GMTConfig(mask_ratio=0.2).given("mask_ratio") and GMTConfig(scope="tensor").given("scope")
    for same in (resolve_config(config, {"strict": True}), dataclasses.replace(config), pickle.loads(pickle.dumps(config))):
        assert not same.given("mask_ratio") and not same.given("scope")
    assert config == GMTConfig(mask_ratio=0.2, scope="tensor") and config.mask_ratio == 0.2


def test_hf_argument_parser_keeps_the_default_float_unmarked():
    transformers = pytest.importorskip("transformers")
    (parsed,) = transformers.HfArgumentParser(GMTConfig).parse_args_into_dataclasses([])
    assert not parsed.given("mask_ratio")
    (parsed,) = transformers.HfArgumentParser(GMTConfig).parse_args_into_dataclasses(["--mask_ratio", "0.2"])
    assert parsed.given("mask_ratio")


@pytest.mark.parametrize("strategy", sorted(IGNORED))
def test_strategies_warn_once_about_explicit_ignored_settings(strategy):
    registry = strategy_registry()
    assert registry.get(strategy).ignored_settings == IGNORED[strategy]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.create(GMTConfig(strategy=strategy))  # defaults: silent
    explicit = {"mask_ratio": 0.5, "scope": "global"}
    for setting in IGNORED[strategy]:
        with pytest.warns(UserWarning, match=f"{strategy!r} does not use {setting}="):
            registry.create(GMTConfig(strategy=strategy, **{setting: explicit[setting]}))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            registry.create(GMTConfig(strategy=strategy, **{setting: explicit[setting]}))  # once per process


@pytest.mark.parametrize("strategy", ["gmt", "random", "sift", "lift", "gmt_momentum"])
def test_strategies_that_use_both_settings_never_warn(strategy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy_registry().create(GMTConfig(strategy=strategy, mask_ratio=0.5, scope="global"))
