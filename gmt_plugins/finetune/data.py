"""JSONL data for supervised fine-tuning, tokenized with answer-only labels.

Three row formats are accepted (the first that every row has wins):

* ``question`` + ``answer`` (GSM8K): prompt ``"Question: {question}\\nAnswer:"``, completion ``" {answer}"``;
* ``prompt`` + ``completion``: used as they are;
* ``text``: no prompt, every token is trained on.

Labels are ``-100`` on prompt tokens (and padding), so the loss covers the completion and the EOS
token appended to it. Sequences are cut at ``max_length`` from the right; an example whose prompt
fills ``max_length`` has no answer token left and is dropped (counted in :class:`SFTData`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmt_plugins.finetune import FinetuneError

IGNORE_INDEX = -100
FORMATS = {"question/answer": ("question", "answer"), "prompt/completion": ("prompt", "completion"), "text": ("text",)}
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file, a bad line or an empty file is a :class:`FinetuneError`."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FinetuneError(f"{path}:{number} is not valid JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise FinetuneError(f"{path}:{number} is not a JSON object")
            rows.append(row)
    if not rows:
        raise FinetuneError(f"data file {path} has no rows")
    return rows


def detect_format(rows: Sequence[dict[str, Any]], source: str = "data") -> str:
    """The first of :data:`FORMATS` whose columns every row has, as non-empty strings."""
    for name, columns in FORMATS.items():
        if all(all(isinstance(row.get(c), str) for c in columns) for row in rows):
            return name
    seen = sorted({key for row in rows[:100] for key in row})
    expected = " or ".join("+".join(c) for c in FORMATS.values())
    raise FinetuneError(f"{source} has columns {seen}; every row needs string columns {expected}")


def prompt_completion(row: dict[str, Any], fmt: str) -> tuple[str, str]:
    if fmt == "question/answer":
        return QUESTION_TEMPLATE.format(question=row["question"].strip()), " " + row["answer"].strip()
    if fmt == "prompt/completion":
        return row["prompt"], row["completion"]
    if fmt == "text":
        return "", row["text"]
    raise FinetuneError(f"unknown data format {fmt!r}; known: {sorted(FORMATS)}")


def tokenize_example(tokenizer: Any, prompt: str, completion: str, max_length: int) -> dict[str, list[int]] | None:
    """``input_ids``/``attention_mask``/``labels`` with ``-100`` on the prompt; ``None`` if no label survives.

    Prompt and completion are tokenized separately (so the boundary is exact) and an EOS token is
    appended to the completion when the tokenizer has one.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=not prompt)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class SFTData:
    """Tokenized examples (a map-style dataset the Trainer can use) plus their source rows."""

    examples: list[dict[str, list[int]]]
    rows: list[dict[str, Any]]
    fmt: str
    dropped: int = 0
    source: str = ""
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    @property
    def answer_tokens(self) -> int:
        return sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in self.examples)


def build_dataset(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, *, source: str = "data", fmt: str | None = None) -> SFTData:
    """Tokenize ``rows`` (format detected unless given); rows left without answer tokens are dropped."""
    if max_length < 2:
        raise FinetuneError(f"max_length must be at least 2, got {max_length}")
    if not rows:
        raise FinetuneError(f"{source} has no rows")
    fmt = fmt or detect_format(rows, source)
    examples, kept, prompts, dropped = [], [], [], 0
    for row in rows:
        prompt, completion = prompt_completion(row, fmt)
        example = tokenize_example(tokenizer, prompt, completion, max_length)
        if example is None:
            dropped += 1
            continue
        examples.append(example)
        kept.append(row)
        prompts.append(prompt)
    if not examples:
        raise FinetuneError(f"{source}: every prompt fills max_length={max_length}; no answer token is left to train on")
    return SFTData(examples, kept, fmt, dropped, source, prompts)


def ensure_pad_token(tokenizer: Any) -> None:
    """Causal-LM tokenizers often have no pad token: reuse EOS (padding is masked out of the loss anyway)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise FinetuneError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


class PadCollator:
    """Right-pads a batch to its longest example: ``pad_id`` in ``input_ids``, 0 in the mask, -100 in labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        pad = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long)
            for key, value in pad.items()
        }


def load_rows(dataset_path: str | None, eval_dataset_path: str | None) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, description): the embedded GSM8K split when ``dataset_path`` is None,
    else the JSONL, split 80/20 by a hash of each prompt unless ``eval_dataset_path`` gives the held-out rows."""
    from gmt_plugins.finetune import assets

    if dataset_path is None:
        train, heldout = assets.gsm8k_split()
        source = f"embedded GSM8K ({assets.gsm8k_path()}), hash split {len(train)} train / {len(heldout)} held out"
    else:
        rows = load_jsonl(dataset_path)
        fmt = detect_format(rows, dataset_path)
        if eval_dataset_path is None:
            train, heldout = assets.split_rows(rows, FORMATS[fmt][0])
            if not train or not heldout:
                raise FinetuneError(
                    f"{dataset_path} has {len(rows)} rows: too few to hold 20% out; pass --eval_dataset_path"
                )
            source = f"{dataset_path}, hash split {len(train)} train / {len(heldout)} held out"
        else:
            train = rows
            source = f"{dataset_path} ({len(train)} rows)"
    if eval_dataset_path is not None:
        heldout = load_jsonl(eval_dataset_path)
        detect_format(heldout, eval_dataset_path)
        source += f", held out: {eval_dataset_path} ({len(heldout)} rows)"
    return train, heldout, source
