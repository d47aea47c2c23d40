"""Full fine-tuning with TRL's SFTTrainer and GMT on several GPUs: DeepSpeed ZeRO-2/3 or FSDP2.

    accelerate launch --config_file examples/accelerate_configs/zero2.yaml examples/sft_multi_gpu.py
    accelerate launch --config_file examples/accelerate_configs/zero3.yaml examples/sft_multi_gpu.py
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml examples/sft_multi_gpu.py

The script is the single-GPU one: the launcher's config chooses the sharding, and GMTCallback
masks exactly what one process would mask (per tensor or globally) in each case. Add --tiny for a
2-layer model built in-process (seconds).

The three launcher configs need GPUs. Without one, run the script as one CPU process (fp32):

    python examples/sft_multi_gpu.py --tiny
"""

import os
import sys

import torch
from common import model_and_tokenizer, parser, sft_dataset
from trl import SFTConfig, SFTTrainer

from gmt_plugins import GMTCallback

GPU_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP"}


def refuse_gpu_launch_without_gpu() -> None:
    """The launcher configs above shard over GPUs; on a machine without one, say so instead of failing later."""
    chosen = [name for var, name in GPU_LAUNCH.items() if os.environ.get(var, "").lower() == "true"]
    if chosen and not torch.cuda.is_available():
        sys.exit(
            f"sft_multi_gpu.py: error: the launcher config asks for {chosen[0]}, which this example runs on GPUs, and "
            "no GPU is visible. Without a GPU run it as one CPU process: python examples/sft_multi_gpu.py --tiny"
        )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--scope", default="global", choices=("tensor", "global"))
    args = p.parse_args()
    refuse_gpu_launch_without_gpu()
    on_gpu = torch.cuda.is_available()
    model, tokenizer = model_and_tokenizer(args.tiny)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=4,
            learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to="none", max_length=256,
            bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu,
        ),
        train_dataset=sft_dataset(args.tiny, n=256),
        processing_class=tokenizer,
        callbacks=[GMTCallback(mask_ratio=0.2, scope=args.scope)],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        last = [e for e in trainer.state.log_history if "gmt/masked_fraction" in e][-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, masked fraction {last['gmt/masked_fraction']:.3f}")


if __name__ == "__main__":
    main()
