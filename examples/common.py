"""What the examples share: the model, tokenizer and data, real (embedded SmolLM2 + GSM8K) or tiny."""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after OMP_NUM_THREADS

if not torch.cuda.is_available():
    # accelerate imports DeepSpeed whenever it is installed; told the device, DeepSpeed does not warn that it
    # "was unable to detect" a GPU in examples that never use it
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# peft imports bitsandbytes whenever it is installed, whose CPU backend warns that the `kernels` package for 4-bit
# matmuls is missing; these examples use no 4-bit layer (lora_8bit_gmt.py uses its 8-bit optimizer)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="a 2-layer Llama and tokenizer built in-process (seconds)")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--output-dir", default="outputs/example")
    return p


def model_and_tokenizer(tiny: bool):
    """The embedded SmolLM2-135M-Instruct (converted once to a local safetensors folder), or a tiny Llama."""
    if tiny:
        from gmt_plugins.testing import tiny_llama, tiny_tokenizer

        return tiny_llama(), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gmt_plugins.finetune.assets import smollm2_dir

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(folder), tokenizer


def sft_dataset(tiny: bool, n: int = 64):
    """prompt/completion pairs: GSM8K's training split, or tiny sentences."""
    from datasets import Dataset

    if tiny:
        from gmt_plugins.testing import sentences

        return Dataset.from_dict({"prompt": sentences(n, 1), "completion": [" " + s for s in sentences(n, 2)]})
    from gmt_plugins.finetune.assets import gsm8k_split

    train, _ = gsm8k_split()
    rows = train[:n]
    return Dataset.from_dict({"prompt": [f"Question: {r['question']}\nAnswer:" for r in rows], "completion": [" " + r["answer"] for r in rows]})


def preference_dataset(tiny: bool, n: int = 32):
    """prompt/chosen/rejected: GSM8K answers against the same answers with a wrong final number."""
    if tiny:
        from gmt_plugins.testing import preference_dataset as tiny_pairs

        return tiny_pairs(n)
    from datasets import Dataset

    data = sft_dataset(False, n)
    rejected = []
    for answer in data["completion"]:
        head, _, final = answer.rpartition("####")
        rejected.append(f"{head}#### {int(final.strip().replace(',', '') or 0) + 7}" if final.strip().lstrip("-").replace(",", "").isdigit() else answer + " 0")
    return Dataset.from_dict({"prompt": data["prompt"], "chosen": data["completion"], "rejected": rejected})


def cpu_training_args(args: argparse.Namespace) -> dict:
    return dict(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-5 if not args.tiny else 1e-3, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False, seed=0,
    )
