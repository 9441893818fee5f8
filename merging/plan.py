"""From a config and the models' headers to a list of per-tensor tasks.

Everything a merge can get wrong is checked here, before any tensor is read: paths,
architectures, widths, layer ranges, parameter values and method rules. The plan
then says exactly which inputs, parameters and gradient position each output
tensor gets, so the engine only reads, computes and writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import architecture as arch
from . import parameters as params_mod
from .config import InputModel, MergeConfig, ModuleSpec, OutputSlice, SliceSource
from .errors import MergeError
from .methods.registry import BASE_IGNORED, Method
from .recipe_modules import SINGLE, TEXT_DECODER, module_of, module_specs, modules_of, stack_named
from .sources import Checkpoint, TensorInfo

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
# What transformers needs in config.json to rebuild the model the weights belong to, with
# the names other architectures give the same number (GPT-2, T5, ChatGLM).
LOADER_FIELDS = (("hidden_size", ("hidden_size", "n_embd", "d_model")),
                 ("num_hidden_layers", arch.LAYER_COUNT_KEYS),
                 ("vocab_size", ("vocab_size", "padded_vocab_size")))
# Beside the tensors and the donor's tokenizer files: config.json, the model card and the
# recipe (a few KB), the shard index and each shard's header (about a hundred bytes a tensor).
METADATA_MARGIN_BYTES = 1_000_000
MAX_PAD_TO_MULTIPLE_OF = 65_536
HEADER_BYTES_PER_TENSOR = 256


@dataclass
class TensorTask:
    """One output tensor: its inputs, parameters and where it sits in the layer stack."""

    name: str
    inputs: list[tuple[str, str]]  # (model reference, tensor name), in config order
    base_index: Optional[int]  # which input is the base, for methods that use one
    params: dict
    model_params: list[dict]  # one per non-base input (per input for base-less methods)
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    layer: Optional[int] = None  # output layer index; None outside the stack
    position: float = 0.0  # gradient position p in [0, 1]
    vocab_rows: Optional[int] = None  # cut or pad rows to this many (vocabulary tensors)
    filler_index: Optional[int] = None  # input whose rows fill missing vocabulary rows
    stack: Optional[str] = None  # the tower of a block outside the text decoder ('vision_tower')

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.out_dtype.itemsize

    def seed(self, base_seed: int) -> int:
        return tensor_seed(base_seed, self.name)


def tensor_seed(base_seed: int, name: str) -> int:
    """A seed for one tensor alone: the same settings give the same tensor, in any order and
    in every process."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class MergePlan:
    config: MergeConfig
    method: Method
    checkpoints: dict[str, Checkpoint]
    tasks: list[TensorTask]
    out_config: dict
    num_layers: int
    tokenizer_donor: Optional[str]
    warnings: list[str] = field(default_factory=list)
    vocabulary: Optional[object] = None  # a VocabularyAlignment when the models' vocabularies differ

    @property
    def output_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)

    @property
    def live_model_bytes(self) -> int:
        """The merged model's size in memory as LiveMerge builds it: in the recipe's out_dtype
        or dtype, else in each tensor's own."""
        dtype = TORCH_DTYPES.get(self.config.out_dtype or self.config.dtype or "")
        return sum(task.nbytes // task.out_dtype.itemsize * (dtype.itemsize if dtype else task.out_dtype.itemsize)
                   for task in self.tasks)

    @property
    def source_bytes(self) -> int:
        """The source checkpoints' tensors, as stored (mapped from disk while merging)."""
        return sum(info.nbytes for ckpt in self.checkpoints.values() for info in ckpt.tensors.values())

    @property
    def disk_bytes(self) -> int:
        """What the output folder will take on disk: tensors, the files copied from the
        tokenizer donor, and a margin for the small files the merge writes itself."""
        donor = self.checkpoints[self.tokenizer_donor].folder if self.tokenizer_donor else None
        return (self.output_bytes + copied_files_bytes(donor) + METADATA_MARGIN_BYTES
                + HEADER_BYTES_PER_TENSOR * len(self.tasks))

    def peak_bytes_estimate(self) -> int:
        """Tensors in flight for the largest task, in float32: whole inputs and scratch for
        methods that need whole tensors, a few row blocks for elementwise ones."""
        from .engine import BLOCK_ELEMENTS

        worst = 0
        for task in self.tasks:
            numel = task.nbytes // task.out_dtype.itemsize
            if self.method.elementwise is not None:
                numel = min(numel, BLOCK_ELEMENTS)
            worst = max(worst, numel * 4 * (2 * len(task.inputs) + 3))
        return worst

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return {t.name: TensorInfo(t.name, t.out_dtype, t.shape) for t in self.tasks}

    def as_checkpoint(self, reference: str) -> Checkpoint:
        """What the output will look like, for planning later stages before this one runs."""
        return Checkpoint(reference, None, self.out_config, self.tensor_infos())

    def summary(self) -> str:
        names = self.config.referenced_models()
        lines = [f"method: {self.method.name}"]
        for name in names:
            checkpoint = self.checkpoints[name]
            role = " (base)" if name == self.config.base_model else ""
            lines.append(f"model: {name}{role}: {checkpoint.num_layers} layers, {len(checkpoint.tensors)} tensors")
        lines.append(f"output: {self.num_layers} layers, {len(self.tasks)} tensors, "
                     f"{format_bytes(self.output_bytes)}")
        lines.append(f"estimated peak memory: {format_bytes(self.peak_bytes_estimate())} of tensors in flight, "
                     "plus about 250 MB for Python and torch")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def copied_files_bytes(folder) -> int:
    """Bytes of the tokenizer and generation files a merge copies from a model's folder."""
    from .folder import TOKENIZER_FILES

    if folder is None:
        return 0
    files = [folder / name for name in TOKENIZER_FILES + ("generation_config.json",)]
    return sum(file.stat().st_size for file in files if file.is_file())


