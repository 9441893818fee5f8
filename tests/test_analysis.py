"""Diagnostics on pairs whose answers are known, and the figures built from them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.analysis import diagnose, heatmap, layer_curves, parameter_records
from merging.pipeline import plan_stages


def transformed_copy(source: Path, target: Path, change) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    save_file({name: change(name, t).contiguous() for name, t in tensors.items()}, target / "model.safetensors",
              metadata={"format": "pt"})
    return target


def linear(a: Path, b: Path) -> str:
    return (f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n"
            "    parameters: {weight: 0.5}\nmerge_method: linear\n")


def test_a_model_against_its_copy_has_angle_zero(tiny, tmp_path):
    copy = transformed_copy(tiny["c1"], tmp_path / "copy", lambda n, t: t)
    records = diagnose(linear(tiny["c1"], copy))
    assert len(records) == 39
    assert all(r["angle_deg"] < 0.05 and r["rel_diff"] == 0 for r in records)
    assert all(r["slerp_fallback"] for r in records)


def test_a_scaled_copy_has_angle_zero_and_a_known_norm_ratio(tiny, tmp_path):
    scaled = transformed_copy(tiny["c1"], tmp_path / "scaled", lambda n, t: 3 * t)
    for row in diagnose(linear(tiny["c1"], scaled)):
        assert row["angle_deg"] < 0.05
        assert row["rel_diff"] == pytest.approx(2.0, rel=1e-5)  # |A - 3A| / |A|


def test_an_orthogonal_perturbation_has_a_known_angle(tiny, tmp_path):
    generator = torch.Generator().manual_seed(0)

    def perturb(name, tensor):
        a = tensor.reshape(-1)
        r = torch.randn(a.shape, generator=generator, dtype=torch.float64)
        p = r - (r @ a.double()) / (a.double() @ a.double()) * a.double()
        p = p / p.norm() * a.double().norm()  # |P| = |A|, P orthogonal to A: 45 degrees
        return (a.double() + p).float().reshape(tensor.shape)

    bent = transformed_copy(tiny["c1"], tmp_path / "bent", perturb)
    for row in diagnose(linear(tiny["c1"], bent)):
        assert row["angle_deg"] == pytest.approx(45.0, abs=0.01)
        assert row["rel_diff"] == pytest.approx(1.0, rel=1e-4)
        assert not row["slerp_fallback"]


def test_task_vector_metrics_with_a_base(tiny, tmp_path):
    opposite = transformed_copy(tiny["c1"], tmp_path / "opposite",
                                lambda n, t: 2 * load_file(tiny["base"] / "model.safetensors")[n] - t)
    text = (f"models:\n  - model: {tiny['c1']}\n    parameters: {{weight: 1, density: 0.5}}\n"
            f"  - model: {opposite}\n    parameters: {{weight: 1, density: 0.5}}\n"
            f"merge_method: ties\nbase_model: {tiny['base']}\n")
    for row in diagnose(text):
        assert row["tv_angle_deg"] == pytest.approx(180.0, abs=0.1)  # opposite task vectors
        assert row["sign_conflicts"] == pytest.approx(1.0, abs=0.02)  # every entry conflicts
        # each keeps its top half, then the vote keeps one side of every tie-free conflict
        assert 0 < row["kept_a"] < 0.5 and 0 < row["kept_b"] < 0.5
        assert row["kept_a"] + row["kept_b"] == pytest.approx(0.5, abs=0.02)


def test_figures_show_every_layer_and_module(tiny):
    text = (f"models:\n  - model: {tiny['c1']}\nmerge_method: slerp\nbase_model: {tiny['base']}\n"
            "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - value: 0.5\n")
    records = diagnose(text)
    figure = heatmap(records, "angle_deg")
    data = figure.data[0]
    assert list(data.y) == [0, 1, 2, 3] and set(data.x) == {"q", "k", "v", "o", "gate", "up", "down", "norm"}
    assert "angle_deg = %{z" in data.hovertemplate
    plan = plan_stages(text)[0]
    values = parameter_records(plan, "t")
    q_values = sorted((r["layer"], r["value"]) for r in values if r["module"] == "q")
    assert q_values == [(0, 0.0), (1, pytest.approx(1 / 3)), (2, pytest.approx(2 / 3)), (3, 1.0)]
    curves = layer_curves(records, "angle_deg", values)
    names = [trace.name for trace in curves.data]
    assert "q" in names and "t (q, k, v, o)" in names  # one t-line per distinct curve
    assert names.count("t (q, k, v, o)") == 1 and not any(n == "t (q)" for n in names)
    norm_trace = next(t for t in curves.data if t.name == "norm")
    fallbacks = [r for r in records if r["module"] == "norm" and r["layer"] is not None]
    assert list(norm_trace.marker.symbol).count("x") == sum(r["slerp_fallback"] for r in fallbacks)
    json.dumps(curves.to_plotly_json(), default=str)  # serializable for the browser
    assert math.isfinite(sum(r["angle_deg"] for r in records))


def _flat_records(modules=("q", "k", "v", "o", "gate", "up", "down", "norm"), layers=4):
    return [{"layer": layer, "module": module, "angle_deg": float(layer + index), "slerp_fallback": False,
             "model_a": "a", "model_b": "b"}
            for layer in range(layers) for index, module in enumerate(modules)]


def test_layer_curves_one_line_per_distinct_curve_on_the_declared_range():
    modules = ("q", "k", "v", "o", "gate", "up", "down", "norm")
    values = [{"layer": layer, "module": module, "low": 0.0, "high": 1.0,
               "value": layer / 3 if module in "qkvo" else (1 - layer / 3 if module in ("gate", "up", "down") else 0.5)}
              for layer in range(4) for module in modules]
    figure = layer_curves(_flat_records(), "angle_deg", values, "t")
    t_lines = [trace for trace in figure.data if trace.yaxis == "y2"]
    assert [trace.name for trace in t_lines] == ["t (q, k, v, o)", "t (gate, up, down)", "t (norm)"]
    assert len(figure.data) == 8 + 3  # 8 metric curves, 3 distinct t-lines (not 8)
    assert list(figure.layout.yaxis2.range) == [0.0, 1.0]  # t's declared range, not autorange to 1.7
    legend = figure.layout.legend
    # below the plot, in the figure's margin: never over the data or an axis title
    assert legend.orientation == "h" and legend.yref == "container" and legend.yanchor == "bottom"
    assert legend.y < 0.05 and figure.layout.margin.b >= 60 + 22 * 2  # 11 entries: two legend rows
    assert figure.layout.yaxis.automargin and figure.layout.yaxis2.automargin and figure.layout.xaxis.automargin
    assert figure.layout.yaxis.title.text == "angle_deg"


def test_layer_curves_range_of_an_open_parameter_and_without_parameters():
    values = [{"layer": layer, "module": "q", "value": 2.0 * layer, "low": 0.0, "high": None} for layer in range(4)]
    figure = layer_curves(_flat_records(("q",)), "angle_deg", values, "weight")
    assert list(figure.layout.yaxis2.range) == [0.0, 6.0]
    plain = layer_curves(_flat_records(("q", "k")), "angle_deg", None, "")
    assert [trace.name for trace in plain.data] == ["q", "k"] and "yaxis2" not in plain.to_plotly_json()["layout"]


def test_heatmap_titles_have_room():
    figure = heatmap(_flat_records(), "angle_deg")
    assert figure.layout.yaxis.automargin and figure.layout.xaxis.automargin
    assert figure.layout.yaxis.title.text == "layer"
