"""Per-layer, per-module diagnostics of the models in a merge, and plotly figures of them.

For every output tensor with two or more inputs, and every pair of its input models:

    cosine     = <A, B> / (|A| |B|),  angle_deg = degrees(arccos(cosine))
    rel_diff   = |A - B| / |A|
    tv_cosine  = the same between the task vectors A - base and B - base (with a base)
    slerp_fallback = |cosine| > 0.9995: slerp at these weights is linear interpolation

and, for the task-vector methods, the fraction of entries where the task vectors'
signs conflict and the fraction of each model's entries that survive pruning at its
current density and the sign vote. Computed one tensor at a time from the memory-mapped
files; the parameter-free numbers are cached per model set. Records are tidy dicts (one
per tensor and pair) that pandas or plotly take as they are.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

import torch

from . import architecture as arch
from .config import load_config
from .engine import TaskInputs, make_inputs, resolve_device
from .methods import task_arithmetic
from .methods.interpolation import slerp_cosine
from .pipeline import open_checkpoints
from .plan import MergePlan, TensorTask, plan_merge

SLERP_DOT_THRESHOLD = 0.9995
METRICS = {
    "angle_deg": "angle between the weights (degrees)",
    "cosine": "cosine between the weights",
    "rel_diff": "relative difference norm |A-B| / |A|",
    "tv_angle_deg": "angle between the task vectors (degrees)",
    "tv_cosine": "cosine between the task vectors",
    "sign_conflicts": "fraction of entries whose task-vector signs conflict",
    "kept_a": "fraction of model A's task vector kept (pruning and sign vote)",
    "kept_b": "fraction of model B's task vector kept (pruning and sign vote)",
}
_cache: dict = {}  # (model A, model B, base, tensor A, tensor B) -> parameter-free numbers


def diagnose(config, progress: Optional[Callable[[int, int, str], None]] = None, device: str = "cpu",
             seed: int = 0) -> list[dict]:
    """Diagnostics of a recipe's models (MergeConfig, YAML text or path)."""
    config = load_config(config)
    plan = plan_merge(config, open_checkpoints(config))
    return diagnose_plan(plan, progress, device, seed)


def diagnose_plan(plan: MergePlan, progress=None, device: str = "cpu", seed: int = 0) -> list[dict]:
    records = []
    target = resolve_device(device)
    for index, task in enumerate(plan.tasks):
        if len(task.inputs) >= 2:
            records.extend(_tensor_records(plan, task, target, seed))
        if progress is not None:
            progress(index + 1, len(plan.tasks), task.name)
    return records


def _tensor_records(plan: MergePlan, task: TensorTask, device, seed: int) -> list[dict]:
    tensors = TaskInputs(plan, task, device).block(0, task.shape[0] if task.shape else 1)
    if not tensors[0].is_floating_point():
        return []
    names = [model for model, _ in task.inputs]
    base = tensors[task.base_index] if task.base_index is not None else None
    others = [i for i in range(len(tensors)) if i != task.base_index]
    kept = _kept_fractions(plan, task, tensors, seed)
    conflicts = _sign_conflicts(tensors, task.base_index)
    pairs = list(itertools.combinations(others, 2))
    if base is not None and plan.method.name in ("slerp", "nearswap"):
        pairs = [(task.base_index, others[0])]  # the pair the method interpolates
    rows = []
    for a, b in pairs:
        key = (names[a], names[b], names[task.base_index] if base is not None else None,
               task.inputs[a][1], task.inputs[b][1])
        numbers = _cache.get(key)
        if numbers is None:
            numbers = _pair_numbers(tensors[a], tensors[b], base if a != task.base_index else None)
            _cache[key] = numbers
        rows.append({
            "tensor": task.name, "layer": task.layer, "module": arch.module_type(task.name),
            "model_a": names[a], "model_b": names[b], **numbers,
            "slerp_fallback": abs(numbers["cosine"]) > SLERP_DOT_THRESHOLD,
            "sign_conflicts": conflicts,
            "kept_a": kept.get(a), "kept_b": kept.get(b),
        })
    return rows


