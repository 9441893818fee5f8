"""MergeConfig: a merge recipe in mergekit's YAML format, in and out, with validation.

One YAML document is one `MergeConfig`; a file of several documents (separated by
`---`, each with a `name`) is a `MultiStageConfig` whose stages run in dependency
order. `MergeConfig.from_yaml` returns whichever the text holds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from . import parameters as params_mod
from .errors import MergeError, did_you_mean
from .limits import check as check_limit
from .methods import METHODS, get_method
from .recipe_keys import (MODEL_ENTRY, MODEL_PATH, MODEL_REFERENCE, MODULE, SLICE, SOURCE, TOKENIZER, TOP_LEVEL,
                          ignored_key, ignored_parameter, misplaced_global)
from .safe_yaml import load_documents

TOP_LEVEL_KEYS = TOP_LEVEL
DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numbers_from_strings(value: Any) -> Any:
    """YAML 1.1 reads 1e-3 as a string; parameter values mean numbers, so convert them."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers_from_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: (_numbers_from_strings(v) if k == "value" else v) for k, v in value.items()}
    return value


def _parameter_dict(raw: Any, where: str) -> Optional[dict]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise MergeError(f"parameters{where} must be a mapping of name to value, got {raw!r}")
    return {str(k): _numbers_from_strings(v) for k, v in raw.items()}


def model_name(raw: Any, where: str, notes: Optional[list] = None) -> str:
    """A model reference as mergekit reads one: a local folder, a hub id `org/name[@revision]`,
    `model+lora` (each side with its own @revision), a stage name, or the mapping form
    {model: NAME or {path, revision}, lora: ...}. Keys mergekit ignores in a mapping are
    noted in `notes` (warnings)."""
    if isinstance(raw, dict):
        if "model" not in raw:
            raise MergeError(f"model{where} given as a mapping needs a 'model' key, got keys "
                             f"{', '.join(map(str, raw)) or 'none'}")
        _note_ignored(raw, MODEL_REFERENCE, f" in the model reference{where}", notes)
        if raw.get("override_architecture") is not None:
            raise MergeError(f"override_architecture{where} is not supported; MergeLab reads a model's "
                             "architecture from its config.json")
        text = _model_path(raw["model"], where, notes)
        if raw.get("lora") is not None:
            text += "+" + _model_path(raw["lora"], f"{where} (lora)", notes)
        raw = text
    if not isinstance(raw, str) or not raw.strip():
        raise MergeError(f"model{where} must be a path or hub id, got {raw!r}")
    name = raw.strip()
    parts = name.split("+")
    if len(parts) > 2:
        raise MergeError(f"model '{name[:80]}'{where} has more than one '+'; write MODEL+LORA")
    for part in parts:
        if part.count("@") > 1:
            raise MergeError(f"model '{part[:80]}'{where} has more than one '@'; write NAME@REVISION")
        if not part.strip() or part.endswith("@") or part.startswith("@"):
            raise MergeError(f"model '{name[:80]}'{where} is not NAME[@REVISION][+LORA[@REVISION]]")
    return name


def _model_path(raw: Any, where: str, notes: Optional[list]) -> str:
    """mergekit's ModelPath: a string, or {path, revision}."""
    if isinstance(raw, dict):
        _note_ignored(raw, MODEL_PATH, f" in the model path{where}", notes)
        path, revision = raw.get("path"), raw.get("revision")
        if not isinstance(path, str) or not path.strip():
            raise MergeError(f"model{where} needs a 'path', got {raw!r}")
        if revision is not None and not isinstance(revision, (str, int)):
            raise MergeError(f"revision{where} must be a name, got {revision!r}")
        return f"{path.strip()}@{revision}" if revision else path.strip()
    if not isinstance(raw, str) or not raw.strip():
        raise MergeError(f"model{where} must be a path or hub id, got {raw!r}")
    return raw.strip()


def _note_ignored(data: dict, valid: tuple, where: str, notes: Optional[list], entry: str = "") -> None:
    """A warning in `notes` for every key of `data` mergekit does not read there (`where`
    says where, ' in models[0]'; `entry` is that model entry's path, for hints)."""
    for key in data:
        if key not in valid and notes is not None:
            notes.append(ignored_key(str(key), where, valid, entry))


