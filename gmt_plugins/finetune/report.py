"""What the job reports: the results table, the plot (loss curves and layers x steps heatmaps of the mask's
per-layer statistics from the Trainer's logs), and ``results.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmt_plugins.finetune.layers import LAYER_PREFIX

if TYPE_CHECKING:
    from gmt_plugins.finetune.training import MethodResult


# -- the heatmaps of the per-layer mask statistics (gmt_plugins.finetune.layers.layer_stats) ---------


@dataclass(frozen=True)
class Heatmap:
    """How one per-layer quantity is drawn: the panel's title, the colour bar's label (quantity and unit),
    the logged quantities (``gmt/layer/<layer>/<source>``) it is computed from, the config switches they
    need, and the colour scale (log, or fixed limits in %, else the data's range)."""

    title: str
    bar: str
    sources: tuple[str, ...]
    needs: tuple[str, ...]
    log: bool = False
    limits: tuple[float, float] | None = None


_COVERAGE_SWITCHES = ("track_coverage", "log_layers")
HEATMAPS: dict[str, Heatmap] = {
    "never_updated": Heatmap(
        "entries not updated yet (masked at every step so far)",
        "100% - coverage (% of the layer's entries; log scale, white: 0)", ("coverage",), _COVERAGE_SWITCHES, log=True),
    "coverage": Heatmap("coverage: entries updated at least once so far", "coverage (% of the layer's entries)",
                        ("coverage",), _COVERAGE_SWITCHES),
    "churn": Heatmap("entries whose masked state changed since the previous step", "churn (% of the layer's entries)",
                     ("churn",), _COVERAGE_SWITCHES),
    "masked_fraction": Heatmap("masked entries", "masked_fraction (% of the layer's entries)", ("masked_fraction",),
                               ("log_layers",)),
    "nonzero_share": Heatmap(
        "masked entries whose gradient was nonzero", "masked_nonzero_fraction / masked_fraction (% of the masked)",
        ("masked_nonzero_fraction", "masked_fraction"), ("log_layers",), limits=(0.0, 100.0)),
}


def _derive(name: str, values: tuple[float, ...]) -> float:
    if name == "never_updated":
        return 1.0 - values[0]
    if name == "nonzero_share":
        nonzero, masked = values
        return nonzero / masked if masked else math.nan
    return values[0]


def heatmap_quantities(scope: str | None) -> tuple[str, str, str]:
    """The three heatmaps of a masking run (keys of :data:`HEATMAPS`). How far the masks have left each
    layer untouched, and how much of each layer's mask fell on nonzero gradients, in any scope; in tensor
    scope every layer masks exactly ``mask_ratio`` of its entries, so the middle map shows how much the mask
    moves from step to step, and in global scope the masked fraction of each layer itself."""
    return ("never_updated", "masked_fraction" if scope == "global" else "churn", "nonzero_share")


def heatmap_series(stats: dict[str, dict[str, list[tuple[int, float]]]], name: str) -> dict[str, list[tuple[int, float]]]:
    """Heatmap ``name``'s ``{layer: [(step, value)]}`` from a run's ``layer_stats``: its sources joined on the
    steps where all of them were logged; ``{}`` when a source is missing."""
    sources = [stats.get(source) or {} for source in HEATMAPS[name].sources]
    if not all(sources):
        return {}
    result: dict[str, list[tuple[int, float]]] = {}
    for layer, first in sources[0].items():
        others = [dict(source.get(layer, ())) for source in sources[1:]]
        result[layer] = [(step, _derive(name, (value, *(o[step] for o in others))))
                         for step, value in first if all(step in o for o in others)]
    return result


def layer_labels(layers: list[str]) -> list[str]:
    """Short row labels: ``"embed"``, ``"0"``.. ``"29"``, ``"norm"`` for a Llama's ``model.embed_tokens``,
    ``model.layers.<i>``, ``model.norm``; the names less their common prefix where the short ones would collide."""
    short = [("embed" if last == "embed_tokens" else last) for last in (x.rpartition(".")[2] for x in layers)]
    if len(set(short)) == len(short):
        return short
    parts = [x.split(".") for x in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def layer_matrix(series: dict[str, list[tuple[int, float]]]) -> tuple[list[str], list[int], list[list[float]]]:
    """``(layers, steps, grid)``: one row per layer in ``series``' order, one column per step that any layer
    logged (sorted); ``grid[row][column]`` is the value, NaN where that layer has no value at that step."""
    layers = list(series)
    steps = sorted({step for values in series.values() for step, _ in values})
    column = {step: i for i, step in enumerate(steps)}
    grid = [[math.nan] * len(steps) for _ in layers]
    for row, layer in enumerate(layers):
        for step, value in series[layer]:
            grid[row][column[step]] = value
    return layers, steps, grid


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
    """Write :func:`results_figure` to ``path`` (a 256-colour PNG)."""
    import matplotlib.pyplot as plt

    import io

    from PIL import Image  # a dependency of matplotlib

    fig = results_figure(results, title=title)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours are plenty for lines, text and viridis maps, and take a third of the bytes of RGBA
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, format="png", optimize=True)
    return path


def results_figure(results: list[MethodResult], *, title: str = "") -> Any:
    """Loss curves of every method and their difference to plain SFT (top row), then for each masking
    method a row of three layers x steps heatmaps (:func:`heatmap_quantities`) from its ``layer_stats``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked = [r for r in results if r.gmt is not None]
    reference = next((r for r in results if r.method == "sft" and r.losses), None)
    compare = [r for r in results if r is not reference and r.losses] if reference is not None else []
    rows = 1 + max(1, len(masked))
    fig = plt.figure(figsize=(15, 3.8 + 4.4 * (rows - 1)))
    grid = fig.add_gridspec(rows, 6, height_ratios=[3.8] + [4.4] * (rows - 1))
    colors = {r.method: f"C{i}" for i, r in enumerate(results)}
    _plot_losses(fig.add_subplot(grid[0, :3]), results, colors)
    if compare:
        _plot_differences(fig.add_subplot(grid[0, 3:]), reference, compare, colors)
    else:
        _note(fig.add_subplot(grid[0, 3:]), "no plain SFT run in this job: no difference to plot")
    if not masked:
        _note(fig.add_subplot(grid[1, :]), "no masking method in this job (" + ", ".join(r.method for r in results)
              + "): no per-layer mask statistics")
    for row, r in enumerate(masked, start=1):
        for column, name in enumerate(heatmap_quantities(r.gmt.get("scope"))):
            plot_layer_heatmap(fig.add_subplot(grid[row, 2 * column : 2 * column + 2]), r, name, fig=fig)
    if title:
        fig.suptitle(title, fontsize=10)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.12 / height if title else 1.0))  # room for the suptitle
    return fig


def _plot_losses(ax: Any, results: list[MethodResult], colors: dict[str, str]) -> None:
    for r in results:
        if not r.losses:
            continue
        steps, losses = zip(*r.losses)
        ax.plot(steps, losses, alpha=0.25, linewidth=1, color=colors[r.method])
        held = r.heldout.get("loss")
        label = f"{r.method}" + (f" (held-out {held:.3f})" if held is not None else "")
        ax.plot(steps, _moving_mean(losses), color=colors[r.method], linewidth=2, label=label)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("training loss (thin: per step, thick: moving mean of 5)", fontsize=9)
    ax.legend(fontsize=8)


def _plot_differences(ax: Any, reference: MethodResult, compare: list[MethodResult], colors: dict[str, str]) -> None:
    ref = dict(reference.losses)
    for r in compare:
        pairs = [(s, loss - ref[s]) for s, loss in r.losses if s in ref]
        if pairs:
            steps, diffs = zip(*pairs)
            ax.plot(steps, diffs, color=colors[r.method], linewidth=1.5, label=r.method)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss minus plain SFT's")
    ax.set_title("same batches: difference to plain SFT", fontsize=9)
    ax.legend(fontsize=8)


def _note(ax: Any, text: str) -> None:
    """A panel that states why it holds no plot (a frame, no ticks, the reason in its middle)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)


