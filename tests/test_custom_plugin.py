"""A separately installed strategy plugin is found through the ``gmt_plugins`` entry points."""

from __future__ import annotations

import importlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmt_plugins import GradientMasker
from gmt_plugins.plugins import make_plugin_manager, strategy_registry

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_strategy_plugin"
MODULE = "gmt_example_plugin"


@pytest.fixture
def installed_plugin(tmp_path):
    # Build from a copy, so the build leaves no build/ or *.egg-info in the repository.
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def test_installed_plugin_is_selectable_by_name_and_masks_largest(installed_plugin):
    pm = make_plugin_manager()
    assert "example_largest" in strategy_registry(pm)
    assert pm.get_plugin("example_largest") is not None
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(40, 25))
    grad = torch.randn(40, 25, generator=gen)
    grad[0, 0] = float("inf")  # the largest magnitude of all, but non-finite: never masked
    p.grad = grad.clone()
    stats = GradientMasker([("w", p)], plugin_manager=pm, strategy="example_largest", mask_ratio=0.3).apply()
    k = math.floor(0.3 * (grad.numel() - 1))
    assert stats.strategy == "example_largest" and stats.masked == k
    finite = grad.view(-1)[1:]
    largest = torch.zeros(grad.numel(), dtype=torch.bool)
    largest[1 + torch.topk(finite.abs(), k).indices] = True
    assert torch.equal(p.grad.view(-1) == 0, largest)
    assert p.grad[0, 0] == float("inf")


def test_blocking_the_entry_point_removes_the_plugin(installed_plugin):
    pm = make_plugin_manager(blocked=["example_largest"])
    assert "example_largest" not in strategy_registry(pm)
    assert "gmt" in strategy_registry(pm)
    with pytest.raises(ValueError, match="example_largest"):
        GradientMasker([("w", torch.nn.Parameter(torch.zeros(3)))], plugin_manager=pm, strategy="example_largest")


def test_example_plugin_and_built_ins_import_only_the_public_strategy_api():
    """The example strategy plugin imports gmt_plugins only through gmt_plugins.strategy_api, and every
    name that module exports is one the built-in strategies get from it as well."""
    import ast
    from pathlib import Path

    import gmt_plugins.strategy_api as api

    example = Path(__file__).parents[1] / "examples" / "custom_strategy_plugin" / "gmt_example_plugin" / "__init__.py"
    modules = {
        node.module for node in ast.walk(ast.parse(example.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gmt_plugins")
    }
    assert modules == {"gmt_plugins.strategy_api"}
    built_ins = Path(api.__file__).parent / "strategies"
    for name in ("gmt", "random", "gmt_momentum", "sift", "sara"):
        imported = {
            node.module for node in ast.parse((built_ins / f"{name}.py").read_text()).body
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gmt_plugins")
        }
        assert "gmt_plugins.strategy_api" in imported, name
        assert not imported & {"gmt_plugins.hookspecs", "gmt_plugins.registry", "gmt_plugins.strategies.base"}, name