def _angle(cosine: Optional[float]) -> Optional[float]:
    return None if cosine is None else math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def _pair_numbers(a: torch.Tensor, b: torch.Tensor, base: Optional[torch.Tensor]) -> dict:
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    sums = torch.stack([torch.dot(flat_a, flat_b), torch.dot(flat_a, flat_a), torch.dot(flat_b, flat_b)]).double()
    cosine = slerp_cosine(sums)
    norm_a = float(sums[1]) ** 0.5
    rel_diff = float(torch.linalg.vector_norm(flat_a - flat_b)) / norm_a if norm_a > 0 else math.inf
    tv_cosine = None
    if base is not None:
        da, db = flat_a - base.reshape(-1), flat_b - base.reshape(-1)
        norms = float(torch.linalg.vector_norm(da)) * float(torch.linalg.vector_norm(db))
        tv_cosine = float(torch.dot(da, db)) / norms if norms > 0 else 0.0
    return {"cosine": cosine, "angle_deg": _angle(cosine), "rel_diff": rel_diff,
            "tv_cosine": tv_cosine, "tv_angle_deg": _angle(tv_cosine)}


def _sign_conflicts(tensors: list[torch.Tensor], base_index: Optional[int]) -> Optional[float]:
    """Fraction of entries where two task vectors are nonzero with opposite signs."""
    if base_index is None or len(tensors) < 3:
        return None
    base = tensors[base_index]
    signs = torch.stack([torch.sign(t - base) for i, t in enumerate(tensors) if i != base_index])
    conflict = (signs.max(dim=0).values > 0) & (signs.min(dim=0).values < 0)
    return float(conflict.float().mean())


def _kept_fractions(plan: MergePlan, task: TensorTask, tensors, seed: int) -> dict[int, float]:
    """For the task-vector methods with a sign vote or pruning: the fraction of each
    model's entries that survive, at the current parameters (input index -> fraction)."""
    method = plan.method.name
    family = task_arithmetic.FAMILIES.get(method)
    if family is None or task.base_index is None or (family.pruning is None and not family.sign_vote):
        return {}
    base = tensors[task.base_index]
    others = [i for i in range(len(tensors)) if i != task.base_index]
    inputs = make_inputs(plan, task, tensors, seed)
    weighted = []
    for n, (i, params) in enumerate(zip(others, task.model_params)):
        pruned = task_arithmetic.prune(tensors[i] - base, family.pruning, params, inputs, n, None)
        weighted.append(pruned * params["weight"])
    stacked = torch.stack(weighted)
    kept = stacked != 0
    if family.sign_vote:
        kept &= task_arithmetic.sign_mask(stacked)
    return {i: float(kept[n].float().mean()) for n, i in enumerate(others)}


def parameter_records(plan: MergePlan, name: str) -> list[dict]:
    """The exact per-tensor values of parameter `name` the merge uses (one row per tensor,
    and per model for per-model parameters), with slerp's fallbacks where known. Each row
    carries the parameter's declared range (`low`, `high`; None where open) for the plots."""
    parameter = plan.method.parameter(name)
    if parameter is None:
        return []
    bounds = {"low": parameter.low, "high": parameter.high}
    rows = []
    for task in plan.tasks:
        base = {"tensor": task.name, "layer": task.layer, "module": arch.module_type(task.name), **bounds}
        if parameter.per_model:
            models = [m for i, (m, _) in enumerate(task.inputs) if i != task.base_index]
            for model, values in zip(models, task.model_params):
                rows.append({**base, "model": model, "value": values.get(name)})
        else:
            rows.append({**base, "model": None, "value": task.params.get(name)})
    return rows


# ---- figures -------------------------------------------------------------------------
MODULE_ORDER = ["embed", "qkv", "q", "k", "v", "o", "attn", "gate", "up", "down", "mlp", "norm", "lm_head",
                "other"]


# Legends sit below the plot, in the figure's own margin (container coordinates), so they
# never cover data or axis titles; axes grow their margins to hold their whole titles.
LEGEND_BELOW = {"orientation": "h", "xref": "container", "x": 0.01, "xanchor": "left", "yref": "container",
                "y": 0.01, "yanchor": "bottom"}
LEGEND_ROW_PX = 22  # one row of a horizontal legend
LEGEND_ENTRIES_PER_ROW = 6  # what fits across a half-width plot at 1400 px