@dataclass
class InputModel:
    model: str
    parameters: Optional[dict] = None


@dataclass
class SliceSource:
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict] = None


@dataclass
class OutputSlice:
    sources: list[SliceSource]
    base_model: Optional[str] = None
    parameters: Optional[dict] = None


@dataclass
class ModuleSpec:
    """One part of a multimodal model in a `modules` recipe (mergekit's module names:
    text_decoder, vision_tower, audio_tower, multi_modal_projector): its own `models` (the
    module's stack whole) or `slices` (layer ranges over the module's own stack), and its
    `parameters`, looked up after a slice's and before the top level's."""

    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict] = None


@dataclass
class MergeConfig:
    """One merge: `models` (all layers), `slices` (layer ranges) or `modules` (each part of
    a multimodal model with its own models or slices), a method, parameters."""

    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, ModuleSpec]] = None
    base_model: Optional[str] = None
    parameters: Optional[dict] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[dict] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None
    warnings: list[str] = field(default_factory=list, repr=False, compare=False)
    # keys mergekit ignores, found while reading the YAML (check() adds ignored parameters to
    # `ignored`); warnings, and errors with strict checking
    notes: list[str] = field(default_factory=list, repr=False, compare=False)
    ignored: list[str] = field(default_factory=list, repr=False, compare=False)

    # ---- reading -----------------------------------------------------------------
    @staticmethod
    def from_yaml(text_or_path: Union[str, os.PathLike]) -> Union["MergeConfig", "MultiStageConfig"]:
        """Parse mergekit YAML from text or a file path (several documents: multi-stage)."""
        return MergeConfig.from_text(_read_text(text_or_path))

    @staticmethod
    def from_text(text: str) -> Union["MergeConfig", "MultiStageConfig"]:
        """Parse recipe text; never opens a file, whatever the text says (a recipe box in
        the app holds text a visitor sent). Size, nesting and node count are bounded first."""
        if not isinstance(text, str):
            raise MergeError(f"a recipe is YAML text, got {type(text).__name__}")
        documents = load_documents(text)
        if not documents:
            raise MergeError("the config is empty")
        if any(map(is_moe_document, documents)):
            from .moe_config import MoEConfig  # imports this module's helpers: imported here

            if len(documents) > 1:
                raise MergeError("an MoE config (with 'experts') is one YAML document; build it, then "
                                 "name its folder in a merge")
            return MoEConfig.from_dict(documents[0])
        configs = [MergeConfig.from_dict(d, where=_doc_label(i, len(documents)))
                   for i, d in enumerate(documents)]
        if len(configs) == 1:
            return configs[0]
        return MultiStageConfig(configs)

    @staticmethod
    def from_dict(data: Any, where: str = "") -> "MergeConfig":
        if not isinstance(data, dict):
            raise MergeError(f"the config{where} must be a mapping, got {type(data).__name__}")
        unknown = [str(k) for k in data if k not in TOP_LEVEL_KEYS]
        has_models, has_slices, has_modules = (bool(data.get(k)) for k in ("models", "slices", "modules"))
        inputs_given = has_models + has_slices + has_modules
        missing = ([] if "merge_method" in data else ["merge_method"]) + \
                  (["models", "slices", "modules"] if inputs_given != 1 else [])
        for key in unknown:  # a misspelt required key: mergekit fails too, so name the spelling
            hint = did_you_mean(key, missing)
            if hint:
                raise MergeError(f"unknown key '{key}'{where}{hint}")
        if "merge_method" not in data:
            raise MergeError(f"the config{where} has no merge_method")
        method = data["merge_method"]
        if not isinstance(method, str):
            raise MergeError(f"merge_method{where} must be a name, got {method!r}")
        if inputs_given != 1:
            raise MergeError(f"the config{where} needs exactly one of 'models', 'slices' or 'modules'")
        declared = METHODS.get(method)
        notes = [ignored_key(key, where, TOP_LEVEL_KEYS, method=declared, top_level=True) for key in unknown]

        models = slices = modules = None
        if has_models:
            models = _input_models(data["models"], "", where, notes)
        elif has_slices:
            slices = _output_slices(data["slices"], "", where, notes)
        else:
            modules = _modules(data["modules"], where, notes)
            count = sum(len(m.slices or []) for m in modules.values())
            check_limit("slices", count, f"the recipe{where} has {count} slices")

        config = MergeConfig(
            merge_method=method,
            models=models,
            slices=slices,
            modules=modules,
            base_model=(model_name(data["base_model"], f" of base_model{where}", notes)
                        if data.get("base_model") else None),
            parameters=_parameter_dict(data.get("parameters"), where),
            dtype=_dtype(data.get("dtype"), "dtype", where),
            out_dtype=_dtype(data.get("out_dtype"), "out_dtype", where),
            tokenizer_source=_tokenizer_source(data.get("tokenizer_source"), where, notes),
            tokenizer=_tokenizer(data.get("tokenizer"), where, notes),
            chat_template=data.get("chat_template"),
            name=_stage_name(data.get("name"), where),
            notes=notes,
        )
        if config.tokenizer is not None and config.tokenizer_source is not None:
            raise MergeError(f"give either tokenizer_source or tokenizer{where}, not both")
        config.chat_template = _chat_template(config.chat_template, where)
        config.check(where)
        check_limit("models", len(config.referenced_models()),
                    f"the recipe{where} names {len(config.referenced_models())} models")
        if config.slices or config.modules:
            layers = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in config.output_slices())
            check_limit("output_layers", layers, f"the recipe{where} makes a model of {layers} layers")
        return config

    # ---- checks that need no model files ------------------------------------------
    def check(self, where: str = "") -> None:
        """Method, parameter names, types and ranges; structural rules of the method."""
        method = get_method(self.merge_method)
        self.ignored = list(self.notes)
        for label, scope, home in self._scopes_with_homes():
            for name, setting in scope.items():
                parameter = method.parameter(name)
                if parameter is None:  # mergekit's methods read only what they declare
                    self.ignored.append(ignored_parameter(name, f"{label}{where}", method))
                    continue
                if home is not None and not parameter.per_model:
                    self.ignored.append(misplaced_global(name, f"{label}{where}", method, f"{home}.{name}"))
                    continue
                for value in params_mod.leaf_values(setting):
                    if value is None:
                        continue
                    coerced = parameter.coerce(value, f"{label}{where}")
                    parameter.check_range(coerced, f"{label}{where}")
                if isinstance(setting, (list, dict)) and params_mod.is_conditional(setting):
                    entries = setting if isinstance(setting, list) else [setting]
                    for entry in entries:
                        if not isinstance(entry, dict) or "value" not in entry:
                            raise MergeError(f"each filtered entry of '{name}'{label}{where} needs a 'value'")
        self.warnings = list(self.ignored)
        for path, models, slices, _ in self._groups():
            label = f" ({path.rstrip('.')})" if path else ""
            for index, output_slice in enumerate(slices or []):
                self._check_inputs(method, [s.model for s in output_slice.sources],
                                   output_slice.base_model or self.base_model, f"{where} ({path}slices[{index}])")
            if models is not None:
                self._check_inputs(method, [m.model for m in models], self.base_model, f"{where}{label}",
                                   adds_base=True)

    def _check_inputs(self, method, models: list[str], base: Optional[str], where: str,
                      adds_base: bool = False) -> None:
        if len(set(models)) != len(models):
            duplicate = next(m for m in models if models.count(m) > 1)
            raise MergeError(f"model '{duplicate}' is listed twice{where}")
        if method.base == "required" and not base:
            raise MergeError(f"{method.name} needs a base_model{where}")
        inputs = list(models)
        if base and base not in inputs and adds_base:
            inputs.append(base)  # mergekit adds the base to the inputs of a 'models' merge
        if base and base not in inputs:
            if method.base != "ignored":
                raise MergeError(f"base_model '{base}' is not among the slice's sources{where}")
        count = len(inputs) - (1 if (base and method.base != "ignored" and base in inputs) else 0)
        what = "model" if method.max_models == 1 and method.min_models == 1 else "models"
        what += " besides the base" if method.base != "ignored" else " as input"
        if count < method.min_models:
            raise MergeError(f"{method.name} needs at least {method.min_models} {what}{where}, got {count}")
        if method.max_models is not None and count > method.max_models:
            exactly = "exactly" if method.max_models == method.min_models else "at most"
            raise MergeError(f"{method.name} takes {exactly} {method.max_models} {what}{where}, got {count}")

    def _groups(self):
        """(path, models, slices, parameters) for the top level ('') and every module
        ('modules.vision_tower.'): each a merge of its own with its own inputs."""
        yield "", self.models, self.slices, None
        for name, module in (self.modules or {}).items():
            yield f"modules.{name}.", module.models, module.slices, module.parameters

    def _scopes_with_homes(self):
        """(label, dict, home) for every parameters block; home is where a global parameter
        found there belongs (None: it may stand there)."""
        if self.parameters:
            yield " in the top-level parameters", self.parameters, None
        for path, models, slices, module_parameters in self._groups():
            if module_parameters:
                yield f" of {path.rstrip('.')}", module_parameters, None
            model_home = f"{path}parameters" if path else "parameters"
            for model in models or []:
                if model.parameters:
                    yield f" of {path}model '{model.model}'", model.parameters, model_home
            for index, output_slice in enumerate(slices or []):
                if output_slice.parameters:
                    yield f" of {path}slices[{index}]", output_slice.parameters, None
                for source in output_slice.sources:
                    if source.parameters:
                        yield (f" of {path}slices[{index}] source '{source.model}'", source.parameters,
                               f"{path}slices[{index}].parameters")

    def parameter_scopes(self):
        """(label, dict) for every parameters block in the config."""
        for label, scope, _ in self._scopes_with_homes():
            yield label, scope

    # ---- walking the inputs ------------------------------------------------------
    def output_slices(self) -> list[OutputSlice]:
        """Every slice the recipe writes: the top-level ones and every module's."""
        return [s for _, _, slices, _ in self._groups() for s in slices or []]

    def model_entries(self) -> list[Union[InputModel, SliceSource]]:
        """Every place a model is named with its own parameters: `models` entries and slice
        sources, at the top level and in every module."""
        entries: list[Union[InputModel, SliceSource]] = []
        for _, models, slices, _ in self._groups():
            entries.extend(models or [])
            entries.extend(source for output_slice in slices or [] for source in output_slice.sources)
        return entries

    def text_module(self) -> Optional[str]:
        """The key of the text decoder's module in a `modules` recipe ('text_decoder', or
        mergekit's 'default' for a text-only model)."""
        return next((key for key in ("text_decoder", "default") if key in (self.modules or {})), None)

    def drop_shadowing(self, name: str, module: Optional[str] = None) -> None:
        """Remove parameter `name` from the slices' and modules' parameters, where it would
        shadow the top-level value (a slider or sweep that sets the top level then counts);
        with `module`, from that module and its slices only."""
        if module is not None:
            spec = (self.modules or {}).get(module)
            holders = [spec, *(spec.slices or [])] if spec is not None else []
        else:
            holders = list(self.output_slices()) + list((self.modules or {}).values())
        for holder in holders:
            if holder.parameters:
                holder.parameters.pop(name, None)

    # ---- facts -------------------------------------------------------------------
    @property
    def method(self):
        return get_method(self.merge_method)

    def referenced_models(self) -> list[str]:
        """Every model the config names, base first, each once, in order of appearance."""
        names = [self.base_model] if self.base_model else []
        for _, models, slices, _ in self._groups():
            names.extend(model.model for model in models or [])
            for output_slice in slices or []:
                if output_slice.base_model:
                    names.append(output_slice.base_model)
                names.extend(s.model for s in output_slice.sources)
        return list(dict.fromkeys(names))

    def with_models_renamed(self, names: dict[str, str]) -> "MergeConfig":
        """A copy where every model reference found in `names` is replaced (stage names by
        the folders the stages were written to, for instance)."""
        import copy

        changed = copy.deepcopy(self)
        rename = lambda name: names.get(name, name)  # noqa: E731
        for entry in changed.model_entries():
            entry.model = rename(entry.model)
        for output_slice in changed.output_slices():
            output_slice.base_model = rename(output_slice.base_model) if output_slice.base_model else None
        changed.base_model = rename(changed.base_model) if changed.base_model else None
        if changed.tokenizer_source not in (None, "base", "union"):
            changed.tokenizer_source = rename(changed.tokenizer_source)
        return changed

    # ---- writing -----------------------------------------------------------------
    def to_dict(self) -> dict:
        data: dict[str, Any] = {}
        if self.name is not None:
            data["name"] = self.name
        if self.models is not None:
            data["models"] = _models_dict(self.models)
        if self.slices is not None:
            data["slices"] = _slices_dict(self.slices)
        if self.modules is not None:
            data["modules"] = {name: _drop_none({
                "models": _models_dict(module.models) if module.models is not None else None,
                "slices": _slices_dict(module.slices) if module.slices is not None else None,
                "parameters": module.parameters}) for name, module in self.modules.items()}
        data["merge_method"] = self.merge_method
        for key in ("base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
                    "tokenizer", "chat_template"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False).rstrip() + "\n"