def plot_layer_heatmap(ax: Any, result: MethodResult, name: str, *, fig: Any) -> None:
    """``result``'s heatmap ``name`` (:data:`HEATMAPS`) on ``ax``: layers top to bottom in model order,
    optimizer steps left to right, values in %; grey where a layer has no value at a step. Where the run
    logged no such statistic, the panel says which keys and which config switches are missing."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    heatmap = HEATMAPS[name]
    header = f"{result.method} ({(result.gmt or {}).get('scope')} scope): {heatmap.title}"
    series = heatmap_series(result.layer_stats or {}, name)
    if not series:
        keys = ", ".join(f"{LAYER_PREFIX}<layer>/{source}" for source in heatmap.sources)
        needs = " and ".join(f"{switch}=True" for switch in heatmap.needs)
        _note(ax, f"{header}:\nnot in this run's logs (no {keys});\nthe GMT run needs {needs}")
        return
    layers, steps, grid = layer_matrix(series)
    values = np.ma.masked_invalid(np.array(grid, dtype=float) * 100.0)
    shown = sorted({f"{v:.3g}" for v in values.compressed()})
    constant = f" (all {shown[0]}%)" if len(shown) == 1 else ""
    if np.ma.getmaskarray(values).any():
        constant += " (grey: no value)"
    cmap, extend = matplotlib_cmap("viridis"), "neither"
    if heatmap.log:
        positive = values[values > 0]
        high = float(positive.max()) if positive.count() else 100.0
        low = max(float(positive.min()) if positive.count() else high / 10, high / 1e4)
        if not low < high:
            low = high / 10
        if (values <= 0).any():  # zero has no place on a log scale: drawn in the 'under' colour
            values = np.ma.where(values <= 0, low / 10, values)
            extend = "min"
        norm = LogNorm(vmin=low, vmax=high)
    else:
        low, high = heatmap.limits or ((float(values.min()), float(values.max())) if values.count() else (0.0, 100.0))
        if high - low < 1e-9:
            low, high = low - 1.0, high + 1.0
        norm = Normalize(vmin=low, vmax=high)
    image = ax.imshow(values, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    labels = layer_labels(layers)
    every = max(1, math.ceil(len(layers) / 40))
    ax.set_yticks(range(0, len(layers), every), labels[::every], fontsize=6)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (model order)")
    ax.set_title(f"{result.method} ({(result.gmt or {}).get('scope')} scope):\n{heatmap.title}{constant}", fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.02, extend=extend)
    bar.set_label(heatmap.bar, fontsize=7)
    bar.ax.tick_params(labelsize=7)


def _integer_locator() -> Any:
    import matplotlib.ticker as ticker

    return ticker.MaxNLocator(integer=True)


def matplotlib_cmap(name: str) -> Any:
    """Colour map ``name`` drawing missing values (NaN) light grey and values under its range white."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9", under="white")


def _moving_mean(values, window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON (non-finite floats as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=1) + "\n")
    return path


def results_from_json(payload: dict[str, Any]) -> list[MethodResult]:
    """The :class:`~gmt_plugins.finetune.training.MethodResult` list of a ``results.json`` payload, so that
    ``plot_results(results_from_json(json.loads(path.read_text())), png)`` redraws the job's figure.
    Results written before ``layer_stats`` existed come back with none (their heatmap panels say so)."""
    from gmt_plugins.finetune.training import MethodResult

    fields = {f.name for f in dataclasses.fields(MethodResult)}
    # results.json files written before the CPU clock was reported have no train_cpu_seconds
    return [
        MethodResult(**{"train_cpu_seconds": math.nan, **{k: v for k, v in r.items() if k in fields}})
        for r in payload["results"]
    ]


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