def check_loader_fields(reference: str, config: dict) -> None:
    """Refuse a model whose config.json lacks what transformers needs to load the merge:
    model_type, the hidden size, the layer count and the vocabulary size (under any of
    their usual names; a multimodal model keeps them in text_config). The output's
    config.json is the base's, so a missing field would make an output nothing can load."""
    kind = config.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise MergeError(f"config.json of model '{reference}' has no model_type; a merge of it would "
                         "not load in transformers")
    text = config.get("text_config")
    scopes = [config] + ([text] if isinstance(text, dict) else [])
    for field_name, keys in LOADER_FIELDS:
        if not any(_is_count(scope.get(key)) for scope in scopes for key in keys):
            others = ", ".join(keys[1:])
            raise MergeError(f"config.json of model '{reference}' has no {field_name} (nor {others}); a merge "
                             "of it would not load in transformers")


def _is_count(value) -> bool:
    return type(value) is int and value > 0


def format_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)


# ---------------------------------------------------------------------------------
def plan_merge(config: MergeConfig, checkpoints: dict[str, Checkpoint]) -> MergePlan:
    """Check `config` against the opened models and list every output tensor's task.

    Slices cut and stack the text decoder's layers; a model's other stacks (a vision
    tower) are merged whole from the first slice's models, each over its own depth, so
    a gradient runs from the first to the last block of every stack. A `modules` recipe
    plans every module (see merging.recipe_modules) by its own models or slices."""
    method = config.method
    warnings = list(config.warnings)
    for name in config.referenced_models():
        if name not in checkpoints:
            raise MergeError(f"model '{name}' was not opened")
        # here, not where config.json is read: every source meets here (folders, hub headers,
        # GGUF-derived configs, LoRA bases, earlier stages), and only a merge needs a loadable model
        check_loader_fields(name, checkpoints[name].config)
        warnings.extend(getattr(checkpoints[name], "warnings", []))
    if config.modules is not None:
        _check_modules(config, checkpoints)
    slices = normalized_slices(config, checkpoints)
    reference_name = config.base_model or slices[0].sources[0].model
    reference = checkpoints[reference_name]
    _check_compatible(config, checkpoints, reference_name, warnings)
    if config.modules is None:
        for output_slice in slices:
            for source in output_slice.sources:
                available = checkpoints[source.model].num_layers
                if source.layer_range[1] > available:
                    raise MergeError(f"layer_range [{source.layer_range[0]}, {source.layer_range[1]}] of "
                                     f"model '{source.model}' goes past its {available} layers")

    out_dtype_name = config.out_dtype or config.dtype
    donor = _tokenizer_donor(config, slices)
    checkpoints, alignment = _align_vocabularies(config, checkpoints, donor, warnings)
    layouts = {name: arch.layout_of(checkpoints[name]) for name in config.referenced_models()}
    vocab_rows = None if alignment else _vocabulary_rows(config, checkpoints, layouts, donor, warnings)
    builder = _TaskBuilder(config, method, checkpoints, layouts, out_dtype_name, vocab_rows, donor)
    layout = layouts[reference_name]
    if config.modules is not None:
        origins, tower_origins = _plan_modules(config, slices, checkpoints, layouts, builder, reference_name)
    else:
        origins, tower_origins = _plan_slices(slices, checkpoints, layouts, builder, layout), {}
    out_layer = len(origins)

    out_config = output_config(reference.config, layout, origins, {m: c.config for m, c in checkpoints.items()},
                               tower_origins)
    if out_dtype_name:
        out_config.pop("torch_dtype", None)
        out_config["dtype"] = out_dtype_name
    rows = alignment.rows if alignment is not None else vocab_rows
    if rows is not None:
        scope = out_config.get("text_config") if "vocab_size" not in out_config else out_config
        if isinstance(scope, dict):
            scope["vocab_size"] = rows
    return MergePlan(config, method, checkpoints, builder.tasks, out_config, out_layer, donor,
                     warnings + builder.warnings, vocabulary=alignment)


