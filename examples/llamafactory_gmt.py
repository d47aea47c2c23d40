"""Gradient-Mask Tuning inside LLaMA-Factory: ``run_exp(args, callbacks=[GMTCallback(...)])``.

LLaMA-Factory has no config key or CLI flag for extra Trainer callbacks, but its Python entry point
``llamafactory.train.tuner.run_exp(args, callbacks)`` hands ``callbacks`` to the Trainer it builds
(``CustomSeq2SeqTrainer`` for ``stage: sft``, a ``transformers.Trainer`` subclass, so ``GMTCallback``
masks in ``on_pre_optimizer_step`` as with any Trainer). This script reads a LLaMA-Factory YAML
config, takes the ``gmt_*`` keys out (LLaMA-Factory rejects keys it does not know), builds a
``GMTConfig`` from them and runs the experiment:

    python examples/llamafactory_gmt.py examples/llamafactory_gmt.yaml
    python examples/llamafactory_gmt.py my_config.yaml gmt_mask_ratio=0.3 learning_rate=1.0e-5   # key=value overrides

``llamafactory-cli train`` cannot take the ``gmt_*`` keys (its HfArgumentParser refuses them: "Some keys
are not used by the HfArgumentParser") and LLaMA-Factory has no config key for extra callbacks, so this
script is the way in. The config's ``dataset_dir: examples/llamafactory`` holds a 16-record alpaca-format
dataset and its ``dataset_info.json`` (the pip wheel does not carry LLaMA-Factory's ``data/`` folder);
run from the repository root.

Checked with llamafactory 0.9.5 and its own pins (transformers 5.6.0, trl 0.24.0, peft 0.18.1,
accelerate 1.11.0, datasets 4.0.0) over PyPI's default build of torch 2.13.0 with torchvision 0.28.0:
PyPI's torchvision and torchaudio are linked against that build, and with the CPU wheel (``+cpu``)
``import transformers.modeling_utils`` fails (``operator torchvision::nms does not exist``). The default
build runs on a machine without a GPU too. ``scripts/clients.sh llamafactory`` installs that in a
virtualenv of its own and runs this script on a tiny Llama with the model and optimizer overridden::

    python -m venv VENV
    VENV/bin/pip install --isolated torch==2.13.0                      # --isolated: PyPI's build, not a local CPU wheel
    VENV/bin/pip install --isolated llamafactory==0.9.5 torch==2.13.0  # torch named again: the newest torchvision would replace it
    VENV/bin/pip install --isolated --no-deps -e . && VENV/bin/pip install --isolated "pluggy>=1.5"
    VENV/bin/python examples/llamafactory_gmt.py examples/llamafactory_gmt.yaml model_name_or_path=TINY_MODEL \
        template=default output_dir=OUT bf16=false optim=sgd learning_rate=0.1 max_steps=4 save_steps=1 ...
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from gmt_plugins import GMTCallback, GMTConfig

PREFIX = "gmt_"


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], GMTConfig]:
    """(LLaMA-Factory's arguments, the GMTConfig of the ``gmt_*`` keys); an unknown ``gmt_*`` key is an error."""
    names = [f.name for f in dataclasses.fields(GMTConfig)]
    gmt = {key[len(PREFIX):]: value for key, value in config.items() if key.startswith(PREFIX)}
    unknown = sorted(set(gmt) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {[PREFIX + k for k in unknown]}; GMT keys are {[PREFIX + n for n in names]}")
    rest = {key: value for key, value in config.items() if not key.startswith(PREFIX)}
    return rest, GMTConfig(**gmt)


def read_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """The YAML mapping at ``path`` with ``key=value`` overrides (values parsed as YAML scalars)."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} must contain a YAML mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        config[key] = yaml.safe_load(value)
    return config


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    args, gmt = split_config(read_config(argv[0], argv[1:]))
    from llamafactory.train.tuner import run_exp

    print(f"GMT: {gmt}")
    run_exp(args, callbacks=[GMTCallback(gmt)])


if __name__ == "__main__":
    main(sys.argv[1:])
