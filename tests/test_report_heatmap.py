"""The main job's per-layer heatmaps: ``gmt/layer/<layer>/<quantity>`` log keys -> series in model order
(``gmt_plugins.finetune.layers``) -> a layers x steps matrix -> a labelled panel (``report``); and the
job's GMT runs switch on the statistics it draws."""

from __future__ import annotations

import json
import math

import pytest

from gmt_plugins.finetune import report
from gmt_plugins.finetune.layers import layer_name, layer_stats, model_order
from gmt_plugins.finetune.report import heatmap_quantities, layer_labels, layer_matrix
from gmt_plugins.finetune.training import MethodResult

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

# model order of a 2-layer Llama with ten more layers than that, to catch a string sort ("10" < "2")
PARAMETERS = [
    "model.embed_tokens.weight",
    *[f"model.layers.{i}.{part}.weight" for i in (0, 1, 2, 10) for part in ("self_attn.q_proj", "mlp.up_proj")],
    "model.norm.weight",
]
MODEL_ORDER = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.10", "model.norm"]


def coverage_of(layer: str, step: int) -> float:
    """A value unique to (layer, step), so a misplaced cell cannot pass."""
    return round(0.5 + MODEL_ORDER.index(layer) / 20 + step / 1000, 6)


def synthetic_history() -> list[dict]:
    """Trainer logs as GMTCallback writes them with log_layers and track_coverage: keys in a scrambled layer
    order, churn absent on step 1, layers.2 missing at step 3 (a tensor without a gradient that step), an
    eval entry and the train summary without gmt keys."""
    history = []
    for step in (1, 2, 3, 4):
        entry = {"loss": 1.0 / step, "step": step, "gmt/masked_fraction": 0.2, "gmt/coverage": 0.9}
        for layer in reversed(MODEL_ORDER):
            if layer == "model.layers.2" and step == 3:
                continue
            entry[f"gmt/layer/{layer}/coverage"] = coverage_of(layer, step)
            entry[f"gmt/layer/{layer}/masked_fraction"] = 0.2
            entry[f"gmt/layer/{layer}/masked_nonzero_fraction"] = 0.0 if "embed" in layer else 0.19
            if step > 1:
                entry[f"gmt/layer/{layer}/churn"] = 0.01 * step
        history.append(entry)
    history.insert(2, {"eval_loss": 1.5, "step": 2})
    history.append({"train_runtime": 3.0, "train_loss": 0.5, "step": 4})
    return history


def gmt_result(stats: dict, *, scope: str = "tensor", method: str = "gmt") -> MethodResult:
    return MethodResult(
        method=method, lora=False, gmt={"scope": scope, "mask_ratio": 0.2}, learning_rate=1e-3, steps=4,
        train_seconds=1.0, train_cpu_seconds=1.0, heldout={"loss": 1.0}, exact_match=None, losses=[(s, 1.0 / s) for s in (1, 2, 3, 4)],
        masked_fraction=[(s, 0.2) for s in (1, 2, 3, 4)], layer_fractions={}, trainable_parameters=100,
        layer_stats=stats,
    )


def sft_result() -> MethodResult:
    result = gmt_result({}, method="sft")
    result.gmt, result.masked_fraction = None, []
    return result


# -- from log keys to series ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameter", "layer"),
    [
        ("model.layers.3.mlp.up_proj.weight", "model.layers.3"),
        ("model.layers.3.mlp.experts.7.w1.weight", "model.layers.3"),
        ("model.embed_tokens.weight", "model.embed_tokens"),
        ("model.norm.weight", "model.norm"),
        ("lm_head.weight", "lm_head"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "base_model.model.model.layers.0"),
    ],
)
def test_layer_name_follows_the_log_key_rule(parameter, layer):
    assert layer_name(parameter) == layer


