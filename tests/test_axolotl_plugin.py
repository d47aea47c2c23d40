"""The Axolotl plugin (integrations/axolotl, package ``gmt_axolotl``) against Axolotl's real ``PluginManager``
and config schema: loading by dotted path, the merged ``gmt_*`` keys, pydantic errors naming the key, and
a tiny Trainer that receives a ``GMTCallback`` configured from YAML values and masks with them. ``axolotl train``
itself runs in a full Axolotl install of its own: scripts/clients.sh (tests/test_clients.py, GMT_PLUGINS_CLIENTS=1)."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("axolotl.integrations.base", reason="axolotl not installed (scripts/setup.sh installs it --no-deps)")
pytest.importorskip("gmt_axolotl", reason="the plugin package is not installed: pip install --no-deps -e integrations/axolotl")

import yaml  # noqa: E402 - after the skips above
from axolotl.integrations.base import BasePlugin, PluginManager  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from gmt_plugins import GMTCallback  # noqa: E402
from gmt_plugins.config import GMTConfig  # noqa: E402

from tiny import cpu_args, tiny_llama, tiny_tokenizer  # noqa: E402

PLUGIN = "gmt_axolotl.GMTPlugin"
# The smallest config Axolotl's validate_config accepts; the paths are never opened by validation.
BASE_YAML = """
base_model: ./tiny-llama
datasets:
  - path: ./data.jsonl
    type: alpaca
micro_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 0.001
num_epochs: 1
output_dir: ./out
plugins:
  - gmt_axolotl.GMTPlugin
"""


@pytest.fixture(scope="module")
def plugin_manager():
    """Axolotl's singleton PluginManager with the plugin registered by its dotted path (removed afterwards)."""
    pm = PluginManager.get_instance()
    pm.register(PLUGIN)
    yield pm
    pm.plugins.pop(PLUGIN, None)


def validated(yaml_text: str) -> DictDefault:
    from axolotl.utils.config import validate_config

    return validate_config(DictDefault(yaml.safe_load(BASE_YAML + yaml_text)))


def test_the_plugin_manager_loads_the_plugin_by_its_dotted_path(plugin_manager):
    from gmt_axolotl import GMTPlugin

    plugin = plugin_manager.plugins[PLUGIN]
    assert isinstance(plugin, GMTPlugin) and isinstance(plugin, BasePlugin)
    assert "gmt_axolotl.args.GMTArgs" in plugin_manager.get_input_args()


def test_the_merged_schema_carries_every_gmt_key(plugin_manager):
    from axolotl.integrations.config import merge_input_args

    _, input_config = merge_input_args()
    expected = {"gmt_enabled"} | {f"gmt_{f.name}" for f in dataclasses.fields(GMTConfig)}
    assert expected <= set(input_config.model_fields)
    assert "Fraction of the selected gradient entries" in input_config.model_fields["gmt_mask_ratio"].description


def test_yaml_values_pass_axolotl_validation_normalised(plugin_manager):
    cfg = validated("gmt_mask_ratio: 0.3\ngmt_scope: global\ngmt_strategy_options: '{}'\ngmt_exclude: embed\n")
    assert (cfg.gmt_mask_ratio, cfg.gmt_scope, cfg.gmt_strategy_options, cfg.gmt_exclude) == (0.3, "global", {}, ["embed"])
    assert cfg.gmt_mask_seed is None  # unset keys stay unset: GMTConfig's defaults apply


@pytest.mark.parametrize(
    ("yaml_text", "key", "needle"),
    [
        ("gmt_mask_ratio: 1.5\n", "gmt_mask_ratio", "gmt_mask_ratio must be in [0, 1), got 1.5"),
        ("gmt_mask_ratio: abc\n", "gmt_mask_ratio", "gmt_mask_ratio must be a number in [0, 1), got 'abc'"),
        ("gmt_scope: layer\n", "gmt_scope", "gmt_scope must be one of ('tensor', 'global'), got 'layer'"),
        ("gmt_strict: maybe\n", "gmt_strict", "valid boolean"),
        ("gmt_strategy: nosuch\n", "gmt_strategy", "unknown strategy 'nosuch'; registered strategies: dsee, gmt"),
        ("gmt_strategy_options: '{oops'\n", "gmt_strategy_options", "strategy_options must be a JSON object"),
        ("gmt_mask_seed: -1\n", "gmt_mask_seed", "gmt_mask_seed must be a non-negative integer"),
        ("gmt_include: ['(']\n", "gmt_include", "is not a valid regular expression"),
        ("gmt_chunk_numel: 10\n", "gmt_chunk_numel", "gmt_chunk_numel must be an integer >= 1024"),
    ],
)
def test_a_bad_value_fails_axolotl_validation_naming_the_key(plugin_manager, yaml_text, key, needle):
    with pytest.raises(ValidationError) as info:
        validated(yaml_text)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(key,)], errors
    assert needle in errors[0]["msg"]
    assert key in str(info.value)


def test_the_trainer_gets_a_gmt_callback_configured_from_yaml(plugin_manager, tmp_path):
    from transformers import Trainer, TrainingArguments

    from gmt_plugins.finetune.data import PadCollator, build_dataset
    from tiny import WORDS

    cfg = validated("gmt_mask_ratio: 0.3\ngmt_scope: global\ngmt_mask_seed: 3\ngmt_exclude: ['embed_tokens']\n")
    tok = tiny_tokenizer()
    rows = [{"text": " ".join(WORDS[i % 9 : i % 9 + 7])} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, **cpu_args(remove_unused_columns=False))
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=build_dataset(rows, tok, 32), data_collator=PadCollator(tok.pad_token_id))
    callbacks = plugin_manager.add_callbacks_post_trainer(cfg, trainer)  # what Axolotl's trainer builder calls
    assert [type(c) for c in callbacks] == [GMTCallback]
    callback = callbacks[0]
    assert callback.config == GMTConfig(mask_ratio=0.3, scope="global", mask_seed=3, exclude=["embed_tokens"])
    for c in callbacks:
        trainer.add_callback(c)
    plugin_manager.post_trainer_create(cfg, trainer)  # what axolotl.train calls next: GMT goes before the reporters
    assert trainer.callback_handler.callbacks[0] is callback and callback.before_reporters
    trainer.train()
    fractions = [h["gmt/masked_fraction"] for h in trainer.state.log_history if "gmt/masked_fraction" in h]
    assert len(fractions) == 2 and all(f == pytest.approx(0.3, abs=1e-3) for f in fractions)
    names = callback.masker.names
    assert names and not [n for n in names if "embed_tokens" in n]


def test_gmt_enabled_false_adds_no_callback(plugin_manager):
    cfg = validated("gmt_enabled: false\ngmt_mask_ratio: 0.3\n")
    assert plugin_manager.plugins[PLUGIN].add_callbacks_post_trainer(cfg, trainer=None) == []
