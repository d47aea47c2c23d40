"""Worker of tests/test_distributed_fsdp.py: ``Trainer`` + ``GMTCallback`` under FSDP2 and FSDP1, 2 CPU
processes, gloo.

Run with ``torchrun --nproc_per_node 2 tests/dist/fsdp_trainer_worker.py OUT_DIR``. The model's
gradient is known: ``loss = sum_i sum(C_i * W_i)``, so every optimizer step's full gradient is
``C`` on every rank whatever the batch. With SGD (learning rate 1, no momentum, no clipping, weight
decay only in the strict case) the full parameters after a step are ``W - mask(C)``; rank 0 saves them (gathered,
test only) for every step to ``OUT_DIR/<case>.pt``, and each rank saves what it saw
(``OUT_DIR/<case>.rank<r>.pt``). The pytest process masks ``C`` in one process and with
``tests/reference.py`` and compares entry for entry.

On CPU accelerate drops the FSDP plugin (its distributed type is MULTI_CPU) and the Trainer
silently trains with DDP. Each case therefore sets ``PartialState``'s distributed type to
MULTI_GPU before building the Trainer, so accelerate takes its FSDP path; FSDP1 also needs the
state's device to be the CPU (FSDP1's ``device_id``) and ``sync_module_states=False`` (both found
necessary when this test was written). The worker asserts the model really is sharded (FSDP2: gradients are
``DTensor``s; FSDP1: the wrapped model is ``FullyShardedDataParallel`` holding ``FlatParameter``s),
so a case cannot pass under DDP.

After the Trainer cases, a plain loop (no Trainer): ``GradientMasker(fsdp1_model)`` under
``FULL_SHARD`` and ``NO_SHARD`` (full gradients gathered with ``summon_full_params``), and named FSDP1
flat parameters, which must be refused.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gmt_plugins import GMTCallback  # noqa: E402
from tiny import cpu_args  # noqa: E402

# Odd shapes: FSDP2 shards rows unevenly (one row: rank 1 holds nothing); FSDP1 concatenates each
# block's parameters into one flat parameter split in halves, so parameters straddle the ranks.
SHAPES = {"blocks.0.w": (96, 64), "blocks.0.b": (7,), "blocks.1.w": (33, 5), "blocks.1.v": (1, 3), "head": (13, 3)}
STEPS = 2

# name, fsdp_version, fsdp_config extras, GMTCallback overrides[, TrainingArguments overrides]
CASES = [
    ("fsdp2_tensor", 2, {}, dict(strategy="gmt", scope="tensor", mask_ratio=0.3, chunk_numel=1024)),
    ("fsdp2_global", 2, {}, dict(strategy="gmt", scope="global", mask_ratio=0.45, chunk_numel=1024)),
    ("fsdp1_orig_tensor", 1, {"use_orig_params": True}, dict(strategy="gmt", scope="tensor", mask_ratio=0.3, chunk_numel=1024)),
    # gradient accumulation: two micro-batches per optimizer step, one mask after the last
    ("fsdp1_orig_global", 1, {"use_orig_params": True}, dict(strategy="gmt", scope="global", mask_ratio=0.45, chunk_numel=1024),
     dict(gradient_accumulation_steps=2)),
    ("fsdp1_flat_tensor", 1, {"use_orig_params": False}, dict(strategy="gmt", scope="tensor", mask_ratio=0.3, chunk_numel=1024)),
    ("fsdp1_flat_global", 1, {"use_orig_params": False}, dict(strategy="gmt", scope="global", mask_ratio=0.45, chunk_numel=1024)),
    ("fsdp1_random_global", 1, {"use_orig_params": True}, dict(strategy="random", scope="global", mask_ratio=0.3, mask_seed=3, chunk_numel=1024)),
    # weight decay would move entries masked at step 1 but not at step 0 (random masks change with
    # the step); strict mode must hold them
    ("fsdp1_flat_strict", 1, {"use_orig_params": False}, dict(strategy="random", scope="tensor", mask_ratio=0.3, mask_seed=1, strict=True),
     dict(weight_decay=0.5)),
]
# sift, not a layer-freezing strategy: those are refused earlier, by the FSDP set-up check
REFUSAL = ("fsdp1_sift", 1, {"use_orig_params": True}, dict(strategy="sift", mask_ratio=0.3))


def known_gradient(name: str) -> torch.Tensor:
    """``C`` of parameter ``name``: values in ±{1..8}/8 (exact in binary, never zero, many ties)."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    shape = SHAPES[name]
    magnitude = torch.randint(1, 9, shape, generator=gen).to(torch.float32) / 8
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float32) * 2 - 1
    return magnitude * sign


class Block(torch.nn.Module):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.short_names = []
        for name, shape in SHAPES.items():
            if name.startswith(prefix):
                short = name[len(prefix):]
                self.short_names.append(short)
                self.register_parameter(short, torch.nn.Parameter(torch.zeros(shape)))
                self.register_buffer(f"c_{short}", known_gradient(name), persistent=False)

    def forward(self) -> torch.Tensor:
        # by attribute: FSDP1 without use_orig_params registers its flat parameter instead
        return sum((getattr(self, f"c_{n}") * getattr(self, n)).sum() for n in self.short_names)


