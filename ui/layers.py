"""Per-layer control of a numeric parameter (slerp's t, a model's weight): control points for
attention, MLP and the rest, expanded to one value per layer by mergekit's gradient rule,
presets, edits on a range of layers, and the exact per-layer values the merge will use.

The recipe stays the single source of truth: controls write a `filter` list into it and
read one back from it.
"""

from __future__ import annotations

import math

from merging import MergeError
from merging.layer_values import expand
from merging.limits import check

PRESETS = {  # (attention, MLP, other) control points
    "flat 0.5": ([0.5], [0.5], [0.5]),
    "ramp up (A at the bottom, B at the top)": ([0, 1], [0, 1], [0.5]),
    "ramp down": ([1, 0], [1, 0], [0.5]),
    "V (B at both ends, A in the middle)": ([1, 0, 1], [1, 0, 1], [0.5]),
    "smoothstep": ([0, 0.028, 0.104, 0.216, 0.352, 0.5, 0.648, 0.784, 0.896, 0.972, 1],) * 2 + ([0.5],),
    "LazyMergekit gradient": ([0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0], [0.5]),
    "attention from A, MLP from B": ([0], [1], [0.5]),
}


def parse_points(text: str, label: str) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]; one value is a flat line. At most one point per
    layer of the largest output allowed (merging.limits), each a finite number."""
    text = str(text or "")
    check("recipe_bytes", len(text), f"{label}: the control points are {len(text)} characters")
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise MergeError(f"{label}: give at least one value")
    check("output_layers", len(parts), f"{label}: {len(parts)} control points")
    try:
        points = [float(p) for p in parts]
    except ValueError:
        raise MergeError(f"{label}: '{text[:60]}' is not a list of numbers") from None
    if not all(math.isfinite(p) for p in points):
        raise MergeError(f"{label}: control points must be finite numbers")
    return points


def format_points(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def values_figure(attention: list[float], mlp: list[float], other: list[float], layers: int,
                  axis_title: str = "t", bounds: tuple = (0.0, 1.0)):
    """The exact per-layer values, one curve per module type (lines that coincide share one
    legend entry), on the parameter's own range (`bounds`; None: open at that end)."""
    import plotly.graph_objects as go

    figure = go.Figure()
    curves: dict[tuple, list[str]] = {}
    for label, points in (("attention", attention), ("MLP", mlp), ("other", other)):
        curves.setdefault(tuple(expand(points, layers)), []).append(label)
    for (values, labels), dash in zip(curves.items(), ("solid", "dash", "dot")):
        label = " = ".join(labels)
        figure.add_trace(go.Scatter(x=list(range(layers)), y=list(values), mode="lines+markers", name=label,
                                    line={"dash": dash},
                                    hovertemplate=f"{label}, layer %{{x}}: %{{y:.4f}}<extra></extra>"))
    shown = [v for values in curves for v in values]
    low = min(shown + ([bounds[0]] if bounds[0] is not None else []))
    high = max(shown + ([bounds[1]] if bounds[1] is not None else []))
    pad = 0.05 * ((high - low) or 1.0)
    figure.update_layout(xaxis_title="layer", yaxis_title=axis_title, yaxis={"range": [low - pad, high + pad],
                                                                            "automargin": True},
                         height=320, margin={"l": 70, "r": 20, "t": 40, "b": 40},
                         # above the data, on the right: the plot's label box sits on the left
                         legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1})
    return figure