@dataclass
class MultiStageConfig:
    """Several named merges in one file; later stages may use earlier names as models."""

    stages: list[MergeConfig]

    def __post_init__(self):
        names = [s.name for s in self.stages]
        for index, stage in enumerate(self.stages[:-1]):
            if not stage.name:
                raise MergeError(f"document {index + 1} of the multi-stage config has no 'name'")
        if len(set(n for n in names if n)) != len([n for n in names if n]):
            raise MergeError("two stages of the multi-stage config have the same name")
        self.order()  # cycles and unreachable stages fail now, not after hours of merging

    @property
    def final(self) -> MergeConfig:
        return self.stages[-1]

    def dependencies(self, stage: MergeConfig) -> list[str]:
        names = {s.name for s in self.stages if s.name}
        return [m for m in stage.referenced_models() if m in names and m != stage.name]

    def order(self) -> list[MergeConfig]:
        """Stages in dependency order: each after the stages it uses."""
        by_name = {s.name: s for s in self.stages if s.name}
        ordered, state = [], {}

        def visit(stage: MergeConfig, chain: list[str]):
            key = id(stage)
            if state.get(key) == "done":
                return
            if state.get(key) == "visiting":
                raise MergeError(f"stages depend on each other in a cycle: {' -> '.join(chain)}")
            state[key] = "visiting"
            for dependency in self.dependencies(stage):
                visit(by_name[dependency], chain + [dependency])
            state[key] = "done"
            ordered.append(stage)

        for stage in self.stages:
            visit(stage, [stage.name or "final"])
        return ordered

    @property
    def warnings(self) -> list[str]:
        return [w for s in self.stages for w in s.warnings]

    @property
    def ignored(self) -> list[str]:
        return [w for s in self.stages for w in s.ignored]

    def to_yaml(self) -> str:
        return "---\n".join(stage.to_yaml() for stage in self.stages)


