"""Tiny models, tokenizers and datasets built in-process, for tests and offline examples: nothing is downloaded."""

from __future__ import annotations

import functools

import torch

WORDS = "question answer the cat sat on a mat and dog ran to big red ball is good bad yes no one two three four five six seven".split()


@functools.lru_cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process; it has the whole byte alphabet, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + " Question: Answer: #### 12" for i in range(len(WORDS))]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    tok = tiny_tokenizer()
    config = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


def sentences(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8,), generator=gen)) for _ in range(n)]


def text_dataset(n: int = 32):
    from datasets import Dataset

    return Dataset.from_dict({"text": sentences(n)})


def preference_dataset(n: int = 16):
    from datasets import Dataset

    prompts, chosen, rejected = sentences(n, 1), sentences(n, 2), sentences(n, 3)
    return Dataset.from_dict({"prompt": prompts, "chosen": [" " + c for c in chosen], "rejected": [" " + r for r in rejected]})


def cpu_args(**overrides):
    """TrainingArguments fields every CPU test uses."""
    args = dict(
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
    )
    args.update(overrides)
    return args
