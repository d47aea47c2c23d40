"""Run a script in fresh processes with the kernel's AVX2 paths on and off.

``GMT_PLUGINS_NO_AVX2_SCAN`` is read once, when the compiled kernel loads, so comparing an AVX2 path
with its portable twin takes two processes. Scripts import this checkout (not an installed copy) and
may import the test modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def outputs_with_and_without_avx2(tmp_path: Path, body: str) -> tuple[list[str], list[str]]:
    """The stdout lines of ``body`` run with the AVX2 paths allowed, then with them switched off.

    ``body`` may use ``ROOT`` (this checkout) and finds the test modules on ``sys.path``."""
    import gmt_plugins

    root = Path(gmt_plugins.__file__).resolve().parents[1]
    script = tmp_path / "fresh.py"
    script.write_text(f"import sys\nROOT = {str(root)!r}\nsys.path.insert(0, {str(root / 'tests')!r})\n" + body)
    outputs = []
    for off in ("0", "1"):
        env = {**os.environ, "GMT_PLUGINS_NO_AVX2_SCAN": off, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.splitlines())
    return outputs[0], outputs[1]
