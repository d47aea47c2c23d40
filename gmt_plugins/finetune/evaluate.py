"""Held-out evaluation: answer-token loss and (optionally) exact match of the final ``#### <number>``."""

from __future__ import annotations

import math
import re
from typing import Any

from gmt_plugins.finetune.data import IGNORE_INDEX, PadCollator, SFTData

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
# A model that has not learned to stop after its answer starts the next problem: stop it there.
STOP_STRINGS = ["\nQuestion:", "\n\n\n"]


def heldout_answer_loss(model: Any, data: SFTData, *, batch_size: int = 8, pad_id: int = 0) -> dict[str, float]:
    """Mean cross-entropy over the answer tokens of ``data`` (token-weighted), and its perplexity.

    Examples are batched by length (longest first) so padding costs little; the model is put in
    eval mode and restored afterwards.
    """
    import torch

    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: -len(data[i]["input_ids"]))
    collate = PadCollator(pad_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = collate([data[i] for i in order[start : start + batch_size]])
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
                keep = labels != IGNORE_INDEX
                losses = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
                total += float(losses)
                count += int(keep.sum())
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count and loss < 50 else float("inf"), "tokens": float(count), "examples": float(len(data))}


def final_number(text: str) -> str | None:
    """The number after the last ``####`` (commas and a trailing ``.0`` removed); ``None`` if there is none."""
    matches = _FINAL.findall(text)
    return normalize_number(matches[-1]) if matches else None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def normalize_number(raw: str) -> str:
    value = raw.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value or "0"


def exact_match(
    model: Any, tokenizer: Any, data: SFTData, *, limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 8
) -> dict[str, Any]:
    """Greedy-decode an answer for each prompt and compare its ``#### <number>`` with the reference one.

    Only examples whose reference answer has a ``####`` number count. A generation without ``####``
    scores 0 (its last number is still reported in ``samples`` for inspection).
    """
    import torch

    items = []
    for row, prompt in zip(data.rows, data.prompts):
        reference = row.get("answer") if data.fmt == "question/answer" else row.get("completion")
        gold = final_number(reference or "")
        if gold is not None and prompt:
            items.append((prompt, gold))
    items = items[:limit] if limit is not None else items
    if not items:
        return {"accuracy": float("nan"), "n": 0, "samples": []}
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    correct, samples = 0, []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True).to(device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, stop_strings=STOP_STRINGS, tokenizer=tokenizer,
                )
                for (prompt, gold), ids in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
                    text = tokenizer.decode(ids, skip_special_tokens=True).split("\nQuestion:")[0]
                    predicted = final_number(text)
                    correct += predicted == gold
                    samples.append({"prompt": prompt, "generated": text, "predicted": predicted, "gold": gold})
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return {"accuracy": correct / len(items), "n": len(items), "samples": samples}