def _plan_slices(slices: list[OutputSlice], checkpoints, layouts, builder: "_TaskBuilder",
                 layout: "arch.Layout") -> list[tuple[str, int]]:
    """A `models` or `slices` recipe: slices cut the text decoder, the other towers are
    merged whole from the first slice's models, tensors outside the blocks come from the
    first slice (before them) or the last (after). The origins of the text layers."""
    first, last = slices[0], slices[-1]
    for name in _outside_names(first, checkpoints, layouts):
        if layouts[first.sources[0].model].comes_before(name):
            builder.add(name, first, [name] * len(first.sources), layer=None, position=0.0)

    origins = _add_layers(slices, layout.text, builder)

    for stack in layout.stacks[1:]:  # the other towers, whole, each with its own positions
        depth = _common_depth(first, stack, layouts)
        for index in range(depth):
            position = index / (depth - 1) if depth > 1 else 1.0
            builder.add_layer(first, stack, [index] * len(first.sources), index, position, text_layer=False)

    for name in _outside_names(last, checkpoints, layouts):
        if not layouts[last.sources[0].model].comes_before(name):
            builder.add(name, last, [name] * len(last.sources), layer=None, position=0.0)
    return origins


def _add_layers(slices: list[OutputSlice], stack: "arch.Stack", builder: "_TaskBuilder") -> list[tuple[str, int]]:
    """Every block of `stack` the slices make, a gradient running over each slice; the
    (model, input layer) of every output layer."""
    out_layer = 0
    origins: list[tuple[str, int]] = []
    for output_slice in slices:
        lead = output_slice.sources[0]
        length = lead.layer_range[1] - lead.layer_range[0]
        for offset in range(length):
            position = offset / (length - 1) if length > 1 else 1.0
            builder.add_layer(output_slice, stack, [s.layer_range[0] + offset for s in output_slice.sources],
                              out_layer, position, text_layer=stack.role == arch.TEXT_ROLE)
            origins.append((lead.model, lead.layer_range[0] + offset))
            out_layer += 1
    return origins


