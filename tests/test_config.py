from __future__ import annotations

import pytest
import torch

from gmt_plugins import GMTConfig
from gmt_plugins.config import resolve_config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\)"),
        ({"mask_ratio": -0.1}, r"mask_ratio must be in \[0, 1\)"),
        ({"mask_ratio": "0.3"}, "mask_ratio must be a number"),
        ({"mask_ratio": True}, "mask_ratio must be a number"),
        ({"scope": "layer"}, r"scope must be one of \('tensor', 'global'\), got 'layer'"),
        ({"strategy": ""}, "strategy must be the name"),
        ({"strategy": "a b"}, "strategy must be the name"),
        ({"mask_seed": -1}, "mask_seed must be a non-negative integer"),
        ({"include": ["("]}, r"include pattern '\(' is not a valid regular expression"),
        ({"exclude": [3]}, "exclude must be a list of regular expressions"),
        ({"chunk_numel": 10}, "chunk_numel must be an integer >= 1024"),
        ({"strategy_options": "{not json"}, "strategy_options must be a JSON object"),
        ({"strategy_options": [1]}, "strategy_options must be a dict"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GMTConfig(**kwargs)


def test_defaults_and_normalisation():
    config = GMTConfig(include="layers", strategy="hft", strategy_options='{"interval": 3}', mask_ratio=0)
    assert config.include == ["layers"] and config.strategy_options == {"interval": 3} and config.mask_ratio == 0.0
    assert GMTConfig().strategy_options == {}


def test_matches():
    config = GMTConfig(include=[r"layers\.\d+\."], exclude=["norm", "embed"])
    assert config.matches("model.layers.0.mlp.up_proj.weight")
    assert not config.matches("model.layers.0.input_layernorm.weight")
    assert not config.matches("model.embed_tokens.weight")


def test_resolve_config_overrides_and_unknown():
    base = GMTConfig(mask_ratio=0.1)
    assert resolve_config(base, {"scope": "global"}).scope == "global"
    assert resolve_config(base, {}) is base
    with pytest.raises(TypeError, match=r"unknown GMTConfig field\(s\) \['ratio'\]"):
        resolve_config(None, {"ratio": 0.3})
    with pytest.raises(ValueError, match="mask_ratio"):
        resolve_config(base, {"mask_ratio": 2})


def test_hf_argument_parser_with_training_arguments():
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser((transformers.TrainingArguments, GMTConfig))
    args, gmt = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--use_cpu", "true", "--seed", "7", "--mask_ratio", "0.3", "--scope", "global",
         "--exclude", "norm", "embed", "--strict", "true", "--strategy", "gmt_momentum", "--strategy_options", '{"beta": 0.9}']
    )
    assert args.seed == 7 and gmt.mask_ratio == 0.3 and gmt.scope == "global" and gmt.strict
    assert gmt.exclude == ["norm", "embed"] and gmt.strategy_options == {"beta": 0.9}


@pytest.mark.parametrize("target", ["GradientMasker", "GMTCallback"])
def test_constructors_show_every_config_field_as_a_keyword(target):
    """help() and IDEs show the real keyword arguments: exactly GMTConfig's fields (plus plugin_manager),
    keyword-only, and a field not passed keeps the config's value."""
    import dataclasses
    import inspect

    import gmt_plugins

    cls = getattr(gmt_plugins, target)
    params = inspect.signature(cls.__init__).parameters
    keywords = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keywords == [f.name for f in dataclasses.fields(GMTConfig)] + ["plugin_manager"]
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    base = GMTConfig(mask_ratio=0.4, scope="global", mask_seed=9)
    args = ([("w", torch.nn.Parameter(torch.zeros(3)))],) if target == "GradientMasker" else ()
    made = cls(*args, base, strict=True)
    assert made.config == dataclasses.replace(base, strict=True)
    with pytest.raises(TypeError, match="mask_ration"):
        cls(*args, mask_ration=0.3)
