"""Per-layer values of an interpolation parameter such as slerp's t: control points for
attention, MLP and the rest, written into a recipe as a `filter` list and read back,
expanded to one value per layer by mergekit's gradient rule, and edited on a range of
layers. The UI's per-layer controls and the sweeps over a layer range both use them.
"""

from __future__ import annotations

import copy
from typing import Optional

from .config import MergeConfig
from .errors import MergeError
from .parameters import gradient_value

FILTERS = ("self_attn", "mlp")  # what LazyMergekit writes for Llama-style models
ATTENTION_NAMES = ("self_attn", "self_attention", "attention", "attn")  # Llama, Falcon, GPT-NeoX, GPT-2
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def module_filters(plan) -> tuple[str, str]:
    """The (attention, MLP) filter texts that match this merge's text blocks: mergekit
    filters are substrings, and architectures name their attention differently."""
    reference = plan.config.base_model or plan.config.referenced_models()[0]
    layout = plan.checkpoints[reference].layout
    names = [match for name in layout.layer_tensors(0) for match in layout.match_names(name)]

    def first(options: tuple[str, ...], default: str) -> str:
        return next((option for option in options if any(option in name for name in names)), default)

    return first(ATTENTION_NAMES, FILTERS[0]), first(MLP_NAMES, FILTERS[1])


def _setting(values: list[float]):
    return values[0] if len(values) == 1 else values


def layer_parameters(config: MergeConfig) -> list[str]:
    """The method's global numeric parameters: those one value per layer can shape."""
    return [p.name for p in config.method.global_parameters if p.kind in (float, int)]


def require_layer_parameter(config: MergeConfig, name: str) -> None:
    """A MergeError naming what the method has, when it has no global numeric `name`."""
    if name in layer_parameters(config):
        return
    method = config.method
    own = ", ".join([f"{p.name} (per model)" if p.per_model else p.name for p in method.parameters]) or "none"
    shaped = layer_parameters(config)
    hint = (f"; per layer it can take {', '.join(shaped)}" if shaped else
            "; it has no global value to shape per layer (set per-model values in Build a recipe)")
    raise MergeError(f"{config.merge_method} has no '{name}': its parameters are {own}{hint}")


def with_layer_points(config: MergeConfig, name: str, attention: list[float], mlp: list[float],
                      other: list[float], filters: tuple[str, str] = FILTERS) -> MergeConfig:
    """The config with `name` set as [attention points, mlp points, the rest], the first two
    as `filters` (see module_filters). Refused for a parameter the method does not declare
    globally: the merge would ignore it."""
    require_layer_parameter(config, name)
    changed = copy.deepcopy(config)
    changed.parameters = {**(changed.parameters or {}), name: [
        {"filter": filters[0], "value": _setting(attention)},
        {"filter": filters[1], "value": _setting(mlp)},
        {"value": _setting(other)},
    ]}
    # a slice's own value would shadow the new one; in a `modules` recipe the per-layer values
    # are the text decoder's (the other modules keep a value of their own)
    changed.drop_shadowing(name, changed.text_module())
    changed.check()
    return changed


def points_from_config(config: MergeConfig, name: str, filters: tuple[str, str] = FILTERS
                       ) -> tuple[list[float], list[float], list[float]]:
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
    for key in tuple(filters) + (None,):
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