def test_layer_stats_reads_every_quantity_in_model_order_with_the_logged_steps():
    stats = layer_stats(synthetic_history(), PARAMETERS)
    assert list(stats) == ["churn", "coverage", "masked_fraction", "masked_nonzero_fraction"]
    for quantity, series in stats.items():
        assert list(series) == MODEL_ORDER, quantity
    coverage = stats["coverage"]
    assert coverage["model.layers.10"] == [(s, coverage_of("model.layers.10", s)) for s in (1, 2, 3, 4)]
    assert coverage["model.layers.2"] == [(s, coverage_of("model.layers.2", s)) for s in (1, 2, 4)]
    assert stats["churn"]["model.norm"] == [(2, 0.02), (3, 0.03), (4, 0.04)]
    assert stats["masked_nonzero_fraction"]["model.embed_tokens"] == [(s, 0.0) for s in (1, 2, 3, 4)]


def test_layer_stats_of_a_history_without_layer_keys_is_empty():
    history = [{"loss": 1.0, "step": 1, "gmt/masked_fraction": 0.2, "gmt/masked_fraction/model.norm.weight": 0.2}]
    assert layer_stats(history, PARAMETERS) == {}


def test_model_order_without_parameter_names_sorts_embeddings_numbered_layers_then_the_rest():
    scrambled = ["model.norm", "model.layers.10", "lm_head", "model.layers.2", "model.embed_tokens", "model.layers.0"]
    assert model_order(scrambled) == ["model.embed_tokens", "model.layers.0", "model.layers.2", "model.layers.10", "lm_head", "model.norm"]
    # the parameter order wins where it knows the layer; unknown layers follow in the order above
    names = ["model.norm.weight", "model.layers.10.mlp.up_proj.weight"]
    assert model_order(scrambled, names) == ["model.norm", "model.layers.10", "model.embed_tokens", "model.layers.0",
                                             "model.layers.2", "lm_head"]


def test_layer_matrix_puts_layers_in_rows_steps_in_columns_and_nan_where_a_step_is_missing():
    series = layer_stats(synthetic_history(), PARAMETERS)["coverage"]
    layers, steps, grid = layer_matrix(series)
    assert layers == MODEL_ORDER and steps == [1, 2, 3, 4]
    for row, layer in enumerate(layers):
        for column, step in enumerate(steps):
            if (layer, step) == ("model.layers.2", 3):
                assert math.isnan(grid[row][column])
            else:
                assert grid[row][column] == coverage_of(layer, step)
    churn_layers, churn_steps, _ = layer_matrix(layer_stats(synthetic_history(), PARAMETERS)["churn"])
    assert churn_steps == [2, 3, 4] and churn_layers == MODEL_ORDER


def test_layer_labels_are_short_and_stay_unique():
    assert layer_labels(MODEL_ORDER) == ["embed", "0", "1", "2", "10", "norm"]
    assert layer_labels(["model.encoder.layers.0", "model.decoder.layers.0"]) == ["encoder.layers.0", "decoder.layers.0"]


# -- heatmap series derived from the logged quantities ---------------------------------------------


def test_heatmap_series_derive_never_updated_and_the_nonzero_share_per_layer_and_step():
    stats = layer_stats(synthetic_history(), PARAMETERS)
    never = report.heatmap_series(stats, "never_updated")
    assert list(never) == MODEL_ORDER
    assert never["model.layers.10"] == [(s, pytest.approx(1 - coverage_of("model.layers.10", s))) for s in (1, 2, 3, 4)]
    assert [s for s, _ in never["model.layers.2"]] == [1, 2, 4]
    share = report.heatmap_series(stats, "nonzero_share")
    assert share["model.embed_tokens"] == [(s, 0.0) for s in (1, 2, 3, 4)]
    assert share["model.layers.0"] == [(s, pytest.approx(0.19 / 0.2)) for s in (1, 2, 3, 4)]
    assert report.heatmap_series(stats, "churn") == stats["churn"]
    # a source missing: nothing to draw (the panel then says so)
    assert report.heatmap_series({"masked_fraction": stats["masked_fraction"]}, "nonzero_share") == {}


