"""The manual builds and says what the code does: the MkDocs site builds in strict mode (a broken link,
reference or docstring fails), the README's configuration table is GMTConfig's metadata, and the
README's code blocks marked runnable run and print what the README shows."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = re.compile(r"<!-- runnable(: prints the block below)? -->\n```python\n(.*?)```\n(?:\n```text\n(.*?)```)?", re.S)


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runnable_blocks(text: str) -> list[tuple[str, str | None]]:
    """(code, expected output or None) for every README block marked ``<!-- runnable... -->``."""
    return [(m.group(2), m.group(3) if m.group(1) else None) for m in RUNNABLE.finditer(text)]


def test_readme_configuration_table_is_generated_from_gmtconfig() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == _hooks().readme_with_table(readme), "README's table is stale: run `python docs/hooks.py`"


def test_config_table_has_every_field_and_its_help() -> None:
    import dataclasses

    from gmt_plugins import GMTConfig

    table = _hooks().config_table()
    for f in dataclasses.fields(GMTConfig):
        assert f"| `{f.name}` |" in table and f.metadata["help"].replace("|", "\\|") in table


def test_site_links_are_rewritten_for_pages_in_docs() -> None:
    rewrite = _hooks().site_links
    assert rewrite("see [method](docs/method.md#x)") == "see [method](method.md#x)"
    assert rewrite("![plot](docs/a.png)") == "![plot](a.png)"
    assert rewrite("[`examples/plain_loop.py`](examples/plain_loop.py)") == "`examples/plain_loop.py`"
    assert rewrite("[the plugin](integrations/axolotl/README.md)") == "the plugin (`integrations/axolotl/README.md`)"
    assert rewrite("[paper](https://arxiv.org/abs/2406.15330) [up](#install)") == (
        "[paper](https://arxiv.org/abs/2406.15330) [up](#install)"
    )


def test_readme_has_runnable_examples_with_their_output() -> None:
    blocks = runnable_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and all(output for _, output in blocks)
    assert any("SFTTrainer" in code and "use_cpu=True" in code for code, _ in blocks)


@pytest.mark.parametrize("index", range(len(runnable_blocks((ROOT / "README.md").read_text(encoding="utf-8")))))
def test_readme_runnable_block(index: int, tmp_path: Path) -> None:
    code, expected = runnable_blocks((ROOT / "README.md").read_text(encoding="utf-8"))[index]
    if "trl" in code:
        pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.splitlines()
    missing = [line for line in (expected or "").splitlines() if line not in printed]
    assert not missing, f"README shows lines the code did not print: {missing}\nprinted:\n{done.stdout[-3000:]}"


def test_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if importlib.util.find_spec("mkdocstrings_handlers") is None or mkdocs is None:
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-5000:]
    api = (site / "reference" / "strategy_api" / "index.html").read_text(encoding="utf-8")
    for name in ("KeyedStrategy", "MaskStrategy", "MagnitudeKeys", "mask_plan", "StrategyRegistry"):
        assert f'id="gmt_plugins.strategy_api.{name}"' in api, name
    for page, name in (("callback", "GMTCallback"), ("config", "GMTConfig"), ("masker", "GradientMasker"), ("sparse_adamw", "SparseAdamW")):
        html = (site / "reference" / page / "index.html").read_text(encoding="utf-8")
        assert re.search(rf'id="gmt_plugins\.[\w.]*{name}"', html), page
    assert "mask_ratio" in (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    assert (site / "changelog" / "index.html").exists() and (site / "index.html").exists()
