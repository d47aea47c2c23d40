from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def pm():
    """A fresh plugin manager with the built-ins and no installed third-party plugins."""
    from gmt_plugins.plugins import make_plugin_manager

    return make_plugin_manager(load_entrypoints=False)


@pytest.fixture(params=["native", "torch"])
def engine(request, monkeypatch):
    """The compiled kernel (required) and the pure-torch passes, its twin (a module may override it)."""
    monkeypatch.setenv("GMT_PLUGINS_NATIVE", "1" if request.param == "native" else "0")
    return request.param