def test_the_nonzero_share_of_a_layer_that_masked_nothing_is_missing_not_zero():
    stats = {"masked_nonzero_fraction": {"model.norm": [(1, 0.0)]}, "masked_fraction": {"model.norm": [(1, 0.0)]}}
    ((step, value),) = report.heatmap_series(stats, "nonzero_share")["model.norm"]
    assert step == 1 and math.isnan(value)


def test_heatmap_quantities_by_scope():
    assert heatmap_quantities("tensor") == ("never_updated", "churn", "nonzero_share")
    assert heatmap_quantities("global") == ("never_updated", "masked_fraction", "nonzero_share")


# -- the panels -------------------------------------------------------------------------------------


def test_heatmap_panel_draws_the_matrix_in_percent_with_labels_and_a_colour_bar():
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots()
    result = gmt_result(layer_stats(synthetic_history(), PARAMETERS))
    report.plot_layer_heatmap(ax, result, "coverage", fig=fig)
    image = ax.get_images()[0]
    drawn = image.get_array()
    expected = np.array([[coverage_of(layer, s) * 100 for s in (1, 2, 3, 4)] for layer in MODEL_ORDER])
    missing = (MODEL_ORDER.index("model.layers.2"), 2)
    assert drawn.shape == (6, 4) and bool(drawn.mask[missing]) and int(drawn.mask.sum()) == 1
    keep = ~drawn.mask
    assert np.allclose(drawn.data[keep], expected[keep])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "0", "1", "2", "10", "norm"]
    assert image.get_extent() == [0.5, 4.5, 5.5, -0.5]  # steps 1..4 left to right, embed at the top
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "layer (model order)"
    assert ax.get_title() == "gmt (tensor scope):\ncoverage: entries updated at least once so far (grey: no value)"
    assert fig.axes[-1].get_ylabel() == "coverage (% of the layer's entries)"  # the colour bar
    plt.close(fig)


def test_the_never_updated_map_is_log_scaled_and_draws_zero_below_its_range():
    import matplotlib.pyplot as plt

    history = synthetic_history()
    for entry in history:  # the norm layer has updated every entry from step 3 on
        if "gmt/layer/model.norm/coverage" in entry and entry["step"] >= 3:
            entry["gmt/layer/model.norm/coverage"] = 1.0
    fig, ax = plt.subplots()
    report.plot_layer_heatmap(ax, gmt_result(layer_stats(history, PARAMETERS)), "never_updated", fig=fig)
    image = ax.get_images()[0]
    norm, drawn = image.norm, image.get_array()
    assert type(norm).__name__ == "LogNorm"
    row = MODEL_ORDER.index("model.norm")
    assert (drawn[row, 2:] < norm.vmin).all() and (drawn[row, :2] >= norm.vmin).all()  # zero: the 'under' colour
    assert norm.vmax == pytest.approx(max((1 - coverage_of(layer, 1)) * 100 for layer in MODEL_ORDER))
    assert tuple(image.get_cmap().get_under()[:3]) == (1.0, 1.0, 1.0)
    assert fig.axes[-1].get_ylabel() == "100% - coverage (% of the layer's entries; log scale, white: 0)"
    plt.close(fig)


def test_a_constant_map_says_so_in_its_title():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    report.plot_layer_heatmap(ax, gmt_result(layer_stats(synthetic_history(), PARAMETERS)), "masked_fraction", fig=fig)
    assert ax.get_title().endswith("masked entries (all 20%) (grey: no value)")
    plt.close(fig)


