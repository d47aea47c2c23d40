"""LoRA + bitsandbytes 8-bit AdamW + GMT in strict mode, offline.

GMT masks only the LoRA adapter gradients (the frozen base is never touched). With an 8-bit
optimizer a zero gradient still moves an entry (its quantized state is never exactly zero), so
strict mode holds masked entries bit-identical through each step.

    python examples/lora_8bit_gmt.py --tiny
    python examples/lora_8bit_gmt.py
"""

from common import cpu_training_args, model_and_tokenizer, parser, sft_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from gmt_plugins import GMTCallback


def main() -> None:
    args = parser(__doc__).parse_args()
    model, tokenizer = model_and_tokenizer(args.tiny)
    gmt = GMTCallback(mask_ratio=0.3, strict=True)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(max_length=256, optim="adamw_bnb_8bit", **{**cpu_training_args(args), "learning_rate": 1e-4}),
        train_dataset=sft_dataset(args.tiny),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        callbacks=[gmt],
    )
    trainer.train()
    print(f"optimizer: {gmt.optimizer_info.family} (quantized state: {gmt.optimizer_info.quantized_state})")
    print(f"masked {len(gmt.masker.parameters)} adapter tensors; last step masked fraction {gmt.last_stats.fraction:.3f}")


if __name__ == "__main__":
    main()