def _plan_modules(config: MergeConfig, text_slices: list[OutputSlice], checkpoints, layouts,
                  builder: "_TaskBuilder", reference_name: str):
    """A `modules` recipe, as mergekit plans it: every module by its own slices (the whole
    stack for `models`), with the module's parameters between a slice's and the top
    level's; its tensors outside the blocks from its first slice (before them) or its last
    (after). The origins of the text layers, and of every tower's layers by stack."""
    reference = layouts[reference_name]
    origins: list[tuple[str, int]] = []
    tower_origins: dict[arch.Stack, list[tuple[str, int]]] = {}
    available = modules_of(reference, checkpoints[reference_name].tensors)
    specs = module_specs(config.modules, available)
    for module, stack in available.items():
        spec = specs[module]
        slices = text_slices if module == TEXT_DECODER else module_slices(module, spec, stack, config, layouts)
        builder.module_parameters = spec.parameters
        first, last = slices[0], slices[-1]
        for name in _outside_names(first, checkpoints, layouts):
            lead = layouts[first.sources[0].model]
            if module_of(lead, name) == module and (stack is None or lead.comes_before(name, _own(lead, stack))):
                builder.add(name, first, [name] * len(first.sources), layer=None, position=0.0)
        if stack is not None:
            layers = _add_layers(slices, stack, builder)
            if module == TEXT_DECODER:
                origins = layers
            else:
                tower_origins[stack] = layers
            for name in _outside_names(last, checkpoints, layouts):
                lead = layouts[last.sources[0].model]
                if module_of(lead, name) == module and not lead.comes_before(name, _own(lead, stack)):
                    builder.add(name, last, [name] * len(last.sources), layer=None, position=0.0)
    builder.module_parameters = None
    return origins, tower_origins


def _own(layout: "arch.Layout", stack: "arch.Stack") -> "arch.Stack":
    return stack_named(layout, stack.role) or stack


def module_slices(module: str, spec: ModuleSpec, stack: Optional["arch.Stack"], config: MergeConfig,
                  layouts) -> list[OutputSlice]:
    """A module's slices: its own, or for `models` one slice over its whole stack (the
    base added when missing, as mergekit does)."""
    if spec.slices:
        return spec.slices

    def depth(model: str) -> int:
        if stack is None:
            return 0
        own = stack_named(layouts[model], stack.role)
        if own is None:
            raise MergeError(f"modules.{module}: model '{model}' has no {module}")
        return layouts[model].depth(own)

    return _whole_slice(spec.models, config.base_model, depth, f"modules.{module}: ", f"{module} layers")


def _check_modules(config: MergeConfig, checkpoints: dict[str, Checkpoint]) -> None:
    """A `modules` recipe against the models, before anything is read: every module name
    one the first model has, every module of it given (mergekit writes only the modules
    named: the model it writes would lack the others' tensors and not load), slices only
    where there is a stack to cut, and layer ranges within each model's stack."""
    reference_name = config.referenced_models()[0]
    reference = arch.layout_of(checkpoints[reference_name])
    available = modules_of(reference, checkpoints[reference_name].tensors)
    specs = module_specs(config.modules, available)
    for module in specs:
        if module not in available:
            raise MergeError(f"modules.{module}: model '{reference_name}' has no module '{module}'; its modules "
                             f"are {', '.join(available)}")
    missing = [m for m in available if m not in specs]
    if missing:
        raise MergeError(f"modules: the recipe leaves out {', '.join(missing)} of model '{reference_name}' (its "
                         f"modules are {', '.join(available)}); a model written without "
                         f"{'its' if len(missing) == 1 else 'their'} tensors would not load, so give every module "
                         "its models or slices")
    for module, spec in specs.items():
        stack = available[module]
        if spec.slices and stack is None:
            raise MergeError(f"modules.{module}: it has no stack of layers to cut into slices; give it 'models' "
                             "(merged whole)")
        for output_slice in spec.slices or []:
            for source in output_slice.sources:
                layout = arch.layout_of(checkpoints[source.model])
                own = stack_named(layout, stack.role)
                if own is None:
                    raise MergeError(f"modules.{module}: model '{source.model}' has no {module}")
                depth = checkpoints[source.model].num_layers if module == TEXT_DECODER else layout.depth(own)
                if source.layer_range[1] > depth:
                    raise MergeError(f"modules.{module}: layer_range [{source.layer_range[0]}, "
                                     f"{source.layer_range[1]}] of model '{source.model}' goes past its {depth} "
                                     f"{module} layers")


