"""What the selective-update strategies save, side by side in one run on SmolLM2-135M shapes.

A LlamaConfig with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv
heads, vocab 49152, tied embeddings) is built from the config (random weights, nothing
downloaded). Every variant trains the same model with AdamW (weight decay 0.1) on the same batch:

* ``plain``: no masker;
* ``gmt``: GMT masking (mask_ratio 0.2) after backward;
* ``lisa``: 2 of 30 layers active (plus embeddings/head), frozen before the forward pass
  (``GradientMasker.begin_step``);
* ``hft``: half of every layer's tensors frozen before the forward pass;
* ``sift``/``lift``: 1 % density (mask_ratio 0.99) with ``SparseAdamW``.

One step is ``begin_step`` (lisa, hft), forward, backward, ``masker.apply()``, ``optimizer.step()``
and ``zero_grad(set_to_none=True)``. Variants run interleaved (rep 1 of every variant, then rep 2,
..., the order rotated every rep), after ``--warmup`` steps each (sift chooses its mask and lift
runs its SVDs there), and the median of the reps is compared with plain's median from the same
run: on a shared machine only ratios measured side by side mean anything.

Bytes are exact: the gradients present right before ``optimizer.step()``, the optimizer's state
after the run, and the strategy's own state (the fixed masks' bool tensors).

    OMP_NUM_THREADS=1 python benchmarks/savings.py --seq 64 --batch 2 --reps 12
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gmt_plugins import GradientMasker, SparseAdamW, strategy_masks

VARIANTS = ("plain", "gmt", "lisa", "hft", "sift", "lift")


def smollm2_135m_shapes(**overrides: object):
    from transformers import LlamaConfig

    config = dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class Variant:
    name: str
    optimizer: torch.optim.Optimizer
    masker: GradientMasker | None = None
    freezes: bool = False
    times: list[tuple[float, float, float]] = field(default_factory=list)
    """Per timed step: (begin_step + forward + backward, masker.apply, optimizer.step + zero_grad) seconds."""
    grad_bytes: int = 0

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        start = time.perf_counter()
        if self.freezes:
            self.masker.begin_step()
        model(**batch).loss.backward()
        backward = time.perf_counter()
        if self.masker is not None:
            self.masker.apply()
        masked = time.perf_counter()
        self.grad_bytes = tensor_bytes(p.grad for p in model.parameters())
        counted = time.perf_counter()  # the byte count is not part of a step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if self.freezes:
            self.masker.unfreeze()  # the next variant trains everything (not timed)
        return backward - start, masked - backward, done - counted

    def median(self, part: int | None = None) -> float:
        return statistics.median(sum(t) if part is None else t[part] for t in self.times)

    def optimizer_bytes(self) -> int:
        if isinstance(self.optimizer, SparseAdamW):
            return self.optimizer.state_bytes()
        return tensor_bytes(t for s in self.optimizer.state.values() for t in s.values())

    def strategy_bytes(self) -> int:
        if self.masker is None:
            return 0
        state = self.masker.strategy.state_dict()
        return tensor_bytes(t for v in state.values() if isinstance(v, dict) for t in v.values())


def build(name: str, model: torch.nn.Module, lr: float) -> Variant:
    adamw: Callable[[], torch.optim.Optimizer] = lambda: torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)  # noqa: E731 - one line per variant below
    if name == "plain":
        return Variant(name, adamw())
    if name == "gmt":
        return Variant(name, adamw(), GradientMasker(model, strategy="gmt", mask_ratio=0.2))
    if name == "lisa":
        return Variant(name, adamw(), GradientMasker(model, strategy="lisa", strategy_options={"active_layers": 2}), freezes=True)
    if name == "hft":
        return Variant(name, adamw(), GradientMasker(model, strategy="hft"), freezes=True)
    if name in ("sift", "lift"):
        masker = GradientMasker(model, strategy=name, mask_ratio=0.99)
        optimizer = SparseAdamW(model.named_parameters(), masks=strategy_masks(masker), lr=lr, weight_decay=0.1)
        return Variant(name, optimizer, masker)
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30 for SmolLM2-135M)")
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_135m_shapes(num_hidden_layers=args.layers))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = [build(name, model, 1e-5) for name in names]  # every masker selects before anything is frozen
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2-135M shapes: {n_params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")

    for _ in range(args.warmup):
        for v in variants:
            v.step(model, batch)
    for rep in range(args.reps):
        for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:  # rotated: no variant always runs first
            v.times.append(v.step(model, batch))

    dense_state = 2 * 4 * n_params  # AdamW's exp_avg + exp_avg_sq in float32 for every entry
    plain = next((v for v in variants if v.name == "plain"), None)
    print(
        f"\n| variant | step s (median of {args.reps}) | step / plain | fwd+bwd / plain | apply s | optimizer s | "
        "gradients MB | optimizer state MB | state / dense AdamW | strategy state MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        ratio = f"{v.median() / plain.median():.2f}" if plain else "-"
        fwd_bwd = f"{v.median(0) / plain.median(0):.2f}" if plain else "-"
        state = v.optimizer_bytes()
        print(
            f"| {v.name} | {v.median():.3f} | {ratio} | {fwd_bwd} | {v.median(1):.3f} | {v.median(2):.3f} | "
            f"{v.grad_bytes / 2**20:.1f} | {state / 2**20:.1f} | {state / dense_state:.2%} | {v.strategy_bytes() / 2**20:.1f} |"
        )

if __name__ == "__main__":
    main()
