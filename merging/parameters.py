"""Resolving one parameter for one tensor: lookup order, filters and gradients.

A setting is a scalar, a gradient list of scalars, a {filter, value} dict or a list
of such dicts. Lookup order, first hit wins: the source model's own parameters, then
its output slice's, then the top level's.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Union

Setting = Any
NOT_FOUND = None


def gradient_value(values: list, position: float) -> Any:
    """Value of a gradient list v_0..v_{n-1} at `position` p in [0, 1].

    s = p (n-1), i0 = floor(s), i1 = min(n-1, i0+1), f = s - i0,
    value = (1-f) v[i0] + f v[i1]. Lists of non-numbers pick v[i0] (no blending).
    """
    scaled = position * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    if not (_is_number(values[i0]) and _is_number(values[i1])):  # checks made every list uniform
        return values[i0]
    fraction = scaled - i0
    return (1 - fraction) * values[i0] + fraction * values[i1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_conditional(setting: Setting) -> bool:
    """A {filter, value} entry or a list of them (lists are either all entries or all values)."""
    return isinstance(setting, dict) or (isinstance(setting, list) and bool(setting)
                                         and isinstance(setting[0], dict))


def filter_matches(filter_text: Optional[str], tensor_name: Union[str, tuple[str, ...]]) -> bool:
    """mergekit's rule: no filter or '*' matches all; otherwise a substring match. A tensor
    may be known by several names (as stored, and the module it loads into: Mixtral's stored
    `block_sparse_moe` is transformers' `mlp`); a filter matching any of them matches."""
    if filter_text is None or filter_text == "*":
        return True
    names = (tensor_name,) if isinstance(tensor_name, str) else tensor_name
    return any(bool(name) and filter_text in name for name in names)


def evaluate(setting: Setting, tensor_name: str, position: float) -> Any:
    """The setting's value for `tensor_name` at gradient position `position`, or None
    when no filter entry matches (the lookup then falls through to the next level)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return NOT_FOUND
        if is_conditional(setting):
            for entry in setting:
                if filter_matches(entry.get("filter"), tensor_name):
                    return evaluate(entry.get("value"), tensor_name, position)
            return NOT_FOUND
        return gradient_value(setting, position)
    return setting


def resolve(name: str, scopes: Iterable[Optional[dict]], tensor_name: str, position: float) -> Any:
    """First value found for `name` across `scopes` (highest precedence first), or None."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, position)
            if value is not None:
                return value
    return NOT_FOUND


def leaf_values(setting: Setting) -> Iterator[Any]:
    """Every scalar a setting can produce (gradient endpoints bound what lies between)."""
    if isinstance(setting, dict):
        yield from leaf_values(setting.get("value"))
    elif isinstance(setting, list):
        for entry in setting:
            yield from leaf_values(entry)
    else:
        yield setting
