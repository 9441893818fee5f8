"""Which keys mergekit reads at each place of a recipe, and where a misplaced one belongs.

mergekit's config schema ignores keys it does not declare, and a merge method ignores the
parameters it does not take: a recipe with a mis-indented `int8_mask` merges there without
a word. Here such a key is a warning that names it, says it has no effect and suggests its
place; strict checking (`--strict`, the app's strict switch) makes it an error.
"""

from __future__ import annotations

from typing import Optional

from .errors import did_you_mean

TOP_LEVEL = ("name", "merge_method", "base_model", "models", "slices", "modules", "parameters",
             "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")
MODEL_ENTRY = ("model", "parameters")
SLICE = ("sources", "base_model", "parameters")
MODULE = ("slices", "models", "parameters")  # one entry of `modules:` (mergekit's OutputModuleDefinition)
SOURCE = ("model", "layer_range", "parameters")
TOKENIZER = ("source", "tokens", "pad_to_multiple_of")
MODEL_REFERENCE = ("model", "lora", "override_architecture")  # a model given as a mapping
MODEL_PATH = ("path", "revision")
NO_EFFECT = "has no effect (mergekit ignores it)"


def parameter_names(per_model: Optional[bool] = None) -> set[str]:
    """Every parameter some method declares (only per-model or only global ones if asked)."""
    from .methods import METHODS

    return {p.name for m in METHODS.values() for p in m.parameters
            if per_model is None or p.per_model == per_model}


def home_of(key: str, valid: tuple, entry: str = "", method=None) -> str:
    """'; did you mean X?' naming where `key` belongs, for a key found where `valid` are
    the keys read; `entry` is the path of the model entry or slice source it sits in."""
    declared = method.parameter(key) if method is not None else None
    if declared is not None or key in parameter_names():
        per_model = declared.per_model if declared is not None else key in parameter_names(per_model=True)
        return f"; did you mean {entry + '.' if per_model and entry else ''}parameters.{key}?"
    if key in TOKENIZER and key != "source":
        return f"; did you mean tokenizer.{key}?"
    if key == "revision":
        return "; did you mean model: NAME@REVISION?"
    if key == "lora":
        return "; did you mean model: NAME+LORA?"
    if key == "layer_range":
        return "; did you mean slices[].sources[].layer_range (a layer range needs slices)?"
    if key in TOP_LEVEL and key not in valid:
        return f"; did you mean the top-level {key}?"
    hint = did_you_mean(key, valid)
    return f"; did you mean {hint[len(' (did you mean '):-2]}?" if hint else ""


def ignored_key(key: str, where: str, valid: tuple, entry: str = "", method=None, top_level: bool = False) -> str:
    """The warning for a key mergekit ignores; `where` says where it was found (' in models[0]')."""
    return f"{'top-level ' if top_level else ''}key '{key}'{where} {NO_EFFECT}{home_of(key, valid, entry, method)}"


def ignored_parameter(name: str, label: str, method) -> str:
    """The warning for a parameter the method does not take (mergekit ignores it)."""
    from .methods import METHODS

    takers = sorted(m.name for m in METHODS.values() if m.parameter(name) is not None)
    if takers:
        shown = ", ".join(takers[:3]) + (" ..." if len(takers) > 3 else "")
        hint = f"; {shown} take{'s' if len(takers) == 1 else ''} it"
    elif name in TOKENIZER or name in TOP_LEVEL:
        hint = home_of(name, ())
    else:
        hint = did_you_mean(name, [p.name for p in method.parameters])
        hint = f"; did you mean {hint[len(' (did you mean '):-2]}?" if hint else ""
    return f"parameter '{name}'{label} has no effect on {method.name} (mergekit ignores it){hint}"


def misplaced_global(name: str, label: str, method, home: str) -> str:
    """The warning for a global parameter given per model: mergekit reads a method's global
    parameters from the top-level and slice parameters only."""
    return (f"parameter '{name}'{label} has no effect (mergekit reads {method.name}'s global parameters "
            f"only from the top-level and slice parameters); did you mean {home}?")