def load_config(source: Union[str, os.PathLike, MergeConfig, "MultiStageConfig", dict]):
    """A MergeConfig, MultiStageConfig or MoEConfig from YAML text, a path, a dict, or a config."""
    if isinstance(source, (MergeConfig, MultiStageConfig)) or hasattr(source, "experts"):
        return source
    if is_moe_document(source):
        from .moe_config import MoEConfig

        return MoEConfig.from_dict(source)
    if isinstance(source, dict):
        return MergeConfig.from_dict(source)
    return MergeConfig.from_yaml(source)


def check_strict(config) -> None:
    """Strict checking: a key mergekit ignores (see merging.recipe_keys) is an error, not a
    warning. Raises a MergeError naming the first and counting the others."""
    ignored = list(getattr(config, "ignored", None) or [])
    if ignored:
        more = f" (and {len(ignored) - 1} more such keys)" if len(ignored) > 1 else ""
        raise MergeError(f"{ignored[0]}{more}; strict checking refuses keys that have no effect")


def recipe_from_text(text: str):
    """A MergeConfig, MultiStageConfig or MoEConfig from recipe text only: a one-line text
    that happens to name a file is YAML like any other, never a path to open."""
    return MergeConfig.from_text(text)


class _Dumper(yaml.SafeDumper):
    """Lists of numbers in flow style ([0, 0.5, 1]), as mergekit writes them."""