def output_config(reference_config: dict, layout: "arch.Layout", origins: list[tuple[str, int]],
                  configs: dict[str, dict], tower_origins: Optional[dict] = None) -> dict:
    """The base's config.json made to describe the output's layers: each stack's depth key
    (nested in text_config for multimodal models) and every per-layer list, entry j taken
    from the model and layer output layer j came from (a frankenmerge's layer_types
    follow its layers, not the base's first n). `origins` are the text layers'; a
    `modules` recipe's towers have theirs in `tower_origins` (stack -> origins)."""
    out_config = json.loads(json.dumps(reference_config))
    text = layout.text
    for stack, stack_origins in [(text, origins)] + list((tower_origins or {}).items()):
        _follow_layers(out_config, stack, stack_origins, reference_config, configs)
    scope = arch.owner_scope(out_config, text)
    if isinstance(scope, dict):
        if isinstance(scope.get("max_window_layers"), int):
            _follow_window_layers(scope, origins, text, reference_config, configs)
        if "decoder_sparse_step" in scope or "mlp_only_layers" in scope:
            _follow_sparse_layers(scope, origins, text, reference_config, configs)
    return out_config


def _follow_window_layers(scope: dict, origins: list[tuple[str, int]], text: "arch.Stack", reference_config: dict,
                          configs: dict[str, dict]) -> None:
    """Qwen2's rule without layer_types: with use_sliding_window, layer i slides its window
    when i >= max_window_layers. Output layer j keeps its source layer's kind: a count when
    the full layers still come first, else the kinds written out as layer_types."""
    depth = len(origins)
    if "layer_types" in scope or not scope.get("use_sliding_window"):
        scope["max_window_layers"] = min(scope["max_window_layers"], depth)  # layer_types says it all
        return

    def sliding(model: str, index: int) -> bool:
        source = configs.get(model, reference_config)
        source = arch.owner_scope(source, text) or {}
        return bool(source.get("use_sliding_window")) and index >= source.get("max_window_layers", depth)

    kinds = [sliding(model, index) for model, index in origins]
    full = next((j for j, kind in enumerate(kinds) if kind), depth)
    if all(kinds[full:]):
        scope["max_window_layers"] = full
    else:
        scope["layer_types"] = ["sliding_attention" if kind else "full_attention" for kind in kinds]


def _follow_sparse_layers(scope: dict, origins: list[tuple[str, int]], text: "arch.Stack", reference_config: dict,
                          configs: dict[str, dict]) -> None:
    """Qwen-MoE's rule for which layers have experts: layer i does unless i is in
    mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step. Output layer j keeps
    the kind of the layer it came from: the base's step when it still describes them,
    else step 1 with every dense layer listed."""
    def sparse(model: str, index: int) -> bool:
        source = configs.get(model, reference_config)
        source = arch.owner_scope(source, text) or {}
        step = source.get("decoder_sparse_step") or 1
        return index not in (source.get("mlp_only_layers") or []) and (index + 1) % step == 0

    kinds = [sparse(model, index) for model, index in origins]
    step = scope.get("decoder_sparse_step") or 1
    dense = [j for j, kind in enumerate(kinds) if not kind and (j + 1) % step == 0]
    if any(kind != (j not in dense and (j + 1) % step == 0) for j, kind in enumerate(kinds)):
        step, dense = 1, [j for j, kind in enumerate(kinds) if not kind]
        if "decoder_sparse_step" in scope:
            scope["decoder_sparse_step"] = step
    scope["mlp_only_layers"] = dense


def _follow_layers(out_config: dict, stack: "arch.Stack", origins: list[tuple[str, int]], reference_config: dict,
                   configs: dict[str, dict]) -> None:
    arch.set_config_value(out_config, stack.depth_key, len(origins))
    for key in stack.per_layer_keys:
        values = []
        for model, index in origins:
            source = arch.config_value(configs.get(model, reference_config), key)
            if not isinstance(source, list) or index >= len(source):
                source = arch.config_value(reference_config, key)
            values.append(source[min(index, len(source) - 1)])
        arch.set_config_value(out_config, key, values)


