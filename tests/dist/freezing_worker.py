"""Worker of tests/test_freezing.py: TRL's SFTTrainer + GMTCallback(strategy="lisa") under DDP with
``ddp_find_unused_parameters=True``, 2 CPU processes, gloo.

Run with ``torchrun --nproc_per_node 2 tests/dist/freezing_worker.py OUT_DIR``. Each rank saves, per
optimizer step, the names frozen before the forward pass, the names without a gradient before the
optimizer step, and the parameters before and after it, to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import TrainerCallback  # noqa: E402

from gmt_plugins import GMTCallback  # noqa: E402
from tiny import cpu_args, text_dataset, tiny_llama, tiny_tokenizer  # noqa: E402


class Probe(TrainerCallback):
    def __init__(self, model: torch.nn.Module) -> None:
        self.named = list(model.named_parameters())
        self.steps: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append({
            "frozen": sorted(n for n, p in self.named if not p.requires_grad),
            "before": {n: p.detach().clone() for n, p in self.named},
        })

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps[-1]["no_grad"] = sorted(n for n, p in self.named if p.grad is None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in self.named}


def main(out_dir: str) -> None:
    from trl import SFTConfig, SFTTrainer

    model = tiny_llama(num_hidden_layers=4)
    callback = GMTCallback(strategy="lisa", strategy_options={"active_layers": 1, "interval": 1}, mask_seed=2)
    args = SFTConfig(
        output_dir=out_dir, **cpu_args(
            max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=32, learning_rate=1e-2,
            weight_decay=0.1, lr_scheduler_type="constant", ddp_find_unused_parameters=True, ddp_backend="gloo",
        ),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tiny_tokenizer(), callbacks=[callback])
    probe = Probe(model)
    trainer.callback_handler.callbacks.append(probe)  # after GMTCallback: sees what it froze
    trainer.train()
    rank = torch.distributed.get_rank()
    torch.save(probe.steps, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
