"""A Trainer around a 3-layer MLP on random data: fast enough to train, save and resume per strategy in a test."""

from __future__ import annotations

import torch
from torch import nn

from gmt_plugins.testing import cpu_args

OPTIONS = {
    "hft": {"interval": 1},
    "id3": {"steps_to_budget": 3},
    "ist": {"interval": 1},
    "lift": {"interval": 2, "rank": 2},
    "lisa": {"interval": 1, "active_layers": 1},
}
"""Strategy options that make every strategy change its state within a 4-step run."""


class TinyNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        out = self.head(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def dataset(n: int = 64, width: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, width, generator=g)
    y = x.sum(-1).sin()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def tiny_trainer(output_dir, callback, *, callbacks=(), trainer_class=None, **args):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    base = dict(
        max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-2, optim="adamw_torch",
        weight_decay=0.1, lr_scheduler_type="constant", save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True,
    )
    base.update(args)
    training_args = TrainingArguments(output_dir=str(output_dir), **cpu_args(**base))
    return (trainer_class or Trainer)(model=TinyNet(), args=training_args, train_dataset=dataset(), callbacks=[callback, *callbacks])


def params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