def _common_depth(output_slice: OutputSlice, stack: "arch.Stack", layouts) -> int:
    depths = {s.model: layouts[s.model].depth(stack) for s in output_slice.sources}
    if len(set(depths.values())) > 1:
        described = ", ".join(f"'{m}' {d}" for m, d in depths.items())
        raise MergeError(f"the {stack.role} stacks differ in depth ({described}); they can only be merged "
                         "layer by layer")
    return next(iter(depths.values()))


def normalized_slices(config: MergeConfig, checkpoints: dict[str, Checkpoint]) -> list[OutputSlice]:
    """The slices that make the text decoder: a `models` config as one slice over all
    layers (the base added when missing); in a `modules` config, the text_decoder's."""
    models, slices, where = config.models, config.slices, ""
    if config.modules is not None:
        spec = config.modules.get(TEXT_DECODER) or config.modules[SINGLE]
        models, slices, where = spec.models, spec.slices, f"modules.{TEXT_DECODER}: "
    if slices:
        return slices
    return _whole_slice(models, config.base_model, lambda model: checkpoints[model].num_layers, where, "layers")


def _whole_slice(models: list[InputModel], base: Optional[str], depth, where: str, what: str) -> list[OutputSlice]:
    """`models` as one slice over each one's whole stack of `depth(model)` layers."""
    entries = list(models)
    if base and base not in [m.model for m in models]:
        entries.append(InputModel(base))
    counts = {e.model: depth(e.model) for e in entries}
    reference = entries[0].model
    for entry in entries:
        if counts[entry.model] != counts[reference]:
            raise MergeError(f"{where}model '{entry.model}' has {counts[entry.model]} {what}, model "
                             f"'{reference}' has {counts[reference]}; use slices to merge models "
                             "of different depth")
    return [OutputSlice([SliceSource(e.model, (0, counts[e.model]), e.parameters) for e in entries])]


def _check_compatible(config: MergeConfig, checkpoints: dict[str, Checkpoint], reference_name: str,
                      warnings: list[str]) -> None:
    reference = checkpoints[reference_name]
    role = "the base" if reference_name == config.base_model else f"model '{reference_name}'"
    kind = reference.config.get("model_type")
    for name in config.referenced_models():
        if name == reference_name:
            continue
        other = checkpoints[name].config
        for key in arch.WIDTH_KEYS:
            if key in other and key in reference.config and other[key] != reference.config[key]:
                label = key.replace("_", " ")
                raise MergeError(f"model '{name}' has {label} {other[key]}, {role} has "
                                 f"{reference.config[key]}")
        if other.get("model_type") != kind:
            warnings.append(f"model '{name}' is a {other.get('model_type')} model, {role} is a {kind} model")


def _outside_names(output_slice: OutputSlice, checkpoints: dict[str, Checkpoint], layouts) -> list[str]:
    """Tensors outside every stack's blocks, as the slice's first model names them (then
    those only later models have), first seen first."""
    lead = layouts[output_slice.sources[0].model]
    names: dict[str, None] = {}
    for source in output_slice.sources:
        layout = layouts[source.model]
        for name in checkpoints[source.model].tensors:
            if layout.split(name) is None:
                names.setdefault(lead.counterpart(name, layout) or name, None)
    return list(names)


def _tokenizer_source(config: MergeConfig) -> Optional[str]:
    if isinstance(config.tokenizer, dict):
        return config.tokenizer.get("source", config.tokenizer_source)
    return config.tokenizer_source


def _align_vocabularies(config: MergeConfig, checkpoints: dict[str, Checkpoint], donor: str,
                        warnings: list[str]):
    """Models whose vocabularies differ, wrapped to read their token rows in the output
    vocabulary's order (see merging.vocabulary); unchanged when they agree."""
    from .sources.vocabulary import AlignedCheckpoint, align_vocabularies

    models = config.referenced_models()
    inner = {m: c.inner if isinstance(c, AlignedCheckpoint) else c for m, c in checkpoints.items()}
    union = _tokenizer_source(config) == "union"
    base = config.base_model or donor
    pad = _pad_to_multiple_of(config)
    alignment = align_vocabularies(inner, models, base, donor, union, pad)
    if alignment is None:
        return inner, None
    added = f", {len(alignment.new_tokens)} tokens added to '{donor}'s" if union else f" of '{donor}'"
    padded = (f"; rows {alignment.padded_from}-{alignment.rows - 1} pad to a multiple of {pad}, each model's mean "
              "token row" if alignment.padded_from is not None and alignment.padded_from < alignment.rows else "")
    warnings.append(f"vocabularies differ: embedding and lm_head rows matched by token onto the vocabulary"
                    f"{added} ({alignment.rows} rows; a token a model lacks takes the base's row, else the "
                    f"only model's that has it, else their mean{padded})")
    shared = dict(inner)
    return {m: AlignedCheckpoint(shared[m], m, alignment, shared) if m in models else c
            for m, c in inner.items()}, alignment


