"""GMTCallback inside TRL's online trainers (GRPO, RLOO) and KTO, on CPU with a tiny Llama.

What is checked, for each trainer: the mask acts once per optimizer step (counted against the optimizer's own
``step()`` calls and the micro-batches, also when GRPO/RLOO reuse one generation batch for several steps), the
entries it masked did not move under plain SGD (where a zero gradient means no update) while the others moved
by ``-lr * grad``, and the ``gmt/*`` statistics reach ``trainer.state.log_history``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from gmt_plugins import GMTCallback  # noqa: E402
from test_trainer_integration import LR, assert_sgd_steps_masked, attach_recorder, insert_after_gmt  # noqa: E402
from tiny import cpu_args, sentences, tiny_llama, tiny_tokenizer  # noqa: E402


class CountingSGD(torch.optim.SGD):
    """Plain SGD (no momentum, no weight decay: a zero gradient leaves the entry bit-identical) that counts its steps."""

    def __init__(self, params, lr: float = LR) -> None:
        super().__init__([p for p in params if p.requires_grad], lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def count_calls(obj, name: str) -> list[int]:
    """Wrap ``obj.name`` (an instance attribute from then on); the returned list's one item counts the calls."""
    calls = [0]
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


class MaskCounter(TrainerCallback):
    """Counts the masker's ``apply()`` calls (the masks actually taken), wrapped once GMTCallback has built it."""

    def __init__(self, gmt: GMTCallback) -> None:
        self.gmt = gmt
        self.applied = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.applied = count_calls(self.gmt.masker, "apply")


def count_masks(trainer, callback: GMTCallback) -> MaskCounter:
    counter = MaskCounter(callback)
    insert_after_gmt(trainer, counter)
    return counter


def shorter_is_better(completions, **kwargs) -> list[float]:
    """A toy reward: minus the completion's length, so the advantages (and gradients) are not zero."""
    return [-float(len(c)) for c in completions]


def prompts(n: int = 16):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": sentences(n, 1)})


def gmt_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "gmt/masked_fraction" in e]


def assert_once_per_optimizer_step(trainer, callback, counter, optimizer, micro_batches, *, steps: int, accumulation: int) -> None:
    logs = gmt_logs(trainer)
    assert optimizer.steps == steps == trainer.state.global_step
    assert micro_batches[0] == steps * accumulation  # every micro-batch ran; the mask acts on the accumulated sum only
    assert counter.applied[0] == steps
    assert callback.masker.step == steps
    assert [e["step"] for e in logs] == list(range(1, steps + 1))  # logging_steps=1: one log per step
    assert sum(e["gmt/steps"] for e in logs) == steps


def grpo_like(trainer_name: str, tmp_path, callback, *, steps: int, **config):
    import trl

    base = dict(
        max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
        max_completion_length=8, learning_rate=LR, lr_scheduler_type="constant",
    )
    base.update(config)
    args = getattr(trl, f"{trainer_name}Config")(output_dir=str(tmp_path), **cpu_args(**base))
    model = tiny_llama()
    optimizer = CountingSGD(model.parameters())
    trainer = getattr(trl, f"{trainer_name}Trainer")(
        model=model, reward_funcs=shorter_is_better, args=args, train_dataset=prompts(), processing_class=tiny_tokenizer(),
        callbacks=[callback], optimizers=(optimizer, None),
    )
    return trainer, optimizer


@pytest.mark.parametrize(
    ("num_iterations", "steps_per_generation", "generations"),
    [(1, None, 3), (2, 2, 2)],  # (2, 2): each generation batch (2 micro-batches) serves 2 optimizer steps
)
def test_grpo_masks_once_per_optimizer_step(tmp_path, num_iterations, steps_per_generation, generations):
    steps = 2 * generations if num_iterations == 2 else generations
    callback = GMTCallback(mask_ratio=0.5)
    trainer, optimizer = grpo_like(
        "GRPO", tmp_path, callback, steps=steps, num_iterations=num_iterations, steps_per_generation=steps_per_generation,
    )
    generated = count_calls(trainer, "_generate_and_score_completions")
    micro_batches = count_calls(trainer, "compute_loss")
    counter = count_masks(trainer, callback)
    recorder = attach_recorder(trainer)
    trainer.train()
    assert generated[0] == generations
    assert_once_per_optimizer_step(trainer, callback, counter, optimizer, micro_batches, steps=steps, accumulation=2)
    assert len(recorder.steps) == steps
    assert_sgd_steps_masked(recorder, 0.5)
    assert all(e["gmt/masked_fraction"] == pytest.approx(0.5, abs=1e-3) for e in gmt_logs(trainer))


def test_grpo_global_scope_with_kl_reference(tmp_path):
    """beta > 0: GRPO loads a reference model from the policy's folder; only the policy's parameters are masked."""
    from trl import GRPOConfig, GRPOTrainer

    folder = tmp_path / "policy"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), **cpu_args(
        max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=LR,
        lr_scheduler_type="constant", beta=0.1,
    ))
    callback = GMTCallback(mask_ratio=0.3, scope="global")
    trainer = GRPOTrainer(model=str(folder), reward_funcs=shorter_is_better, args=args, train_dataset=prompts(), callbacks=[callback])
    assert trainer.ref_model is not None
    trainer.create_optimizer()
    trainer.optimizer = optimizer = CountingSGD(trainer.model.parameters())
    recorder = attach_recorder(trainer)
    trainer.train()
    assert set(callback.masker.names) == {n for n, _ in trainer.model.named_parameters()}
    assert optimizer.steps == 2 and callback.masker.step == 2
    assert_sgd_steps_masked(recorder, 0.3, "global")
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(ref[n], recorder.steps[0]["before"][n]) for n in ref)  # the reference never moved


def test_rloo_masks_once_per_optimizer_step(tmp_path):
    callback = GMTCallback(mask_ratio=0.4)
    trainer, optimizer = grpo_like("RLOO", tmp_path, callback, steps=4, num_iterations=2, steps_per_generation=2, beta=0.0)
    generated = count_calls(trainer, "_generate_and_score_completions")
    micro_batches = count_calls(trainer, "compute_loss")
    counter = count_masks(trainer, callback)
    recorder = attach_recorder(trainer)
    trainer.train()
    assert generated[0] == 2
    assert_once_per_optimizer_step(trainer, callback, counter, optimizer, micro_batches, steps=4, accumulation=2)
    assert_sgd_steps_masked(recorder, 0.4)


def test_kto_with_reference_model(tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    n = 16
    data = Dataset.from_dict({
        "prompt": sentences(n, 1), "completion": [" " + s for s in sentences(n, 2)], "label": [i % 2 == 0 for i in range(n)],
    })
    args = KTOConfig(output_dir=str(tmp_path), **cpu_args(
        max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=LR, max_length=32,
        lr_scheduler_type="constant",
    ))
    model = tiny_llama()
    optimizer = CountingSGD(model.parameters())
    callback = GMTCallback(mask_ratio=0.3)
    trainer = KTOTrainer(
        model=model, ref_model=tiny_llama(seed=1), args=args, train_dataset=data, processing_class=tiny_tokenizer(),
        callbacks=[callback], optimizers=(optimizer, None),
    )
    micro_batches = count_calls(trainer, "compute_loss")
    counter = count_masks(trainer, callback)
    recorder = attach_recorder(trainer)
    trainer.train()
    assert_once_per_optimizer_step(trainer, callback, counter, optimizer, micro_batches, steps=3, accumulation=2)
    assert_sgd_steps_masked(recorder, 0.3)
