"""The other checkout that a comparison benchmark measures, and the machine it runs on.

Kept free of torch and gmt_plugins: the comparing process only starts the measuring ones.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def other_checkout(against: str, folder: str) -> Path:
    """The root of ``against``: a folder as it is, or a commit's files exported into ``folder``
    (``git archive``; gone with ``folder``)."""
    if os.path.isdir(against):
        return Path(against).resolve()
    path = Path(folder) / "against"
    path.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", against], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--against {against!r} is neither a folder nor a commit of this repository")
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True)
    return path


def cpu_model() -> str:
    """``lscpu``'s model name, or "unknown CPU"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown CPU")
