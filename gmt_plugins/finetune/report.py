"""What the job reports: the results table, the loss-curve / masked-fraction plot, per-layer masked
fractions from the Trainer's logs, and ``results.json``."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gmt_plugins.finetune.training import MethodResult


# -- per-layer masked fractions ---------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
PER_TENSOR_PREFIX = "gmt/masked_fraction/"


def layer_of(name: str) -> str:
    """``"12"`` for ``model.layers.12.mlp.up_proj.weight``; ``"embed"`` for embeddings; ``"other"`` otherwise."""
    match = _LAYER.search(name)
    if match:
        return match.group(1)
    return "embed" if "embed" in name else "other"


def _layer_order(key: str) -> tuple[int, int]:
    return (0, -1) if key == "embed" else (2, 0) if key == "other" else (1, int(key))


def layer_fractions(history: list[dict[str, Any]], numels: dict[str, int]) -> dict[str, list[tuple[int, float]]]:
    """Masked fraction of each layer (entries-weighted over its tensors) at each logged step."""
    result: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in history:
        per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for key, value in entry.items():
            if key.startswith(PER_TENSOR_PREFIX):
                name = key[len(PER_TENSOR_PREFIX) :]
                weight = numels.get(name, 1)
                acc = per_layer[layer_of(name)]
                acc[0] += value * weight
                acc[1] += weight
        for layer, (masked, total) in per_layer.items():
            result[layer].append((entry["step"], masked / total if total else 0.0))
    return {k: result[k] for k in sorted(result, key=_layer_order)}


# -- output -----------------------------------------------------------------------------------------


def format_table(results: list[MethodResult], baseline: dict[str, float] | None) -> str:
    show_em = any(r.exact_match for r in results)
    header = ["method", "trainable", "lr", "train loss (last 5)", "held-out answer loss", "ppl", "masked", "train s", "s/step", "CPU s/step"]
    if show_em:
        header.insert(6, "exact match")
    rows = []
    if baseline:
        row = ["base (no training)", "-", "-", "-", f"{baseline['loss']:.4f}", f"{baseline['perplexity']:.2f}", "-", "-", "-", "-"]
        if show_em:
            row.insert(6, _em(baseline.get("exact_match")))
        rows.append(row)
    for r in results:
        masked = f"{sum(f for _, f in r.masked_fraction) / len(r.masked_fraction):.3f}" if r.masked_fraction else "-"
        row = [
            r.method + (" (LoRA)" if r.lora and r.method != "lora" else ""), _count(r.trainable_parameters), f"{r.learning_rate:g}",
            f"{r.final_train_loss:.4f}", f"{r.heldout.get('loss', float('nan')):.4f}", f"{r.heldout.get('perplexity', float('nan')):.2f}",
            masked, f"{r.train_seconds:.0f}", f"{r.train_seconds / max(r.steps, 1):.2f}",
            f"{r.train_cpu_seconds / max(r.steps, 1):.2f}",
        ]
        if show_em:
            row.insert(6, _em(r.exact_match))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _em(em: dict[str, Any] | None) -> str:
    return f"{em['accuracy']:.3f} (n={em['n']})" if em and em.get("n") else "-"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def plot_results(results: list[MethodResult], path: Path, *, title: str = "") -> Path:
    """Loss curves of every method (left) and, per masking method, masked fraction per layer over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked = [r for r in results if r.layer_fractions]
    reference = next((r for r in results if r.method == "sft" and r.losses), None)
    compare = [r for r in results if r is not reference and r.losses] if reference is not None else []
    panels = 1 + bool(compare) + len(masked)
    fig, axes = plt.subplots(1, panels, figsize=(6 + 4.8 * (panels - 1), 4.5), squeeze=False)
    colors = {r.method: f"C{i}" for i, r in enumerate(results)}
    ax = axes[0][0]
    for r in results:
        if not r.losses:
            continue
        steps, losses = zip(*r.losses)
        ax.plot(steps, losses, alpha=0.25, linewidth=1, color=colors[r.method])
        held = r.heldout.get("loss")
        label = f"{r.method}" + (f" (held-out {held:.3f})" if held is not None else "")
        ax.plot(steps, _moving_mean(losses), color=colors[r.method], linewidth=2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("training loss (thin: per step, thick: moving mean of 5)", fontsize=9)
    ax.legend(fontsize=8)
    if compare:
        ax = axes[0][1]
        ref = dict(reference.losses)
        for r in compare:
            pairs = [(s, loss - ref[s]) for s, loss in r.losses if s in ref]
            if pairs:
                steps, diffs = zip(*pairs)
                ax.plot(steps, diffs, color=colors[r.method], linewidth=1.5, label=r.method)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss minus plain SFT's")
        ax.set_title("same batches: difference to plain SFT", fontsize=9)
        ax.legend(fontsize=8)
    for ax, r in zip(axes[0][1 + bool(compare) :], masked):
        layers = list(r.layer_fractions)
        steps = sorted({s for series in r.layer_fractions.values() for s, _ in series})
        index = {s: i for i, s in enumerate(steps)}
        grid = [[math.nan] * len(steps) for _ in layers]
        for row, layer in enumerate(layers):
            for step, value in r.layer_fractions[layer]:
                grid[row][index[step]] = value
        ratio = (r.gmt or {}).get("mask_ratio", 0.2)
        top = max([2 * ratio, 1e-6] + [v for row in grid for v in row if not math.isnan(v)])
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=top,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5), interpolation="nearest")
        tick = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), tick), [layers[i] for i in range(0, len(layers), tick)], fontsize=7)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("layer")
        ax.set_title(f"{r.method}: masked fraction per layer ({(r.gmt or {}).get('scope')} scope)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _moving_mean(values, window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON (non-finite floats as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=1) + "\n")
    return path


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
