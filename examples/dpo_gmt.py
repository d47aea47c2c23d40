"""DPO with LoRA and GMT, offline (the adapter-disabled model is the reference).

    python examples/dpo_gmt.py --tiny
    python examples/dpo_gmt.py           # GSM8K answers vs. the same answers with a wrong final number
"""

from common import cpu_training_args, model_and_tokenizer, parser, preference_dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from gmt_plugins import GMTCallback, GMTConfig


def main() -> None:
    args = parser(__doc__).parse_args()
    model, tokenizer = model_and_tokenizer(args.tiny)
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(max_length=256, **{**cpu_training_args(args), "learning_rate": 5e-5}),
        train_dataset=preference_dataset(args.tiny),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        callbacks=[GMTCallback(config=GMTConfig(mask_ratio=0.2, scope="global"))],
    )
    trainer.train()
    last = [e for e in trainer.state.log_history if "gmt/masked_fraction" in e][-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}, masked fraction {last['gmt/masked_fraction']:.3f}")


if __name__ == "__main__":
    main()
