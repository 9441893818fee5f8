"""Per-layer control of an interpolation parameter (slerp's t): control points for
attention, MLP and the rest, expanded to one value per layer by mergekit's gradient rule,
presets, edits on a range of layers, and the exact per-layer values the merge will use.

The recipe stays the single source of truth: controls write a `filter` list into it and
read one back from it.
"""

from __future__ import annotations

from typing import Optional

from merging import MergeConfig, MergeError
from merging.parameters import gradient_value

PRESETS = {  # (attention, MLP, other) control points
    "flat 0.5": ([0.5], [0.5], [0.5]),
    "ramp up (A at the bottom, B at the top)": ([0, 1], [0, 1], [0.5]),
    "ramp down": ([1, 0], [1, 0], [0.5]),
    "V (B at both ends, A in the middle)": ([1, 0, 1], [1, 0, 1], [0.5]),
    "smoothstep": ([0, 0.028, 0.104, 0.216, 0.352, 0.5, 0.648, 0.784, 0.896, 0.972, 1],) * 2 + ([0.5],),
    "LazyMergekit gradient": ([0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0], [0.5]),
    "attention from A, MLP from B": ([0], [1], [0.5]),
}
FILTERS = ("self_attn", "mlp", None)


def parse_points(text: str, label: str) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]; one value is a flat line."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise MergeError(f"{label}: give at least one value")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise MergeError(f"{label}: '{text}' is not a list of numbers") from None


def format_points(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _setting(values: list[float]):
    return values[0] if len(values) == 1 else values


def with_layer_points(config: MergeConfig, name: str, attention: list[float], mlp: list[float],
                      other: list[float]) -> MergeConfig:
    """The config with `name` set as [self_attn points, mlp points, the rest]."""
    import copy

    changed = copy.deepcopy(config)
    changed.parameters = {**(changed.parameters or {}), name: [
        {"filter": "self_attn", "value": _setting(attention)},
        {"filter": "mlp", "value": _setting(mlp)},
        {"value": _setting(other)},
    ]}
    for output_slice in changed.slices or []:  # a slice's own value would shadow the new one
        if output_slice.parameters:
            output_slice.parameters.pop(name, None)
    changed.check()
    return changed


def points_from_config(config: MergeConfig, name: str) -> tuple[list[float], list[float], list[float]]:
    """Read (attention, MLP, other) control points back from the top-level parameter."""
    setting = (config.parameters or {}).get(name)
    if setting is None:
        raise MergeError(f"the recipe sets no top-level '{name}'")

    def values(value) -> list[float]:
        return [float(v) for v in value] if isinstance(value, list) else [float(value)]

    if not (isinstance(setting, list) and setting and isinstance(setting[0], dict)):
        return values(setting), values(setting), values(setting)
    found = {}
    for entry in setting:
        key = entry.get("filter")
        key = None if key in (None, "*") else key
        found.setdefault(key, values(entry["value"]))
    fallback = found.get(None)
    result = []
    for key in FILTERS:
        if key in found or fallback is not None:
            result.append(found.get(key, fallback))
        else:
            raise MergeError(f"'{name}' has no value for {key or 'the other tensors'}")
    return tuple(result)


def expand(points: list[float], layers: int) -> list[float]:
    """One value per layer, as the merge computes them (mergekit's gradient rule)."""
    return [gradient_value(points, j / (layers - 1) if layers > 1 else 1.0) for j in range(layers)]


def edit_range(values: list[float], operation: str, first: int, last: int, amount: float,
               low: Optional[float] = 0.0, high: Optional[float] = 1.0) -> list[float]:
    """set / add / multiply the values of layers first..last (inclusive), clipped to range."""
    if not 0 <= first <= last < len(values):
        raise MergeError(f"layers {first}..{last} are outside 0..{len(values) - 1}")
    result = list(values)
    for j in range(first, last + 1):
        value = {"set": amount, "add": result[j] + amount, "multiply": result[j] * amount}[operation]
        if low is not None:
            value = max(low, value)
        if high is not None:
            value = min(high, value)
        result[j] = value
    return result


def values_figure(attention: list[float], mlp: list[float], other: list[float], layers: int,
                  names: tuple[str, str] = ("model A", "model B")):
    """The exact per-layer values, one curve per module type."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for label, points, dash in (("attention", attention, "solid"), ("MLP", mlp, "dash"), ("other", other, "dot")):
        figure.add_trace(go.Scatter(x=list(range(layers)), y=expand(points, layers), mode="lines+markers",
                                    name=label, line={"dash": dash},
                                    hovertemplate=f"{label}, layer %{{x}}: t = %{{y:.4f}}<extra></extra>"))
    figure.update_layout(xaxis_title="layer", yaxis_title=f"t (0 = {names[0]}, 1 = {names[1]})",
                         yaxis={"range": [-0.05, 1.05]}, height=300,
                         margin={"l": 60, "r": 20, "t": 20, "b": 40}, legend={"orientation": "h", "y": 1.1})
    return figure