class KnownGradient(torch.nn.Module):
    """``loss = sum(C * W)`` over every parameter: the gradient is ``C`` whatever the batch."""

    _no_split_modules = ["Block"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block("blocks.0."), Block("blocks.1.")])
        self.head = torch.nn.Parameter(torch.zeros(SHAPES["head"]))
        self.register_buffer("c_head", known_gradient("head"), persistent=False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        loss = sum(block() for block in self.blocks) + (self.c_head * self.head).sum()
        return {"loss": loss + 0 * x.sum()}


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def full_parameters(model: torch.nn.Module, version: int) -> dict[str, torch.Tensor]:
    """Every full parameter (test only: gathers)."""
    if version == 2:
        return {clean(n): p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {clean(n): p.detach().clone().view(SHAPES[clean(n)]) for n, p in model.named_parameters() if clean(n) in SHAPES}


class Recorder(TrainerCallback):
    def __init__(self, version: int) -> None:
        self.version = version
        self.steps: list[dict] = []
        self.kinds: set[str] = set()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.kinds |= {type(p.grad).__name__ for p in model.parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(full_parameters(model, self.version))


def fake_gpu_state(version: int) -> None:
    """Make accelerate take its FSDP path on CPU (see the module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    if version == 1:
        PartialState._shared_state["device"] = torch.device("cpu")


def run_case(out: str, name: str, version: int, extra: dict, overrides: dict, train: dict | None = None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._flat_param import FlatParameter

    rank = dist.get_rank()
    fsdp_config = {"fsdp_version": version, "transformer_layer_cls_to_wrap": ["Block"], **extra}
    if version == 1:
        fsdp_config["sync_module_states"] = False
    training = dict(max_steps=STEPS, per_device_train_batch_size=1, learning_rate=1.0, lr_scheduler_type="constant", optim="sgd",
                    weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, ddp_backend="gloo")
    args = TrainingArguments(
        output_dir=os.path.join(out, name),
        **cpu_args(**{**training, **(train or {})}),
        fsdp="full_shard", fsdp_config=fsdp_config,
    )
    args.distributed_state  # TrainingArguments resets accelerate's state: fake the GPU after it
    fake_gpu_state(version)
    model = KnownGradient()
    dataset = [{"x": torch.zeros(1)} for _ in range(8)]
    recorder = Recorder(version)
    callback = GMTCallback(**overrides)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback, recorder])
    error = None
    try:
        trainer.train()
    except ValueError as err:
        error = str(err)
    wrapped = trainer.model_wrapped
    if version == 1:
        assert isinstance(wrapped, FSDP), type(wrapped)
        flats = [p for p in wrapped.parameters() if isinstance(p, FlatParameter)] if not extra.get("use_orig_params") else [
            m._flat_param for m in wrapped.modules() if isinstance(m, FSDP) and m._flat_param is not None
        ]
        assert flats and all(isinstance(f, FlatParameter) for f in flats)
    record = {
        "error": error,
        "wrapped": type(wrapped).__name__,
        "grad_types": sorted(recorder.kinds),
        "stats": None if callback.last_stats is None else callback.last_stats.masked,
        "names": None if callback.masker is None else callback.masker.names,
    }
    torch.save(record, os.path.join(out, f"{name}.rank{rank}.pt"))
    if rank == 0:
        torch.save({"steps": recorder.steps}, os.path.join(out, f"{name}.pt"))
    dist.barrier()


PLAIN = dict(scope="global", mask_ratio=0.45, chunk_numel=1024)


def run_plain_loop(out: str) -> None:
    """Plain loop: ``GradientMasker(fsdp1_model)`` masks exactly; named flat parameters (no model)
    cannot be split into original parameters and are refused."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from gmt_plugins import GradientMasker

    def wrap(use_orig_params: bool, **kwargs) -> FSDP:
        return FSDP(KnownGradient(), use_orig_params=use_orig_params, auto_wrap_policy=ModuleWrapPolicy({Block}),
                    device_id=torch.device("cpu"), **kwargs)

    rank = dist.get_rank()
    try:
        GradientMasker(list(wrap(False).named_parameters()), mask_ratio=0.3)
        message = None
    except ValueError as err:
        message = str(err)
    torch.save(message, os.path.join(out, f"named_flat.rank{rank}.pt"))

    # NO_SHARD: whole, all-reduced flat gradients, masked without any collective
    for name, kwargs in (("plain_fsdp1", {}), ("plain_fsdp1_no_shard", {"sharding_strategy": ShardingStrategy.NO_SHARD})):
        model = wrap(True, **kwargs)
        masker = GradientMasker(model, **PLAIN)
        model(x=torch.zeros(1))["loss"].backward()
        stats = masker.apply()
        with FSDP.summon_full_params(model, with_grads=True):  # test only: gathers
            post = {clean(n): p.grad.detach().clone().view(SHAPES[clean(n)]) for n, p in model.named_parameters()}
        record = {"names": masker.names, "masked": stats.masked, "post": post, "sharded": masker.sharded}
        torch.save(record, os.path.join(out, f"{name}.rank{rank}.pt"))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    only = sys.argv[2:] or None
    for case in CASES + [REFUSAL]:
        if only is None or case[0] in only:
            run_case(out, *case)
    if only is None:
        run_plain_loop(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
