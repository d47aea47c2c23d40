"""Save a tiny Llama (2 layers, hidden size 64) and its in-process tokenizer to a folder, for the client runs.

Run inside a client's own virtualenv (its transformers writes the files it will read back):

    python scripts/clients/build_tiny.py OUT_DIR

Nothing is downloaded: the model comes from a LlamaConfig with a fixed seed, the byte-level BPE
tokenizer from gmt_plugins.testing.
"""

from __future__ import annotations

import sys

from gmt_plugins.testing import tiny_llama, tiny_tokenizer


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    tiny_llama(seed=0).save_pretrained(argv[0])
    tiny_tokenizer().save_pretrained(argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
