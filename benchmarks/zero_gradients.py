"""How much of a GMT mask falls on gradients that are exactly zero (evidence for ``ratio_of``).

One backward pass of a real batch (real tokenizer, real text) through a model built from a config
(random weights: which gradient entries are exactly zero depends on the tokens, not on the weights),
then, on copies of the same gradients, GMT at ``mask_ratio`` in both scopes, with ``ratio_of="all"``
(the default) and ``"nonzero"``. Printed per run: the entries with a zero gradient, the masked
entries, how many of them were nonzero (``masked_nonzero``), and the masked fraction of the nonzero
entries.

    OMP_NUM_THREADS=1 python benchmarks/zero_gradients.py --model minilm     # MiniLM-L6 + movie reviews
    OMP_NUM_THREADS=1 python benchmarks/zero_gradients.py --model smollm2    # SmolLM2-135M + GSM8K
    OMP_NUM_THREADS=1 python benchmarks/zero_gradients.py --model tiny       # 2-layer Llama, 400-token vocabulary

The MiniLM and SmolLM2 configs and tokenizers come from the packages :mod:`gmt_plugins.finetune.assets`
names (nothing is downloaded); ``tiny`` needs nothing.
"""

from __future__ import annotations

import argparse

import torch

from gmt_plugins import GradientMasker


def minilm_batch(batch: int, length: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from gmt_plugins.finetune import assets

    folder = assets.minilm_dir()
    config = AutoConfig.from_pretrained(folder, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = assets.movie_reviews()[:batch]
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=length, return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    return model, lambda: model(**enc, labels=labels).loss


def smollm2_batch(batch: int, length: int):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gmt_plugins.finetune import assets

    folder = assets.smollm2_dir()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    tok = AutoTokenizer.from_pretrained(folder)
    rows = assets.gsm8k_rows()[:batch]
    enc = tok([r["question"] + "\n" + r["answer"] for r in rows], padding=True, truncation=True, max_length=length, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model, lambda: model(**enc, labels=labels).loss


def tiny_batch(batch: int, length: int):
    from gmt_plugins.testing import sentences, tiny_llama, tiny_tokenizer

    model = tiny_llama()
    tok = tiny_tokenizer()
    enc = tok(sentences(batch), padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model, lambda: model(**enc, labels=labels).loss


MODELS = {"minilm": minilm_batch, "smollm2": smollm2_batch, "tiny": tiny_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mask-ratio", type=float, default=0.2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, loss = MODELS[args.model](args.batch, args.length)
    loss().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    grads = {n: p.grad.detach().clone() for n, p in params}
    total = sum(g.numel() for g in grads.values())
    zeros = sum(int((g == 0).sum()) for g in grads.values())
    biggest = max(grads, key=lambda n: grads[n].numel())
    big_zeros = int((grads[biggest] == 0).sum())
    print(f"model {args.model}: {len(grads)} tensors, {total:,} entries; batch {args.batch} x <= {args.length} tokens")
    print(f"zero gradient entries: {zeros:,} ({zeros / total:.1%}); largest tensor {biggest} ({grads[biggest].numel() / total:.0%} of "
          f"the entries): {big_zeros / grads[biggest].numel():.1%} zero")
    print(f"mask_ratio {args.mask_ratio}")
    print("| scope | ratio_of | masked | of the entries | masked_nonzero | masked that were zero | nonzero entries masked |")
    print("|---|---|---:|---:|---:|---:|---:|")
    nonzero_total = total - zeros
    for scope in ("tensor", "global"):
        for ratio_of in ("all", "nonzero"):
            copies = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
            for n, p in copies:
                p.grad = grads[n].clone()
            stats = GradientMasker(copies, mask_ratio=args.mask_ratio, scope=scope, ratio_of=ratio_of).apply()
            zero_share = 1 - stats.masked_nonzero / stats.masked if stats.masked else 0.0
            print(f"| {scope} | {ratio_of} | {stats.masked:,} | {stats.fraction:.1%} | {stats.masked_nonzero:,} | {zero_share:.1%} | "
                  f"{stats.masked_nonzero / nonzero_total:.1%} |")


if __name__ == "__main__":
    main()