def _pad_to_multiple_of(config: MergeConfig) -> Optional[int]:
    """tokenizer.pad_to_multiple_of: the output's vocabulary rows rounded up to a multiple."""
    value = (config.tokenizer or {}).get("pad_to_multiple_of") if isinstance(config.tokenizer, dict) else None
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_PAD_TO_MULTIPLE_OF:
        raise MergeError(f"tokenizer.pad_to_multiple_of must be a whole number from 1 to "
                         f"{MAX_PAD_TO_MULTIPLE_OF}, got {value!r}")
    return value


def _tokenizer_donor(config: MergeConfig, slices: list[OutputSlice]) -> Optional[str]:
    source = _tokenizer_source(config)
    unsupported = sorted(set(config.tokenizer or {}) - {"source", "pad_to_multiple_of"})
    if unsupported:
        raise MergeError(f"tokenizer.{unsupported[0]} is not supported yet; tokenizer.source and "
                         "tokenizer.pad_to_multiple_of are")
    _pad_to_multiple_of(config)
    if source in (None, "base", "union"):
        return config.base_model or slices[0].sources[0].model
    if source not in config.referenced_models():
        raise MergeError(f"tokenizer_source '{source}' is not one of the config's models")
    return source


def _vocabulary_rows(config: MergeConfig, checkpoints: dict[str, Checkpoint], layouts,
                     donor: str, warnings: list[str]) -> Optional[int]:
    """Rows every vocabulary tensor is cut (or padded) to, when the models disagree."""
    sizes = {name: layouts[name].vocabulary_rows(checkpoints[name].tensors)
             for name in config.referenced_models()}
    if len({s for s in sizes.values() if s is not None}) <= 1:
        return None
    target = sizes[donor]
    described = ", ".join(f"'{n}' {s}" for n, s in sizes.items())
    warnings.append(f"vocabulary sizes differ ({described}): using the tokenizer of '{donor}' and "
                    f"cutting embedding rows to its {target} (rows a model lacks come from '{donor}' "
                    "or the base)")
    return target