def heatmap(records: list[dict], metric: str = "angle_deg", pair: Optional[tuple[str, str]] = None):
    """Layers x module types, coloured by `metric` (the mean over a layer's tensors of a
    kind, e.g. both norms); hover shows the numbers. `pair` picks two models."""
    import plotly.graph_objects as go

    rows = [r for r in records if r["layer"] is not None and r.get(metric) is not None]
    if pair is not None:
        rows = [r for r in rows if (r["model_a"], r["model_b"]) == tuple(pair)]
    elif rows:
        first = (rows[0]["model_a"], rows[0]["model_b"])
        rows = [r for r in rows if (r["model_a"], r["model_b"]) == first]
    layers = sorted({r["layer"] for r in rows})
    modules = [m for m in MODULE_ORDER if any(r["module"] == m for r in rows)]
    grid = {(r["layer"], r["module"]): [] for r in rows}
    for r in rows:
        grid[(r["layer"], r["module"])].append(r[metric])
    z = [[(sum(grid[(layer, m)]) / len(grid[(layer, m)])) if (layer, m) in grid else None for m in modules]
         for layer in layers]
    figure = go.Figure(go.Heatmap(
        z=z, x=modules, y=layers, colorscale="Viridis",
        colorbar={"title": {"text": metric, "side": "right"}, "thickness": 14},
        hovertemplate="layer %{y}, %{x}<br>" + metric + " = %{z:.6g}<extra></extra>"))
    figure.update_layout(title=METRICS.get(metric, metric),
                         xaxis={"title": {"text": "module"}, "automargin": True},
                         yaxis={"title": {"text": "layer"}, "autorange": "reversed", "automargin": True},
                         margin={"l": 70, "r": 30, "t": 50, "b": 50})
    return figure


def _distinct_curves(parameters: list[dict]) -> list[tuple[list[str], list[tuple]]]:
    """The parameter's per-layer curves, one per distinct curve: modules whose values are
    the same at every layer share one (q, k, v and o under one attention filter)."""
    curves: dict[tuple, list[str]] = {}
    for module in [m for m in MODULE_ORDER if any(p["module"] == m for p in parameters)] + \
            sorted({p["module"] for p in parameters} - set(MODULE_ORDER)):
        points = tuple(sorted({(p["layer"], p["value"]) for p in parameters
                               if p["module"] == module and p["layer"] is not None and p["value"] is not None}))
        if points:
            curves.setdefault(points, []).append(module)
    return [(modules, list(points)) for points, modules in curves.items()]


def _parameter_range(parameters: list[dict]) -> list[float]:
    """The parameter's declared range where it has one; an open end is 0 or 1, or the
    values' own extreme beyond it."""
    values = [p["value"] for p in parameters if isinstance(p.get("value"), (int, float))]
    low = next((p["low"] for p in parameters if p.get("low") is not None), None)
    high = next((p["high"] for p in parameters if p.get("high") is not None), None)
    low = low if low is not None else min([0.0, *values])
    high = high if high is not None else max([1.0, *values])
    return [low, high]


def layer_curves(records: list[dict], metric: str = "angle_deg", parameters: Optional[list[dict]] = None,
                 parameter_name: str = "t"):
    """Per-layer curves of `metric`, one per module type; the merge's exact per-layer
    parameter values on a second axis (one line per distinct curve, on the parameter's
    declared range); slerp fallbacks marked with an x. The legend sits below the plot."""
    import plotly.graph_objects as go

    figure = go.Figure()
    rows = [r for r in records if r["layer"] is not None and r.get(metric) is not None]
    for module in [m for m in MODULE_ORDER if any(r["module"] == m for r in rows)]:
        points = sorted((r["layer"], r[metric], r["slerp_fallback"]) for r in rows if r["module"] == module)
        figure.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=module,
            marker={"symbol": ["x" if p[2] else "circle" for p in points], "size": [10 if p[2] else 6 for p in points]},
            hovertemplate=f"{module} layer %{{x}}<br>{metric} = %{{y:.6g}}<extra></extra>"))
    curves = _distinct_curves(parameters or [])
    for modules, points in curves:
        label = ", ".join(modules)
        figure.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines", yaxis="y2",
            line={"dash": "dot", "width": 2.5}, name=f"{parameter_name} ({label})",
            hovertemplate=f"{parameter_name} for {label}, layer %{{x}}: %{{y:.4g}}<extra></extra>"))
    entries = len(figure.data)
    legend_rows = max(1, -(-entries // LEGEND_ENTRIES_PER_ROW))
    layout = {
        "title": METRICS.get(metric, metric),
        "xaxis": {"title": {"text": "layer"}, "automargin": True},
        "yaxis": {"title": {"text": metric}, "automargin": True},
        "legend": LEGEND_BELOW,
        "margin": {"l": 70, "r": 70, "t": 50, "b": 60 + LEGEND_ROW_PX * legend_rows},
    }
    if curves:
        layout["yaxis2"] = {"title": {"text": parameter_name}, "overlaying": "y", "side": "right",
                            "showgrid": False, "automargin": True, "range": _parameter_range(parameters)}
    figure.update_layout(**layout)
    return figure
