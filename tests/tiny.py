"""Re-exports of :mod:`gmt_plugins.testing` under the short name the tests use."""

from gmt_plugins.testing import (  # noqa: F401 - re-exports
    WORDS,
    cpu_args,
    preference_dataset,
    sentences,
    text_dataset,
    tiny_llama,
    tiny_llama_config,
    tiny_tokenizer,
)
