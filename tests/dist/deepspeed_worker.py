"""Worker of tests/test_deepspeed.py: the transformers Trainer + GMTCallback under DeepSpeed ZeRO-1/2/3,
2 CPU processes (``DS_ACCELERATOR=cpu``; DeepSpeed picks gloo by itself).

Run with ``torchrun --nproc_per_node 2 tests/dist/deepspeed_worker.py OUT_DIR [CASE ...]``.

The model's gradient is known: ``loss = sum_k sum(C_k[s] * W_k)``, so at optimizer step ``s`` the
gradient of ``W_k`` is ``C_k[s]`` on every rank and every micro-batch, and the gradient DeepSpeed
hands the optimizer is ``C_k[s]`` times a positive factor (gradient accumulation, averaging over
ranks, clipping) that keeps the order and the ties of ``|C_k[s]|`` (the entries are small multiples of
1/64). The optimizer is plain SGD with lr 1 and no weight decay, so an entry of the fp32 master
weights stays bit-identical at step ``s`` exactly when its gradient was masked (or is zero). Each rank
records the full fp32 weights around every step (``safe_get_full_fp32_param``, test only) and
GMTCallback's statistics; rank 0 saves them to ``OUT_DIR/<case>.pt`` and every rank its statistics to
``OUT_DIR/<case>.stats<rank>.pt``. The pytest process replays every step with a single-process
``GradientMasker`` on ``C[s]`` and with ``tests/reference.py``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# (name, zero stage, GMT overrides, TrainingArguments overrides, extra zero_optimization keys)
CASES = [
    ("z1_tensor_clip", 1, dict(strategy="gmt", scope="tensor", mask_ratio=0.3), dict(max_grad_norm=0.5), {}),
    ("z1_global", 1, dict(strategy="gmt", scope="global", mask_ratio=0.4), dict(max_grad_norm=0.0), {}),
    ("z2_global", 2, dict(strategy="gmt", scope="global", mask_ratio=0.4, track_coverage=True, track_energy=True), dict(max_grad_norm=0.0), {}),
    ("z2_random_tensor", 2, dict(strategy="random", scope="tensor", mask_ratio=0.3, mask_seed=7), dict(max_grad_norm=0.0), {}),
    # sub_group_size 1500 splits the parameters into several ZeRO-3 sub-groups
    ("z3_tensor", 3, dict(strategy="gmt", scope="tensor", mask_ratio=0.3, track_coverage=True, ratio_of="nonzero"),
     dict(max_grad_norm=0.0), {"sub_group_size": 1500}),
    ("z3_global_clip", 3, dict(strategy="gmt", scope="global", mask_ratio=0.5), dict(max_grad_norm=0.5), {"sub_group_size": 1500}),
    ("z2_momentum_skip", 2, dict(strategy="gmt_momentum", scope="tensor", mask_ratio=0.3, strategy_options={"beta": 0.5}), dict(max_grad_norm=0.0), {}),
    ("z2_offload_global", 2, dict(strategy="gmt", scope="global", mask_ratio=0.3), dict(max_grad_norm=0.5),
     {"offload_optimizer": {"device": "cpu"}}),
    ("z3_offload_tensor", 3, dict(strategy="gmt", scope="tensor", mask_ratio=0.3), dict(max_grad_norm=0.5),
     {"offload_optimizer": {"device": "cpu"}, "sub_group_size": 1500}),
    # strict mode under AdamW with weight decay: masked entries held bit-identical, group by group
    ("z2_strict_adamw", 2, dict(strategy="gmt", scope="tensor", mask_ratio=0.3, strict=True),
     dict(max_grad_norm=0.0, optim="adamw_torch", learning_rate=0.01, weight_decay=0.1), {}),
    ("z3_strict_adamw_global", 3, dict(strategy="gmt", scope="global", mask_ratio=0.3, strict=True),
     dict(max_grad_norm=0.5, optim="adamw_torch", learning_rate=0.01, weight_decay=0.1), {"sub_group_size": 1500}),
    ("z3_bf16_global", 3, dict(strategy="gmt", scope="global", mask_ratio=0.3), dict(max_grad_norm=0.0, bf16=True), {}),
    ("z3_momentum_global", 3, dict(strategy="gmt_momentum", scope="global", mask_ratio=0.3, strategy_options={"beta": 0.5}), dict(max_grad_norm=0.0), {}),
]
# A NaN in the gradient of this step makes DeepSpeed skip the step (invalid norm, as on an fp16
# overflow): nothing may be masked and no strategy state may advance.
SKIP_STEP = {"z2_momentum_skip": 1}
STEPS = 3
GRAD_ACCUM = 2
SHAPES = {
    "embed.weight": (37, 8),  # 296 entries: uneven partitions
    "layer.weight": (96, 64),
    "layer.bias": (96,),  # a no-decay group: the Trainer makes two parameter groups
    "norm.weight": (5,),
    "head.weight": (3, 7),
}


def known_gradients(case: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """``C[name][s]``: multiples of 1/64 in [-1/8, 1/8], so most entries tie with others; a few zeros."""
    gen = torch.Generator().manual_seed(11)
    known = {name: torch.randint(-8, 9, (steps, *shape), generator=gen).to(torch.float32) / 64 for name, shape in SHAPES.items()}
    if case in SKIP_STEP:
        known["layer.weight"][SKIP_STEP[case], 3, 4] = float("nan")
    return known


class Term(torch.nn.Module):
    """Parameters of one submodule; its forward returns ``sum(C * W)`` over them (ZeRO-3 gathers a
    module's parameters around its own forward, so each term is a module that is called)."""

    def __init__(self, prefix: str, known: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.prefix = prefix
        for key, shape in SHAPES.items():
            if key.startswith(prefix + "."):
                self.register_parameter(key.split(".")[1], torch.nn.Parameter(torch.zeros(shape)))
        self.known = known

    def forward(self, step: int) -> torch.Tensor:
        return sum((self.known[f"{self.prefix}.{n}"][step] * p).sum() for n, p in self.named_parameters())


class KnownGradModel(torch.nn.Module):
    """``loss = sum_k sum(C_k[s] * W_k)`` with ``s`` the optimizer step (forward calls // accumulation)."""

    def __init__(self, case: str, steps: int = STEPS) -> None:
        super().__init__()
        known = known_gradients(case, steps)
        self.terms = torch.nn.ModuleDict({prefix: Term(prefix, known) for prefix in dict.fromkeys(k.split(".")[0] for k in SHAPES)})
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> dict[str, torch.Tensor]:
        step = self.calls // GRAD_ACCUM
        self.calls += 1
        loss = sum(term(step) for term in self.terms.values())
        return {"loss": loss + 0 * input_ids.float().sum()}


def param_key(name: str) -> str:
    """``terms.layer.weight`` -> ``layer.weight``."""
    return name.removeprefix("terms.")


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {param_key(name): safe_get_full_fp32_param(p).detach().clone().cpu() for name, p in model.named_parameters()}


def training_args(output_dir: str, stage: int, args_overrides: dict, zero_extra: dict, steps: int):
    from transformers import TrainingArguments

    from tiny import cpu_args

    ds_config = {
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {}), **zero_extra},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload cases step torch's SGD on the CPU partitions
    }
    training = {"optim": "sgd", "learning_rate": 1.0, "weight_decay": 0.0, **args_overrides}
    return TrainingArguments(
        output_dir=output_dir, deepspeed=ds_config, lr_scheduler_type="constant", per_device_train_batch_size=1,
        gradient_accumulation_steps=GRAD_ACCUM, max_steps=steps, **cpu_args(**training),
    )


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def run_resume(out: str) -> None:
    """ZeRO-2, gmt_momentum (per-rank EMA of each partition): 4 steps saved at step 2, against the same run
    resumed from checkpoint-2 into another output folder."""
    from transformers import Trainer

    from gmt_plugins import GMTCallback

    gmt = dict(strategy="gmt_momentum", scope="global", mask_ratio=0.3, strategy_options={"beta": 0.5}, chunk_numel=1024)
    overrides = dict(max_grad_norm=0.0, save_strategy="steps", save_steps=2)
    dataset = [{"input_ids": [i], "labels": [i]} for i in range(2 * GRAD_ACCUM * 4)]
    finals = {}
    checkpoint = os.path.join(out, "resume_full", "checkpoint-2")
    for run in ("full", "resumed"):
        model = KnownGradModel("resume", steps=4)
        callback = GMTCallback(**gmt)
        args = training_args(os.path.join(out, f"resume_{run}"), 2, overrides, {}, 4)
        if run == "resumed":  # per-rank state in a folder outside output_dir: the Trainer tells callbacks only this way
            args.resume_from_checkpoint = checkpoint
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
        if run == "full":
            trainer.train()
        else:
            model.calls = 2 * GRAD_ACCUM  # the known gradient of step 2 next
            trainer.train(resume_from_checkpoint=checkpoint)
        finals[run] = (full_weights(trainer.model), callback.masker.step, callback.masker.strategy.state_dict())
        callback._deepspeed.detach()
        del trainer
        reset_accelerate()
    torch.save(finals, os.path.join(out, f"resume.stats{torch.distributed.get_rank()}.pt"))


