"""The LLaMA-Factory recipe (examples/llamafactory_gmt.py): its config handling and its dataset folder.

LLaMA-Factory 0.9.5 pins transformers<=5.6.0, trl<=0.24.0 and peft<=0.18.1, below this project's
stack, so it is not installed here; ``scripts/clients.sh llamafactory`` runs the recipe with
LLaMA-Factory's ``run_exp`` in a virtualenv of its own (tests/test_clients.py, GMT_PLUGINS_CLIENTS=1)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gmt_plugins import GMTConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("llamafactory_gmt", EXAMPLES / "llamafactory_gmt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_config_splits_into_llamafactory_args_and_a_gmt_config(recipe):
    args, gmt = recipe.split_config(recipe.read_config(str(EXAMPLES / "llamafactory_gmt.yaml"), ["gmt_mask_ratio=0.3", "learning_rate=2.0e-5"]))
    assert gmt == GMTConfig(mask_ratio=0.3, scope="tensor", strategy="gmt")
    assert not [k for k in args if k.startswith("gmt")]
    assert args["stage"] == "sft" and args["learning_rate"] == 2e-5 and args["finetuning_type"] == "full"


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"gmt_mask_ratio": 1.5}, "mask_ratio must be in [0, 1)"),
        ({"gmt_ratio": 0.2}, "unknown key(s) ['gmt_ratio']"),
    ],
)
def test_bad_gmt_keys_fail_before_llamafactory_runs(recipe, config, needle):
    with pytest.raises(ValueError) as info:
        recipe.split_config({"stage": "sft", **config})
    assert needle in str(info.value)


def test_the_example_config_names_a_dataset_shipped_beside_it(recipe):
    """LLaMA-Factory's pip wheel has no data/ folder: dataset_dir holds the dataset and its dataset_info.json."""
    args, _ = recipe.split_config(recipe.read_config(str(EXAMPLES / "llamafactory_gmt.yaml"), []))
    folder = EXAMPLES.parent / args["dataset_dir"]  # relative to the repository root, where the recipe runs
    info = json.loads((folder / "dataset_info.json").read_text())
    entry = info[args["dataset"]]
    records = json.loads((folder / entry["file_name"]).read_text())
    columns = entry["columns"]
    assert records and all(set(r) == {columns["prompt"], columns["query"], columns["response"]} for r in records)
    assert all(r[columns["prompt"]] and r[columns["response"]] for r in records)