class _TaskBuilder:
    def __init__(self, config: MergeConfig, method: Method, checkpoints, layouts, out_dtype_name, vocab_rows,
                 donor):
        self.config = config
        self.method = method
        self.checkpoints = checkpoints
        self.layouts = layouts
        self.out_dtype = TORCH_DTYPES[out_dtype_name] if out_dtype_name else None
        self.vocab_rows = vocab_rows
        self.donor = donor
        self.tasks: list[TensorTask] = []
        self.warnings: list[str] = []
        self.module_parameters: Optional[dict] = None  # the module being planned, in a `modules` recipe

    def add_layer(self, output_slice: OutputSlice, stack: "arch.Stack", in_layers: list[int], out_layer: int,
                  position: float, text_layer: bool = True) -> None:
        """Every tensor of one output block: the lead model's block `in_layers[0]` names the
        tensors; each source gives its own name for the same module at its own layer."""
        sources = output_slice.sources
        lead = self.layouts[sources[0].model]
        lead_names = lead.layer_tensors(in_layers[0], stack)
        if not lead_names:
            raise MergeError(f"model '{sources[0].model}' has no tensors for {stack.role} layer {in_layers[0]}")
        for lead_name in lead_names:
            parts = lead.split(lead_name)
            input_names = [lead_name] + [
                self.layouts[source.model].counterpart(lead_name, lead, index)
                or arch.layer_tensor_name(parts.prefix, index, parts.rest)
                for source, index in zip(sources[1:], in_layers[1:])]
            self.add(arch.layer_tensor_name(parts.prefix, out_layer, parts.rest), output_slice, input_names,
                     layer=out_layer if text_layer else None, position=position,
                     stack=None if text_layer else stack.role)

    def add(self, out_name: str, output_slice: OutputSlice, input_names: list[str],
            layer: Optional[int], position: float, stack: Optional[str] = None) -> None:
        sources = output_slice.sources
        models = [s.model for s in sources]
        lead = self.layouts[models[0]]
        resolved_names = []
        for model, name in zip(models, input_names):
            checkpoint = self.checkpoints[model]
            if not checkpoint.has(name):
                layout = self.layouts[model]
                alternative = layout.counterpart(name, lead) or layout.tied_head_source(name)
                if alternative is None or not checkpoint.has(alternative):
                    raise MergeError(f"model '{model}' has no tensor '{name}'")
                name = alternative
            resolved_names.append(name)
        infos = [self.checkpoints[m].tensors[n] for m, n in zip(models, resolved_names)]
        match_names = lead.match_names(input_names[0])

        vocab_rows = filler = None
        shapes = [info.shape for info in infos]
        if lead.is_vocabulary(input_names[0]) and self.vocab_rows is not None:
            vocab_rows = self.vocab_rows
            shapes = [(vocab_rows,) + s[1:] for s in shapes]
            filler = self._filler_index(models, infos, vocab_rows)
        for model, info, shape in zip(models, infos, shapes):
            if shape != shapes[0]:
                raise MergeError(f"tensor '{info.name}' of model '{model}' has shape {list(info.shape)}, "
                                 f"model '{models[0]}' has {list(infos[0].shape)}")

        base = output_slice.base_model or self.config.base_model
        base_index = None
        if self.method.base != BASE_IGNORED and base in models:
            base_index = models.index(base)
        # filters see the output name and each input's own, plus the module each loads into
        params = self._global_params((out_name,) + match_names[1:], output_slice, position)
        model_params = [
            self._model_params(model, self.layouts[model].match_names(input_name), output_slice, position)
            for index, (model, input_name) in enumerate(zip(models, resolved_names))
            if index != base_index
        ]
        if self.method.check:
            self.method.check(params, model_params, f" for {out_name}")
        out_dtype = self.out_dtype or infos[models.index(base) if base in models else 0].dtype
        if not infos[0].dtype.is_floating_point:
            out_dtype = infos[0].dtype
        self.tasks.append(TensorTask(out_name, list(zip(models, resolved_names)), base_index, params,
                                     model_params, shapes[0], out_dtype, layer, position, vocab_rows,
                                     filler, stack))

    def _filler_index(self, models, infos, rows) -> int:
        preferred = [self.donor, self.config.base_model] + models
        for name in preferred:
            if name in models and infos[models.index(name)].shape[0] >= rows:
                return models.index(name)
        raise MergeError(f"no input has the {rows} vocabulary rows that '{infos[0].name}' needs")

    def _global_params(self, names: tuple[str, ...], output_slice: OutputSlice, position: float) -> dict:
        scopes = [output_slice.parameters, self.module_parameters, self.config.parameters]
        values = {}
        for parameter in self.method.global_parameters:
            value = params_mod.resolve(parameter.name, scopes, names, position)
            values[parameter.name] = self._finish(parameter, value, f" for {names[0]}")
        return values

    def _model_params(self, model: str, names: tuple[str, ...], output_slice: OutputSlice, position: float) -> dict:
        own = [s.parameters for s in output_slice.sources if s.model == model]
        scopes = own + [output_slice.parameters, self.module_parameters, self.config.parameters]
        values = {}
        for parameter in self.method.model_parameters:
            value = params_mod.resolve(parameter.name, scopes, names, position)
            values[parameter.name] = self._finish(parameter, value, f" of model '{model}' for {names[0]}")
        return values

    def _finish(self, parameter, value, where: str):
        if value is None:
            if parameter.required:
                raise MergeError(f"{self.method.name} needs parameter '{parameter.name}'{where}")
            return parameter.default
        value = parameter.coerce(value, where)
        parameter.check_range(value, where)
        return value