def run_case(name: str, stage: int, gmt: dict, args_overrides: dict, zero_extra: dict, out: str) -> None:
    from transformers import Trainer, TrainerCallback

    from gmt_plugins import GMTCallback

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.weights: list[dict] = []
            self.stats: list[dict] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # GMTCallback (before this one) attached its hook: make it verify, for ZeRO-1/2 on the device,
            # that the gradient DeepSpeed builds for each later group equals the copy it masked
            gmt_callback._deepspeed.check = True
            self.weights.append(full_weights(model))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights.append(full_weights(model))
            stats = gmt_callback.last_stats
            restored = gmt_callback._deepspeed.restored
            self.stats.append(None if stats is None else {**dataclasses.asdict(stats), "restored": restored})

    args = training_args(os.path.join(out, name), stage, args_overrides, zero_extra, STEPS)
    dataset = [{"input_ids": [i], "labels": [i]} for i in range(2 * GRAD_ACCUM * STEPS)]
    gmt_callback = GMTCallback(**gmt, chunk_numel=1024)
    record = Record()
    trainer = Trainer(model=KnownGradModel(name), args=args, train_dataset=dataset, callbacks=[gmt_callback, record])
    trainer.train()
    engine = trainer.model_wrapped
    stage_seen = engine.zero_optimization_stage()
    rank = torch.distributed.get_rank()
    lp_dtype = str(next(engine.module.parameters()).dtype)
    offload = bool(getattr(engine.optimizer, "cpu_offload", False) or getattr(engine.optimizer, "offload_optimizer", False))
    groups = len(engine.optimizer.fp16_groups if stage_seen == 3 else engine.optimizer.bit16_groups)
    torch.save({"stats": record.stats, "stage": stage_seen, "lp_dtype": lp_dtype, "offload": offload, "groups": groups,
                "log_history": trainer.state.log_history},
               os.path.join(out, f"{name}.stats{rank}.pt"))
    if rank == 0:
        torch.save({"weights": record.weights, "known": known_gradients(name)}, os.path.join(out, f"{name}.pt"))
    gmt_callback._deepspeed.detach()
    del trainer, engine
    reset_accelerate()