def _represent_list(dumper, data):
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)


def is_moe_document(data: Any) -> bool:
    """mergekit-moe configs have `experts`; merge configs never do."""
    return isinstance(data, dict) and "experts" in data


def _read_text(text_or_path: Union[str, os.PathLike]) -> str:
    if isinstance(text_or_path, os.PathLike):
        path = Path(text_or_path)
    elif "\n" not in text_or_path and (text_or_path.strip().endswith((".yml", ".yaml", ".json"))
                                        or Path(text_or_path.strip()).is_file()):
        path = Path(text_or_path.strip())
    else:
        return text_or_path
    if not path.is_file():
        raise MergeError(f"config file '{path}' does not exist")
    size = path.stat().st_size
    check_limit("recipe_bytes", size, f"config file '{path}' is {size} bytes")
    return path.read_text(encoding="utf-8")


def _doc_label(index: int, count: int) -> str:
    return f" in document {index + 1}" if count > 1 else ""


def _drop_none(data: dict) -> dict:
    return {k: v for k, v in data.items() if v is not None}


def _models_dict(models: list[InputModel]) -> list[dict]:
    return [_drop_none({"model": m.model, "parameters": m.parameters}) for m in models]


def _slices_dict(slices: list[OutputSlice]) -> list[dict]:
    return [_drop_none({
        "sources": [_drop_none({"model": s.model, "layer_range": list(s.layer_range),
                                "parameters": s.parameters}) for s in sl.sources],
        "base_model": sl.base_model, "parameters": sl.parameters}) for sl in slices]


