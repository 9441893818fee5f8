"""Per-layer values of a numeric parameter (slerp's t, or a model's own weight or density in
TIES): control points for attention, MLP and the rest, written into a recipe as a `filter`
list and read back, expanded to one value per layer by mergekit's gradient rule, and edited
on a range of layers. The UI's per-layer controls and the sweeps over a layer range both use them.
"""

from __future__ import annotations

import copy
from typing import Optional

from .config import MergeConfig
from .errors import MergeError
from .limits import check as check_limit
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


def models_with_parameters(method, models: list[str], base: Optional[str]) -> list[str]:
    """The models that take per-model parameters: all but the base, or, for methods that
    treat the base as one more input (linear, karcher, passthrough), the base too."""
    others = [m for m in dict.fromkeys(models or []) if m != base]
    return ([base] + others) if method.base == "ignored" and base else others


def layer_parameters(config: MergeConfig) -> list[str]:
    """What one value per layer can shape, as `with_parameter` names it: the method's global
    numeric parameters (`t`), then each per-model one for each model that takes it
    (`weight@MODEL`, `density@MODEL`)."""
    method = config.method
    numeric = [p for p in method.parameters if p.kind in (float, int)]
    names = [p.name for p in numeric if not p.per_model]
    owners = models_with_parameters(method, [e.model for e in config.model_entries()], config.base_model)
    return names + [f"{p.name}@{model}" for model in owners for p in numeric if p.per_model]


def parameter_bounds(config: MergeConfig, key: str) -> tuple[Optional[float], Optional[float]]:
    """The (low, high) a value of `key` (see layer_parameters) must stay within; None: open."""
    declared = next(p for p in config.method.parameters if p.name == key.partition("@")[0])
    return declared.low, declared.high


def require_layer_parameter(config: MergeConfig, key: str) -> None:
    """A MergeError naming what the method has, when `key` is not one it can shape per layer."""
    if not isinstance(key, str):
        raise MergeError(f"the parameter must be a name such as t or weight@MODEL, got {type(key).__name__}")
    check_limit("recipe_bytes", len(key), f"the parameter's name is {len(key)} characters")
    shaped = layer_parameters(config)
    if key in shaped:
        return
    method = config.method
    name, _, model = key.partition("@")
    own = ", ".join([f"{p.name} (per model)" if p.per_model else p.name for p in method.parameters]) or "none"
    if model and any(p.name == name and p.per_model for p in method.parameters):
        raise MergeError(f"{config.merge_method} takes no '{name}' for '{model}': the models that take one are "
                         f"{', '.join(k.partition('@')[2] for k in shaped if k.startswith(name + '@')) or 'none'}")
    hint = f"; per layer it can take {', '.join(_readable(k) for k in shaped)}" if shaped else (
        "; it has no numeric value to shape per layer")
    raise MergeError(f"{config.merge_method} has no '{name}': its parameters are {own}{hint}")


def _readable(key: str) -> str:
    name, _, model = key.partition("@")
    return f"{name} of {model.rstrip('/').split('/')[-1]}" if model else name


def _holders(config: MergeConfig, key: str) -> list:
    """Where `key`'s setting lives: the model's own entries (in `models` or slice sources) for
    `name@MODEL`, else the top level."""
    name, _, model = key.partition("@")
    return [e for e in config.model_entries() if e.model == model] if model else [config]


def with_layer_points(config: MergeConfig, key: str, attention: list[float], mlp: list[float],
                      other: list[float], filters: tuple[str, str] = FILTERS) -> MergeConfig:
    """The config with `key` (a global parameter, or `name@MODEL`: that model's own) set as
    [attention points, mlp points, the rest], the first two as `filters` (see
    module_filters). Refused for a parameter the method does not declare: the merge would
    ignore it."""
    require_layer_parameter(config, key)
    name, _, model = key.partition("@")
    changed = copy.deepcopy(config)
    setting = [
        {"filter": filters[0], "value": _setting(attention)},
        {"filter": filters[1], "value": _setting(mlp)},
        {"value": _setting(other)},
    ]
    for holder in _holders(changed, key):
        holder.parameters = {**(holder.parameters or {}), name: copy.deepcopy(setting)}
    if not model:
        # a slice's own value would shadow the new one; in a `modules` recipe the per-layer
        # values are the text decoder's (the other modules keep a value of their own)
        changed.drop_shadowing(name, changed.text_module())
    changed.check()
    return changed


def points_from_config(config: MergeConfig, key: str, filters: tuple[str, str] = FILTERS
                       ) -> tuple[list[float], list[float], list[float]]:
    """Read (attention, MLP, other) control points back for `key` (see with_layer_points): a
    model's own setting, else the top level's (mergekit's lookup order), else the method's
    default. Refused for a parameter the method does not take (see with_layer_points)."""
    require_layer_parameter(config, key)
    name, _, model = key.partition("@")
    scopes = [h.parameters or {} for h in _holders(config, key)] + ([config.parameters or {}] if model else [])
    setting = next((scope[name] for scope in scopes if scope.get(name) is not None), None)
    if setting is None:
        declared = next((p for p in config.method.parameters if p.name == name), None)
        if declared is None or declared.required or not isinstance(declared.default, (int, float)):
            raise MergeError(f"the recipe sets no '{_readable(key)}'")
        setting = declared.default

    def values(value) -> list[float]:
        return [float(v) for v in value] if isinstance(value, list) else [float(value)]

    if not (isinstance(setting, list) and setting and isinstance(setting[0], dict)):
        return values(setting), values(setting), values(setting)
    found = {}
    for entry in setting:
        key_text = entry.get("filter")
        key_text = None if key_text in (None, "*") else key_text
        found.setdefault(key_text, values(entry["value"]))
    fallback = found.get(None)
    result = []
    for filter_text in tuple(filters) + (None,):
        if filter_text in found or fallback is not None:
            result.append(found.get(filter_text, fallback))
        else:
            raise MergeError(f"'{_readable(key)}' has no value for {filter_text or 'the other tensors'}")
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