def test_only_a_map_with_holes_mentions_grey():
    import matplotlib.pyplot as plt

    stats = layer_stats(synthetic_history(), PARAMETERS)
    complete = {q: {k: v for k, v in series.items() if k != "model.layers.2"} for q, series in stats.items()}
    fig, ax = plt.subplots()
    report.plot_layer_heatmap(ax, gmt_result(complete), "churn", fig=fig)
    assert ax.get_title() == "gmt (tensor scope):\nentries whose masked state changed since the previous step"
    plt.close(fig)


def test_a_missing_statistic_is_a_panel_that_names_the_key_and_the_switches():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    report.plot_layer_heatmap(ax, gmt_result({}), "never_updated", fig=fig)
    assert not ax.get_images()
    (text,) = [t.get_text() for t in ax.texts]
    assert text.startswith("gmt (tensor scope): entries not updated yet")
    assert "not in this run's logs (no gmt/layer/<layer>/coverage)" in text
    assert "track_coverage=True and log_layers=True" in text
    plt.close(fig)


def test_the_figure_has_a_heatmap_row_per_masking_method_and_a_note_for_sft_alone():
    import matplotlib.pyplot as plt

    stats = layer_stats(synthetic_history(), PARAMETERS)
    fig = report.results_figure([sft_result(), gmt_result(stats), gmt_result(stats, scope="global", method="gmt-global")])
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert all(title.endswith(" (grey: no value)") for title in titles)
    assert [title.replace(" (grey: no value)", "") for title in titles] == [
        "gmt (tensor scope):\nentries not updated yet (masked at every step so far)",
        "gmt (tensor scope):\nentries whose masked state changed since the previous step",
        "gmt (tensor scope):\nmasked entries whose gradient was nonzero",
        "gmt-global (global scope):\nentries not updated yet (masked at every step so far)",
        "gmt-global (global scope):\nmasked entries (all 20%)",
        "gmt-global (global scope):\nmasked entries whose gradient was nonzero",
    ]  # every map has layers.2 missing at step 3
    plt.close(fig)
    fig = report.results_figure([sft_result()])
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes == ["no plain SFT run in this job: no difference to plot",
                     "no masking method in this job (sft): no per-layer mask statistics"]
    plt.close(fig)


def test_results_json_keeps_the_series_so_the_figure_can_be_redrawn(tmp_path):
    import dataclasses

    stats = layer_stats(synthetic_history(), PARAMETERS)
    results = [sft_result(), gmt_result(stats)]
    path = report.write_results(tmp_path / "results.json", {"results": [dataclasses.asdict(r) for r in results]})
    payload = json.loads(path.read_text())
    assert list(payload["results"][1]["layer_stats"]["coverage"]) == MODEL_ORDER
    back = report.results_from_json(payload)
    assert [r.method for r in back] == ["sft", "gmt"] and back[0].layer_stats == {}
    assert {q: {k: [tuple(p) for p in v] for k, v in s.items()} for q, s in back[1].layer_stats.items()} == stats
    del payload["results"][1]["layer_stats"]  # a results.json from before the heatmaps
    del payload["results"][1]["train_cpu_seconds"]  # and from before the CPU clock
    older = report.results_from_json(payload)[1]
    assert older.layer_stats == {} and math.isnan(older.train_cpu_seconds)
    png = report.plot_results(back, tmp_path / "again.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

# -- the job asks for what it draws -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["gmt", "gmt-tensor", "gmt-global", "random"])
def test_the_jobs_masking_runs_switch_on_the_statistics_the_heatmaps_read(method):
    from gmt_plugins.finetune.run import Job
    from gmt_plugins.finetune.training import gmt_config_for

    config = gmt_config_for(method, Job.from_argv([]).gmt)
    for quantity in heatmap_quantities(config.scope):
        for switch in report.HEATMAPS[quantity].needs:
            assert getattr(config, switch) is True, (method, quantity, switch)
    # a user can still switch them off
    off = gmt_config_for(method, Job.from_argv(["--track_coverage", "false", "--log_layers", "false"]).gmt)
    assert (off.track_coverage, off.log_layers) == (False, False)
