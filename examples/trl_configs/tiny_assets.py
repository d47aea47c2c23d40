"""Write a tiny Llama (built in-process, random weights) and tiny JSONL data sets for the configs beside this file.

    python examples/trl_configs/tiny_assets.py            # -> outputs/tiny/{model/, sft.jsonl, preference.jsonl, prompts.jsonl}

The YAML files name these paths relative to the directory you run from; for real runs, put your model and data
sets in `model_name_or_path` and `datasets` instead.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(folder: Path, n: int = 32) -> None:
    from gmt_plugins.testing import sentences, tiny_llama, tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama().save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    write_jsonl(folder / "sft.jsonl", [{"text": s} for s in sentences(n)])
    write_jsonl(folder / "preference.jsonl", [
        {"prompt": p, "chosen": " " + c, "rejected": " " + r}
        for p, c, r in zip(sentences(n, 1), sentences(n, 2), sentences(n, 3))
    ])
    write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in sentences(n, 1)])
    print(f"wrote {folder}/model, sft.jsonl, preference.jsonl, prompts.jsonl")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="outputs/tiny", type=Path)
    main(parser.parse_args().folder)