def _input_models(raw: Any, path: str, document: str, notes: list) -> list[InputModel]:
    """A `models` list; `path` is where it sits ('' at the top, 'modules.vision_tower.')."""
    return _entries(raw, "models", "lists", _input_model, path, document, notes)


def _output_slices(raw: Any, path: str, document: str, notes: list) -> list[OutputSlice]:
    return _entries(raw, "slices", "has", _output_slice, path, document, notes)


def _entries(raw: Any, kind: str, verb: str, parse, path: str, document: str, notes: list) -> list:
    """A list of `kind` (also the name of its limit), each entry read by `parse`."""
    if not isinstance(raw, list):
        raise MergeError(f"{path}{kind}{document} must be a list")
    check_limit(kind, len(raw), f"the recipe{document} {verb} {len(raw)} {kind}")
    return [parse(entry, f"{document} ({path}{kind}[{i}])", f"{path}{kind}[{i}]", document, notes)
            for i, entry in enumerate(raw)]


def _modules(raw: Any, document: str, notes: list) -> dict[str, ModuleSpec]:
    """mergekit's `modules:` mapping: module name -> {models or slices, parameters}. Which
    names a model has is known only once it is opened (checked when the merge is planned)."""
    if not isinstance(raw, dict):
        raise MergeError(f"modules{document} must be a mapping of module name (text_decoder, vision_tower, "
                         f"multi_modal_projector, ...) to its models or slices, got {type(raw).__name__}")
    check_limit("slices", len(raw), f"the recipe{document} has {len(raw)} modules")
    modules = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not MODULE_NAME.match(name):
            raise MergeError(f"modules{document}: {str(name)[:60]!r} is not a module name (text_decoder, "
                             "vision_tower, multi_modal_projector, ...)")
        path = f"modules.{name}."
        if not isinstance(entry, dict):
            raise MergeError(f"modules.{name}{document}: must be a mapping with 'models' or 'slices', got {entry!r}")
        _note_ignored(entry, MODULE, f" in modules.{name}{document}", notes, entry=f"modules.{name}")
        has_models, has_slices = bool(entry.get("models")), bool(entry.get("slices"))
        if has_models and has_slices:
            raise MergeError(f"modules.{name}{document}: give either 'models' (the module whole) or 'slices' "
                             "(layer ranges), not both")
        if not has_models and not has_slices:
            raise MergeError(f"modules.{name}{document}: needs 'models' (the module whole) or 'slices' "
                             "(layer ranges)")
        modules[name] = ModuleSpec(
            models=_input_models(entry["models"], path, document, notes) if has_models else None,
            slices=_output_slices(entry["slices"], path, document, notes) if has_slices else None,
            parameters=_parameter_dict(entry.get("parameters"), f" of modules.{name}{document}"))
    return modules


