"""The release installs: the wheel and sdist of gmt-plugins (and the gmt-axolotl wheel) are built, hold what
the package needs at run time (the C source of the kernel, py.typed, the console script), install into a
fresh virtualenv, and work from outside the checkout.

Marked slow: it builds three distributions, makes a fresh venv and installs the CPU torch wheel and the
Hugging Face stack into it (6 minutes on 2 vCPUs of an AMD EPYC with other jobs on both cores; mostly
pip). Run it alone with `pytest tests/test_release.py`, or leave it out with `-m "not slow"`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AXOLOTL_PIN = ["axolotl==0.19.0", "addict==2.4.0", "colorama==0.4.6"]  # as scripts/setup.sh installs them
# gmt_kernels.c includes every other file of csrc/, so the kernel builds only where all of them ship
KERNEL_SOURCES = {f"gmt_plugins/engine/csrc/{p.name}" for p in (ROOT / "gmt_plugins" / "engine" / "csrc").glob("*.[ch]")}

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, env={**clean, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _build(project: Path, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True)
    pytest.importorskip("build", reason="the release test builds with `python -m build` (the dev extra)")
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(project)], cwd=out)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    wheel, sdist = _build(ROOT, out / "gmt")
    ax_wheel, _ = _build(ROOT / "integrations" / "axolotl", out / "axolotl")
    venv = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=out)
    return {"wheel": wheel, "sdist": sdist, "axolotl_wheel": ax_wheel, "python": venv / "bin" / "python", "bin": venv / "bin", "outside": out}


def _pip(release: dict[str, Path], *args: str) -> None:
    _run([str(release["python"]), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args], cwd=release["outside"])


def test_wheel_and_sdist_hold_what_runs(release: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(release["wheel"]).namelist())
    assert "gmt_plugins/engine/csrc/gmt_kernels.c" in KERNEL_SOURCES and "gmt_plugins/engine/csrc/gmt.h" in KERNEL_SOURCES
    assert {*KERNEL_SOURCES, "gmt_plugins/py.typed", "gmt_plugins/strategy_api.py"} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "gmt-plugins = gmt_plugins.cli:main" in zipfile.ZipFile(release["wheel"]).read(entry_points).decode()
    assert not [n for n in names if n.startswith(("tests/", "integrations/", "gmt_axolotl/"))]
    members = {n.split("/", 1)[1] for n in tarfile.open(release["sdist"]).getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", *KERNEL_SOURCES, "gmt_plugins/py.typed"} <= members


def test_wheel_installs_and_runs_outside_the_checkout(release: dict[str, Path]) -> None:
    _pip(release, "torch==2.13.0")
    _pip(release, "-c", str(ROOT / "constraints.txt"), str(release["wheel"]))
    where = _run([str(release["python"]), "-c", "import gmt_plugins, sys; print(gmt_plugins.__file__); print('transformers' in sys.modules)"], cwd=release["outside"])
    assert where.split()[0].startswith(str(release["bin"].parent)) and where.split()[1] == "False"
    printed = _run([str(release["python"]), str(ROOT / "examples" / "plain_loop.py")], cwd=release["outside"])
    assert "step 2: masked 433/2177 (0.199)" in printed
    listed = _run([str(release["bin"] / "gmt-plugins"), "list"], cwd=release["outside"])
    assert "gmt" in listed.split() and "random" in listed.split()


def test_sdist_installs_and_runs_outside_the_checkout(release: dict[str, Path]) -> None:
    _pip(release, "torch==2.13.0")
    _pip(release, "--force-reinstall", "--no-deps", str(release["sdist"]))
    listed = _run([str(release["bin"] / "gmt-plugins"), "list"], cwd=release["outside"])
    assert "gmt_momentum" in listed.split()
    kernel = "from gmt_plugins.engine import dispatch; print(dispatch.kernel() is not None)"
    assert _run([str(release["python"]), "-c", kernel], cwd=release["outside"], GMT_PLUGINS_NATIVE="1").strip() == "True"


def test_axolotl_plugin_installs_beside_axolotl(release: dict[str, Path]) -> None:
    _pip(release, "torch==2.13.0")
    _pip(release, "-c", str(ROOT / "constraints.txt"), f"{release['wheel']}[transformers,peft]", "pydantic")
    _pip(release, "--no-deps", str(release["axolotl_wheel"]), *AXOLOTL_PIN)
    check = (
        "from axolotl.integrations.base import BasePlugin, PluginManager\n"
        "import gmt_axolotl\n"
        "plugin = PluginManager.get_instance()\n"
        "plugin.register('gmt_axolotl.GMTPlugin')\n"
        "print(issubclass(gmt_axolotl.GMTPlugin, BasePlugin), gmt_axolotl.GMTPlugin().get_input_args())\n"
        "print(gmt_axolotl.__file__)\n"
    )
    printed = _run([str(release["python"]), "-c", check], cwd=release["outside"])
    first, where = printed.strip().splitlines()[-2:]
    assert first.startswith("True gmt_axolotl.") and where.startswith(str(release["bin"].parent))
