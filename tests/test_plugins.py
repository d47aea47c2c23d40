"""The plugin surface: hookspecs documented and tested, entry points, blocking, check_pending, CLI."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest
import torch

from gmt_plugins import GMTConfig, GradientMasker, hookimpl, hookspecs
from gmt_plugins.plugins import DEFAULT_PLUGINS, make_plugin_manager, strategy_registry
from gmt_plugins.strategies.base import KeyedStrategy
from gmt_plugins.engine.keys import MagnitudeKeys

ROOT = Path(__file__).resolve().parents[1]
HOOK_NAMES = sorted(n for n, f in vars(hookspecs).items() if n.startswith("gmt_") and callable(f))


def test_every_hook_is_prefixed_typed_and_documented():
    assert HOOK_NAMES, "no hookspecs found"
    for name in HOOK_NAMES:
        func = getattr(hookspecs, name)
        doc = inspect.getdoc(func) or ""
        assert "Called" in doc, f"{name} docstring must say when it is called"
        assert "first non-None result wins" in doc or "All results are collected" in doc or "All implementations are called" in doc, name
        assert func.__annotations__.get("return") is not None, f"{name} needs a return annotation"


def test_every_hook_is_documented_in_docs_and_tested():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_plugins.py")
    for name in HOOK_NAMES:
        assert re.search(rf"`{name}[(`]", docs), f"{name} missing from docs/plugins.md"
        assert name in tests or name in Path(__file__).read_text().split("# --- per-hook tests")[-1], f"{name} has no test"


def test_default_plugins_register_and_import_no_heavy_stack(pm):
    registered = {name for name, _ in pm.list_name_plugin()}
    assert set(DEFAULT_PLUGINS) <= registered
    code = "import sys; from gmt_plugins.plugins import make_plugin_manager, strategy_registry; pm = make_plugin_manager(); strategy_registry(pm); print(sorted(m for m in ('transformers','trl','peft','bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_import_gmt_plugins_imports_no_heavy_stack():
    code = "import sys, gmt_plugins; gmt_plugins.GMTConfig(); print(sorted(m for m in ('transformers','trl','peft','bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_blocking_by_env_var(monkeypatch):
    monkeypatch.setenv("GMT_PLUGINS_BLOCK", "gmt_plugins.strategies.random, some.other")
    pm = make_plugin_manager(load_entrypoints=False)
    assert "random" not in strategy_registry(pm)
    assert "gmt" in strategy_registry(pm)
    with pytest.raises(ValueError, match=r"strategy must be one of \[[^]]*'gmt'[^]]*\], got 'random'"):
        GradientMasker([("w", torch.nn.Parameter(torch.zeros(3)))], strategy="random", plugin_manager=pm)


def test_misspelled_hookimpl_is_caught():
    class Typo:
        @hookimpl
        def gmt_register_strategys(self, register):  # sic
            pass

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError, match="gmt_register_strategys"):
        pm.check_pending()


def test_entry_points_are_loaded(monkeypatch):
    calls = []

    class FakeDist:
        metadata = {"name": "fake-gmt-plugin"}

    class FakeEntryPoint:
        name, group, value, dist = "fake", "gmt_plugins", "fake:plugin", FakeDist()

        def load(self):
            calls.append(self.name)
            return FakeStrategyPlugin

    monkeypatch.setattr("importlib.metadata.distributions", lambda: [type("D", (), {"entry_points": [FakeEntryPoint()], "metadata": {"name": "fake"}})()])
    pm = make_plugin_manager()
    assert calls == ["fake"] and "half_magnitude" in strategy_registry(pm)
    pm_blocked = make_plugin_manager(blocked=["fake"])
    assert "half_magnitude" not in strategy_registry(pm_blocked)


def test_cli_list_shows_strategies_plugins_and_hooks():
    out = subprocess.run([sys.executable, "-m", "gmt_plugins.cli", "list"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\s+gmt\s+gmt_plugins\.strategies\.gmt\.GMTStrategy", out, re.M)
    assert re.search(r"^\s+random\s+", out, re.M)
    assert "gmt_plugins.integrations.peft" in out and "hooks: gmt_select_parameters" in out


# --- per-hook tests --------------------------------------------------------------------------


class HalfMagnitude(KeyedStrategy):
    """Test strategy: ranks by |grad| but only ever masks the first half of each tensor."""

    name = "half_magnitude"

    def key_source(self, entries, *, step):
        return MagnitudeKeys([e.flat.dtype for e in entries])


class FakeStrategyPlugin:
    @staticmethod
    @hookimpl
    def gmt_register_strategies(register):
        register.add(HalfMagnitude)


def test_gmt_register_strategies_adds_a_selectable_strategy(pm):
    pm.register(FakeStrategyPlugin)
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.arange(10.0)
    GradientMasker([("w", p)], strategy="half_magnitude", mask_ratio=0.3, plugin_manager=pm).apply()
    assert torch.equal(p.grad, torch.tensor([0.0, 0, 0, 3, 4, 5, 6, 7, 8, 9]))


def test_gmt_register_strategies_duplicate_name_names_both(pm):
    class Clash(HalfMagnitude):
        name = "gmt"

    class Plugin:
        @staticmethod
        @hookimpl
        def gmt_register_strategies(register):
            register.add(Clash)

    pm.register(Plugin)
    with pytest.raises(ValueError, match=r"registered twice: by .*(GMTStrategy|Clash) and by .*(GMTStrategy|Clash)"):
        strategy_registry(pm)


def test_gmt_select_parameters_first_result_wins(pm):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))

    class OnlyLast:
        @staticmethod
        @hookimpl
        def gmt_select_parameters(model, config):
            return [("1.weight", model[1].weight)]

    pm.register(OnlyLast)
    assert GradientMasker(model, plugin_manager=pm).names == ["1.weight"]


def test_gmt_select_parameters_default_and_include_exclude(pm):
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    masker = GradientMasker(model, plugin_manager=pm, exclude=[r"^1\."])
    assert masker.names == ["0.weight", "2.weight"]
    assert GradientMasker(model, plugin_manager=pm, include=["weight"], exclude=["^0"]).names == ["1.weight", "2.weight"]
    with pytest.raises(ValueError, match="no trainable parameter matches"):
        GradientMasker(model, plugin_manager=pm, include=["nothing"])


def test_gmt_inspect_optimizer(pm):
    from gmt_plugins.plugins import inspect_optimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    config = GMTConfig()
    plain = inspect_optimizer(torch.optim.SGD(p, lr=0.1), config, plugin_manager=pm)
    assert plain.family == "SGD" and not plain.moves_masked_entries
    adamw = inspect_optimizer(torch.optim.AdamW(p, lr=0.1, weight_decay=0.01), config, plugin_manager=pm)
    assert adamw.moves_masked_entries and "weight decay" in adamw.reasons
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    info = inspect_optimizer(bnb.optim.PagedAdamW8bit(p, lr=0.1), config, plugin_manager=pm)
    assert info.family == "bitsandbytes.PagedAdamW8bit" and info.quantized_state and info.paged


def test_gmt_check_training_setup_vetoes(pm):
    from types import SimpleNamespace

    results = pm.hook.gmt_check_training_setup(args=SimpleNamespace(deepspeed=None, optim="adamw_torch"), model=None, optimizer=None, config=GMTConfig())
    assert [r for r in results if r] == []
    results = pm.hook.gmt_check_training_setup(args=SimpleNamespace(deepspeed={"zero_optimization": {}}, optim="adamw_torch"), model=None, optimizer=None, config=GMTConfig())
    assert any("DeepSpeed" in r for r in results if r)