def run_refusals(out: str) -> None:
    """A plain DeepSpeed engine (no Trainer): what GMT refuses under ZeRO, on every rank, by name."""
    import deepspeed

    from gmt_plugins import GradientMasker
    from gmt_plugins.integrations.deepspeed import attach_deepspeed

    model = KnownGradModel("refusals")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    messages = {}
    for key, overrides in (("hft", dict(strategy="hft")),):
        try:
            attach_deepspeed(GradientMasker(engine, **overrides), engine)
            messages[key] = None
        except ValueError as err:
            messages[key] = str(err)
    masker = GradientMasker(engine)
    hook = attach_deepspeed(masker, engine)
    try:
        masker.apply()
        messages["apply"] = None
    except RuntimeError as err:
        messages["apply"] = str(err)
    hook.detach()
    torch.save(messages, os.path.join(out, f"refusals.stats{torch.distributed.get_rank()}.pt"))


def main() -> None:
    out, wanted = sys.argv[1], set(sys.argv[2:])
    for name, stage, gmt, args_overrides, zero_extra in CASES:
        if not wanted or name in wanted:
            run_case(name, stage, gmt, args_overrides, zero_extra, out)
    if not wanted or "refusals" in wanted:
        run_refusals(out)
    if not wanted or "resume" in wanted:
        run_resume(out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
