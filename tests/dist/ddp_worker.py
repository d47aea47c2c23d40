"""Worker of tests/test_distributed.py: TRL's SFTTrainer + GMTCallback under DDP, 2 CPU processes, gloo.

Run with ``torchrun --nproc_per_node 2 tests/dist/ddp_worker.py OUT_DIR``. Each rank trains on its own
batches; at ``on_pre_optimizer_step`` the gradients are already all-reduced. Each rank saves, per
optimizer step, the gradients GMTCallback saw (before), what it left (after), the parameters, and
what every built-in strategy does to a copy of the same gradients ("shadow" maskers), to
``OUT_DIR/rank<r>.pt``. The pytest process checks the ranks agree bit for bit and replays every
step in one process.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import TrainerCallback  # noqa: E402

from gmt_plugins import GMTCallback, GradientMasker  # noqa: E402
from gmt_plugins.plugins import get_plugin_manager, strategy_registry  # noqa: E402
from tiny import cpu_args, text_dataset, tiny_llama, tiny_tokenizer  # noqa: E402

MAIN = dict(strategy="gmt", scope="global", mask_ratio=0.3, strict=True)
STEPS = 3
SHADOW_RATIO = 0.3


class Probe(TrainerCallback):
    """Before GMTCallback: the all-reduced gradients; after it: the masked ones; and the shadows."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.named = list(model.named_parameters())
        self.steps: list[dict] = []
        names = strategy_registry(get_plugin_manager()).names()
        self.shadow_params = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in self.named]
        self.shadows = {s: GradientMasker(self.shadow_params, strategy=s, mask_ratio=SHADOW_RATIO, mask_seed=5) for s in names}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        pre = {n: p.grad.detach().clone() for n, p in self.named if p.grad is not None}
        before = {n: p.detach().clone() for n, p in self.named}
        shadow_out = {}
        with torch.no_grad():
            for strategy, masker in self.shadows.items():
                for n, sp in self.shadow_params:
                    sp.copy_(before[n])
                    sp.grad = pre[n].clone() if n in pre else None
                masker.step = state.global_step
                stats = masker.apply()
                shadow_out[strategy] = {"post": {n: sp.grad.clone() for n, sp in self.shadow_params if sp.grad is not None}, "masked": stats.masked}
        self.steps.append({"step": state.global_step, "pre": pre, "before": before, "shadow": shadow_out})


class AfterMask(TrainerCallback):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.probe.steps[-1]["post"] = {n: p.grad.detach().clone() for n, p in self.probe.named if p.grad is not None}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.probe.steps[-1]["after"] = {n: p.detach().clone() for n, p in self.probe.named}


def main() -> None:
    from trl import SFTConfig, SFTTrainer

    out = sys.argv[1]
    model = tiny_llama()
    config = SFTConfig(
        output_dir=os.path.join(out, "run"),
        **cpu_args(max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=32,
                   learning_rate=0.01, lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.1, ddp_backend="gloo"),
    )
    callback = GMTCallback(**MAIN)
    trainer = SFTTrainer(model=model, args=config, train_dataset=text_dataset(), processing_class=tiny_tokenizer(), callbacks=[callback])
    probe = Probe(trainer.model)
    trainer.callback_handler.callbacks.insert(0, probe)  # before GMTCallback (which moves itself first at init)
    trainer.callback_handler.callbacks.append(AfterMask(probe))
    trainer.train()
    rank = trainer.args.process_index
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "wrapped": type(trainer.model_wrapped).__name__,
            "steps": probe.steps,
            "stats": [s.masked for s in [callback.last_stats]],
            "log_history": trainer.state.log_history,
            "final": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
