"""GRPO with Gradient-Mask Tuning, offline, with a toy reward: shorter completions score higher.

    python examples/grpo_gmt.py --tiny      # a 2-layer Llama built in-process; seconds on CPU
    python examples/grpo_gmt.py             # the embedded SmolLM2-135M-Instruct on GSM8K questions

The reward function is importable on its own (nothing heavy at import time), so `gmt-plugins grpo` can name it:
`reward_funcs: [examples.grpo_gmt.shorter_completions]` run from the repository root
(see examples/trl_configs/grpo.yaml).
"""

from __future__ import annotations


def shorter_completions(completions: list, **kwargs) -> list[float]:
    """Minus the completion's length in characters, over 100: shorter completions get more reward."""
    return [-len(c if isinstance(c, str) else c[-1]["content"]) / 100 for c in completions]


def main() -> None:
    from common import cpu_training_args, model_and_tokenizer, parser, sft_dataset
    from trl import GRPOConfig, GRPOTrainer

    from gmt_plugins import GMTCallback

    p = parser(__doc__)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    args = p.parse_args()
    model, tokenizer = model_and_tokenizer(args.tiny)
    config = GRPOConfig(
        num_generations=4, max_completion_length=16 if args.tiny else 64, num_iterations=2,
        **{**cpu_training_args(args), "per_device_train_batch_size": 4, "learning_rate": 1e-3 if args.tiny else 1e-6},
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=shorter_completions, args=config,
        train_dataset=sft_dataset(args.tiny, n=16).select_columns(["prompt"]), processing_class=tokenizer,
        callbacks=[GMTCallback(mask_ratio=args.mask_ratio)],
    )
    trainer.train()
    reward = None
    for entry in trainer.state.log_history:
        reward = entry.get("reward", reward)  # logged when a batch is generated; num_iterations=2 reuses it once
        if "gmt/masked_fraction" in entry:
            print(
                f"step {entry['step']}: reward {reward:.3f}, masked fraction {entry['gmt/masked_fraction']:.3f} "
                f"({int(entry['gmt/masked'])}/{int(entry['gmt/entries'])} entries)"
            )

if __name__ == "__main__":
    main()
