"""GMT in a plain DeepSpeed ZeRO loop: engine.backward(loss); engine.step() masks, then steps.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_loop.py            # 2 CPU processes
    deepspeed --num_gpus 2 examples/deepspeed_loop.py --stage 3                          # 2 GPUs

Under DeepSpeed the gradients exist only inside ``engine.step()`` (it builds each rank's fp32
partition, unscales and clips it, steps and frees it), so GMT is attached to the engine instead of
being called between backward and step: ``attach_deepspeed`` makes the step mask each rank's
partition exactly as one process would mask the whole gradient.
"""

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from gmt_plugins import GradientMasker  # noqa: E402
from gmt_plugins.integrations.deepspeed import attach_deepspeed  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
args = parser.parse_args()

torch.manual_seed(0)  # the same model and data on every rank
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
config = {
    "train_micro_batch_size_per_gpu": 128,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": args.stage},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}
if not torch.cuda.is_available() and os.environ.get("RANK", "0") == "0":
    # DeepSpeed compiles its CPU communication op on its first CPU run (about 90 s on 2 cores; cached afterwards)
    print("deepspeed.initialize on CPU: the first run compiles DeepSpeed's CPU communication op (a minute or two, once)", flush=True)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
masker = GradientMasker(engine, mask_ratio=0.2)  # the engine is unwrapped; its module's parameters are masked
hook = attach_deepspeed(masker, engine)
x, y = torch.randn(256, 32), torch.randn(256, 1)
for step in range(3):
    for xb, yb in zip(x.split(128), y.split(128)):  # two micro-batches: one optimizer step
        engine.backward(torch.nn.functional.mse_loss(engine(xb.to(engine.device)), yb.to(engine.device)))
        engine.step()  # masks and steps at the accumulation boundary only
    stats = hook.pop_stats()  # full-model counts, the same on every rank
    if engine.global_rank == 0:
        print(f"step {stats.step}: masked {stats.masked}/{stats.total} ({stats.fraction:.3f}) on ZeRO-{args.stage}")
torch.distributed.barrier()  # every rank done with its collectives before the group goes (a rank leaving early aborts the other)
torch.distributed.destroy_process_group()