def _input_model(entry: Any, where: str, path: str, document: str, notes: list) -> InputModel:
    if isinstance(entry, str):
        return InputModel(model_name(entry, where, notes))
    if not isinstance(entry, dict) or "model" not in entry:
        raise MergeError(f"each entry of models{where} needs a 'model'")
    _note_ignored(entry, MODEL_ENTRY, f" in {path}{document}", notes, entry=path)
    return InputModel(model_name(entry["model"], where, notes), _parameter_dict(entry.get("parameters"), where))


def _output_slice(entry: Any, where: str, path: str, document: str, notes: list) -> OutputSlice:
    if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
        raise MergeError(f"each slice{where} needs a non-empty 'sources' list")
    if entry.get("residual_weight") is not None:  # declared by mergekit's schema, never read
        notes.append(f"key 'residual_weight' in {path}{document} has no effect (mergekit accepts it but "
                     "never uses it)")
    _note_ignored({k: v for k, v in entry.items() if k != "residual_weight"}, SLICE, f" in {path}{document}",
                  notes, entry=path)
    sources = []
    for index, source in enumerate(entry["sources"]):
        label = f"{where} source {index}"
        if not isinstance(source, dict) or "model" not in source:
            raise MergeError(f"each source{label} needs a 'model'")
        _note_ignored(source, SOURCE, f" in {path}.sources[{index}]{document}", notes,
                      entry=f"{path}.sources[{index}]")
        layer_range = source.get("layer_range")
        if (not isinstance(layer_range, (list, tuple)) or len(layer_range) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)):
            raise MergeError(f"layer_range{label} must be two integers [start, end], got {layer_range!r}")
        start, end = layer_range
        if start < 0 or end <= start:
            raise MergeError(f"layer_range{label} must satisfy 0 <= start < end, got [{start}, {end}]")
        sources.append(SliceSource(model_name(source["model"], label, notes), (start, end),
                                   _parameter_dict(source.get("parameters"), label)))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        raise MergeError(f"all sources of a slice must span the same number of layers{where}, "
                         f"got {sorted(lengths)}")
    base = model_name(entry["base_model"], where, notes) if entry.get("base_model") else None
    return OutputSlice(sources, base, _parameter_dict(entry.get("parameters"), where))


def _chat_template(value: Any, where: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MergeError(f"chat_template{where} must be a name or Jinja text, got {type(value).__name__}")
    from .folder import check_chat_template

    check_chat_template(value)
    return value


def _stage_name(value: Any, where: str) -> Optional[str]:
    """A stage's name is a name, never a path: stage outputs are folders the program names."""
    if value is None:
        return None
    name = str(value)
    if not STAGE_NAME.match(name) or ".." in name:
        raise MergeError(f"name{where} must be a plain name (letters, digits, '-', '_', '.'; at most 100), "
                         f"got {name[:60]!r}")
    return name


def _dtype(value: Any, key: str, where: str) -> Optional[str]:
    if value is None:
        return None
    name = DTYPES.get(str(value).lower())
    if name is None:
        raise MergeError(f"{key}{where} must be one of float32, float16, bfloat16, got {value!r}")
    return name


def _tokenizer_source(value: Any, where: str, notes: Optional[list] = None) -> Optional[str]:
    if value is None:
        return None
    return model_name(value, f" of tokenizer_source{where}", notes)


def _tokenizer(value: Any, where: str, notes: list) -> Optional[dict]:
    """mergekit's `tokenizer:` block: source (union when not given, as mergekit reads it),
    tokens, pad_to_multiple_of; other keys are ignored there, and dropped here with a warning."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MergeError(f"tokenizer{where} must be a mapping (source, tokens, pad_to_multiple_of), "
                         f"got {value!r}")
    _note_ignored(value, TOKENIZER, f" in tokenizer{where}", notes)
    source = value.get("source", "union")
    source = source if source in ("union", "base") else model_name(source, f" of tokenizer.source{where}", notes)
    return {"source": source, **{k: v for k, v in value.items() if k in TOKENIZER and k != "source"}}
