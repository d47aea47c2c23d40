"""Full fine-tuning with TRL's SFTTrainer and GMT, offline.

    python examples/sft_gmt.py --tiny            # seconds: tiny model built in-process
    python examples/sft_gmt.py                   # embedded SmolLM2-135M on GSM8K's training split
"""

from common import cpu_training_args, model_and_tokenizer, parser, sft_dataset
from trl import SFTConfig, SFTTrainer

from gmt_plugins import GMTCallback


def main() -> None:
    args = parser(__doc__).parse_args()
    model, tokenizer = model_and_tokenizer(args.tiny)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(max_length=256, **cpu_training_args(args)),
        train_dataset=sft_dataset(args.tiny),
        processing_class=tokenizer,
        callbacks=[GMTCallback(mask_ratio=0.2)],
    )
    trainer.train()
    last = [e for e in trainer.state.log_history if "gmt/masked_fraction" in e][-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}, masked fraction {last['gmt/masked_fraction']:.3f}")


if __name__ == "__main__":
    main()
