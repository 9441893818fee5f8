"""What a checkpoint's tensors are, read from the model's structure rather than from names.

transformers builds the model class on the meta device (no memory); what it is made of
says what a merge needs to know:

- stacks: every `ModuleList` of identical blocks whose length a config key holds (text
  decoder, vision tower, audio tower, ...), with that key's path in nested configs;
- the input embeddings and the output head (`get_input_embeddings`/`get_output_embeddings`);
- per-layer config lists (`layer_types`, ...) that must follow the stack's depth.

A checkpoint stores names in its own layout (`transformer.h.3.`, `block_sparse_moe`,
`language_model.model.layers.`); transformers' own conversion mapping gives the module
name each stored name loads into, so stacks are recognised in every layout transformers
loads. What is learned is cached per architecture (`STRUCTURES`); a `Layout` applies it
to one checkpoint's tensor names.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from functools import lru_cache
from typing import Optional

from .errors import MergeError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
DEPTH_KEYS = LAYER_COUNT_KEYS + ("depth", "encoder_layers", "num_blocks")
MODULE_TYPES = (  # substring -> short module kind; the first match wins
    ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
    ("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"),
    ("norm", "norm"), ("ln_", "norm"),  # before embed: Bloom's word_embeddings_layernorm is a norm
    ("embed_tokens", "embed"), ("wte.", "embed"), ("word_embeddings", "embed"), ("embed_in.", "embed"),
    ("lm_head", "lm_head"), ("embed_out", "lm_head"),
    ("c_attn", "qkv"), ("query_key_value", "qkv"), ("qkv_proj", "qkv"), ("Wqkv", "qkv"),
    ("attn", "attn"), ("attention", "attn"),  # other attention weights (GPT-2's c_proj, dense)
    ("mlp", "mlp"), ("experts", "mlp"), ("feed_forward", "mlp"), ("ffn", "mlp"),
)
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim")
TEXT_ROLE = "text_decoder"


@dataclass(frozen=True)
class Stack:
    """One stack of blocks: `module` is its ModuleList's path in the model
    ('model.language_model.layers'); `root` the submodule it belongs to; `depth_key` the
    path of the config key that holds its depth (('text_config', 'num_hidden_layers'))."""

    role: str
    module: str
    root: str
    depth_key: tuple[str, ...]
    per_layer_keys: tuple[tuple[str, ...], ...] = field(default=(), compare=False)  # from the checkpoint's config


@dataclass(frozen=True)
class Structure:
    """What an architecture is made of (no sizes): cached per architecture."""

    name: str
    stacks: tuple[Stack, ...]  # the text decoder first
    input_embeddings: tuple[str, ...]  # module parameter names
    output_head: Optional[str]
    parameter_order: tuple[str, ...]  # module parameter names in registration order
    # transformers' stored-name -> module-name rules: (kind, scope, base prefix, regex, targets), in order
    mapping: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        # hashed once: the per-name caches below look a structure up for every tensor name
        object.__setattr__(self, "_hash", hash((self.name, self.stacks, self.input_embeddings, self.output_head,
                                                self.parameter_order)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def text(self) -> Stack:
        return self.stacks[0]

    def module_name(self, stored: str) -> str:
        """The name a stored tensor loads into (transformers' conversion mapping)."""
        return _module_name(self, stored)


@dataclass(frozen=True)
class LayerName:
    """A stored tensor name inside a stack: `prefix` + index + '.' + `rest`."""

    stack: Stack
    prefix: str
    index: int
    rest: str
    module_rest: str  # the rest of the module name it loads into (the same across layouts)


class UnknownArchitecture(MergeError):
    """transformers has no class for the model type (remote code, or a newer transformers)."""


# ---------------------------------------------------------------------------------
# the structure of an architecture

STRUCTURES: dict[str, Structure] = {}  # cache key -> structure, learned once per process
MAX_LEARNED = 64
_STRUCTURES_LOCK = threading.Lock()
# What is known of the architectures people merge, shipped so that planning a merge does not
# import transformers (4 s here); `python -m merging.architecture` rebuilds it.
TABLE = Path(__file__).with_name("architectures.json")


def structure_of(config: dict, reference: str = "") -> Structure:
    """The structure of the model `config` describes: from the shipped table, else learned
    from transformers once per architecture and process."""
    key = structure_key(config)
    with _STRUCTURES_LOCK:
        known = STRUCTURES.get(key) or _shipped().get(key)
    if known is not None:
        return known
    learned = _learn_structure(config, reference)
    with _STRUCTURES_LOCK:
        if len(STRUCTURES) >= MAX_LEARNED:  # keys come from visitors' config.json files: bounded
            STRUCTURES.pop(next(iter(STRUCTURES)))
        return STRUCTURES.setdefault(key, learned)


def structure_key(config: dict) -> str:
    """The class, the model type and the nested configs' model types: not sizes (a 1B and a
    70B Llama share a structure)."""
    parts = [str((config.get("architectures") or [""])[0]), str(config.get("model_type"))]
    parts += [f"{k}={v.get('model_type')}" for k, v in sorted(config.items())
              if isinstance(v, dict) and "model_type" in v]
    return "|".join(parts)


@lru_cache(maxsize=1)
def _shipped() -> dict[str, Structure]:
    try:
        table = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}
    return {key: structure_from_json(entry) for key, entry in table.items()}


def structure_to_json(structure: Structure) -> dict:
    return {"name": structure.name,
            "stacks": [{"role": s.role, "module": s.module, "root": s.root, "depth_key": list(s.depth_key)}
                       for s in structure.stacks],
            "input_embeddings": list(structure.input_embeddings), "output_head": structure.output_head,
            "parameter_order": list(structure.parameter_order),
            "mapping": [list(rule[:5]) + [[list(op) for op in rule[5]]] for rule in structure.mapping]}


def structure_from_json(entry: dict) -> Structure:
    stacks = tuple(Stack(s["role"], s["module"], s["root"], tuple(s["depth_key"])) for s in entry["stacks"])
    mapping = tuple((kind, scope, base, pattern, tuple(targets), tuple(tuple(op) for op in operations))
                    for kind, scope, base, pattern, targets, operations in entry["mapping"])
    return Structure(entry["name"], stacks, tuple(entry["input_embeddings"]), entry["output_head"],
                     tuple(entry["parameter_order"]), mapping)


def _learn_structure(config: dict, reference: str) -> Structure:
    import torch

    model = _meta_model(config, reference)
    model_config = model.config
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and _is_block_list(module)]
    stacks, claimed = [], []
    for name, module in lists:
        if any(name.startswith(outer + ".") for outer in claimed):
            continue  # experts inside a block: part of the block, not a stack
        owner_path, owner, root = _owner_config(model, name, model_config)
        depth_key = _depth_key(owner, len(module))
        if depth_key is None:
            continue  # a list whose length no config key holds is not a stack of layers
        stacks.append(Stack("", name, root, owner_path + (depth_key,)))
        claimed.append(name)
    embedding = model.get_input_embeddings()
    embedding_names = tuple(f"{n}.weight" for n, m in model.named_modules() if m is embedding)
    head = model.get_output_embeddings()
    head_names = [f"{n}.weight" for n, m in model.named_modules() if head is not None and m is head]
    text_index = _text_stack(stacks, embedding_names)
    if text_index is None:
        kind = config.get("architectures", [config.get("model_type")])
        raise MergeError(f"model '{reference}' ({kind[0] if kind else 'unknown'}): transformers builds it, but "
                         "no stack of layers in it has its depth in the config, so its layers cannot be told apart")
    ordered = [stacks[text_index]] + [s for i, s in enumerate(stacks) if i != text_index]
    roles = [TEXT_ROLE] + [_role(stack) for stack in ordered[1:]]
    ordered = [Stack(role, s.module, s.root, s.depth_key) for role, s in zip(roles, ordered)]
    order: dict[str, None] = {}  # parameters outside the blocks, and each stack where its blocks begin
    for name, _ in model.named_parameters(remove_duplicate=False):
        owner = next((s.module for s in ordered if name.startswith(s.module + ".")), name)
        order.setdefault(owner, None)
    return Structure(type(model).__name__, tuple(ordered), embedding_names,
                     head_names[0] if head_names else None, tuple(order), _conversion(model))


def _meta_model(config: dict, reference: str):
    """The model class of `config`, built on the meta device (no memory, no weights)."""
    import torch
    import transformers
    from transformers import AutoConfig

    model_type = config.get("model_type")
    where = f"model '{reference}'" if reference else "the model"
    try:
        config_class = AutoConfig.for_model(model_type).__class__
    except (ValueError, KeyError):
        raise UnknownArchitecture(f"{where} is a '{model_type}' model, which transformers {transformers.__version__} "
                                  "does not know (its own code needs trust_remote_code)") from None
    logger = logging.getLogger("transformers")
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)  # warnings about token ids and defaults are not ours to show
        model_config = config_class.from_dict(_probe_config(config))
        classes = [getattr(transformers, name, None) for name in config.get("architectures") or []]
        model_class = next((c for c in classes if c is not None), None)
        with torch.device("meta"):
            if model_class is not None:
                return model_class(model_config)
            return _auto_model(model_config)
    except MergeError:
        raise
    except Exception as error:  # a config transformers refuses to build
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise MergeError(f"{where}: transformers cannot build its architecture from config.json ({reason})") from None
    finally:
        logger.setLevel(level)


def _probe_config(config: dict) -> dict:
    """`config` made small enough to build in milliseconds whatever it claims (a visitor's
    config may claim a billion layers): every depth a distinct small number (2, 3, ...) so
    each stack's depth key can still be told apart, per-layer lists cut to match, at most 4
    experts. Sizes stay: the meta device allocates nothing for them."""
    counter = iter(range(2, 1000))

    def shrink(scope: dict) -> dict:
        scope = {k: v for k, v in scope.items() if k != "quantization_config"}
        for key, value in list(scope.items()):
            if isinstance(value, dict):
                scope[key] = shrink(value)
            elif type(value) is int and value > 0 and _is_depth_key(key):
                depth = next(counter)
                for other, items in list(scope.items()):
                    if isinstance(items, list) and len(items) == value and not other.endswith(("_id", "_ids")):
                        scope[other] = (items * depth)[:depth]
                scope[key] = depth
            elif type(value) is int and value > 4 and "expert" in key:
                scope[key] = 4
        return scope

    return shrink(config)


def _is_depth_key(key: str) -> bool:
    return key in DEPTH_KEYS or ("layer" in key and key.startswith(("num_", "n_")))


def _auto_model(model_config):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        try:
            return auto.from_config(model_config)
        except ValueError:
            continue
    raise MergeError(f"transformers has no model class for '{model_config.model_type}'")


def _is_block_list(module) -> bool:
    children = list(module)
    return bool(children) and len({type(c) for c in children}) == 1 and \
        any(True for _ in children[0].parameters())


def _owner_config(model, module_name: str, top):
    """The (nested) config the stack was built from, its path in the top config, and the
    stack's root: the outermost submodule built from that config (the tower it belongs to)."""
    node, owner, root = model, top, None
    path = module_name.split(".")
    for depth, part in enumerate(path[:-1], start=1):
        node = getattr(node, part)
        config = getattr(node, "config", None)
        if config is not None and config is not owner:
            owner, root = config, ".".join(path[:depth])
        elif root is None and config is not None:
            root = ".".join(path[:depth])
    root = root if root is not None else ".".join(path[:-1])
    for key, value in top.to_dict().items():
        nested = getattr(top, key, None)
        if isinstance(value, dict) and nested is owner:
            return (key,), owner, root
    return (), owner, root


def _depth_key(owner, length: int) -> Optional[str]:
    values = owner.to_dict()
    for key in DEPTH_KEYS:
        if type(values.get(key)) is int and values[key] == length:
            return key
    return next((k for k, v in values.items() if type(v) is int and v == length
                 and ("layer" in k or "depth" in k) and not k.startswith(("max_", "first_"))), None)


def _text_stack(stacks: list[Stack], embedding_names: tuple[str, ...]) -> Optional[int]:
    """The decoder stack: the one whose submodule also holds the input embeddings."""
    for index, stack in enumerate(stacks):
        if any(name.startswith(stack.root + ".") or not stack.root for name in embedding_names):
            return index
    return 0 if len(stacks) == 1 else None


def _role(stack: Stack) -> str:
    where = ".".join(stack.depth_key + (stack.module,)).lower()
    for kind, role in (("vision", "vision_tower"), ("visual", "vision_tower"), ("audio", "audio_tower")):
        if kind in where:
            return role
    return stack.module


def _conversion(model) -> tuple:
    """transformers' stored-name -> module-name rules for this model, as data: each rule is
    (kind, scope prefix, base-model prefix, regex, targets); renamings all apply in turn,
    then at most one converter. Rules of kinds this module cannot replay are refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    rules = []
    for transform in get_model_conversion_mapping(model):
        if type(transform) in (WeightRenaming, PrefixChange):
            kind = "rename"
        elif type(transform) is WeightConverter:
            kind = "convert"
        else:
            raise MergeError(f"{type(model).__name__}: transformers renames its weights with "
                             f"{type(transform).__name__}, which MergeLab cannot follow yet")
        operations = tuple((type(op).__name__, getattr(op, "dim", None))
                           for op in getattr(transform, "operations", ()) if kind == "convert")
        if any(op not in FUSING_OPERATIONS for op, _ in operations):
            raise MergeError(f"{type(model).__name__}: transformers converts its weights with "
                             f"{', '.join(op for op, _ in operations)}, which MergeLab cannot follow yet")
        rules.append((kind, transform.scope_prefix, transform.base_model_prefix,
                      transform.compiled_sources.pattern, tuple(transform.target_patterns), operations))
    return tuple(rules)


# How transformers fuses stored per-expert tensors into one parameter: stack the experts
# (MergeModulelist, dim 0), then join the source patterns (Concatenate, along `dim`).
FUSING_OPERATIONS = ("MergeModulelist", "Concatenate")


@dataclass(frozen=True)
class FusedPart:
    """Where a stored tensor sits inside the fused parameter it loads into:
    parameter[expert] split in `parts` along `dim`, part `part`."""

    parameter: str
    expert: int
    part: int
    parts: int
    dim: int


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _apply_rule(rule: tuple, key: str) -> tuple[str, bool]:
    """One rule on one name, as transformers' WeightTransform.rename_source_key does it."""
    _, scope, base, pattern, targets = rule[:5]
    prefix, to_match = None, key
    if scope is not None:
        scope_dot = f"{scope}." if scope != "" else ""
        base_dot = f"{base}." if base else ""
        if key.startswith(base_dot + scope_dot):
            prefix = base_dot + scope_dot
        elif key.startswith(scope_dot):
            prefix = scope_dot
        else:
            return key, False
        to_match = key.removeprefix(prefix)
    compiled = _compiled(pattern)
    match = compiled.search(to_match)
    if match is None:
        return key, False
    group = next(name for name, value in match.groupdict().items() if value is not None)
    replacement = targets[0]
    if r"\1" in replacement:
        replacement = replacement.replace(r"\1", match.group(compiled.groupindex[group] + 1))
    renamed = to_match.replace(match.group(0), replacement, 1)
    return (prefix + renamed if prefix is not None else renamed), True


def _renamed(structure: Structure, stored: str) -> str:
    name = stored
    for rule in structure.mapping:
        if rule[0] == "rename":
            name, _ = _apply_rule(rule, name)
    return name


@lru_cache(maxsize=200_000)
def _module_name(structure: Structure, stored: str) -> str:
    name = _renamed(structure, stored)
    for rule in structure.mapping:
        if rule[0] == "convert":
            name, matched = _apply_rule(rule, name)
            if matched:
                break
    return name


def fused_part(structure: Structure, stored: str) -> Optional[FusedPart]:
    """For a stored tensor transformers fuses into a bigger parameter on loading (Mixtral's
    per-expert w1/w3 into experts.gate_up_proj): where it goes; None for the others."""
    name = _renamed(structure, stored)
    for rule in structure.mapping:
        if rule[0] != "convert":
            continue
        match = _compiled(rule[3]).search(name)
        if match is None:
            continue
        group = next(g for g, value in match.groupdict().items() if value is not None)
        expert = re.search(r"\.(\d+)\.", match.group(0))
        operations = dict(rule[5])
        if expert is None or "MergeModulelist" not in operations:
            return None
        parts = len(re.findall(r"\(\?P<g\d+>", rule[3]))
        dim = (operations.get("Concatenate") or 1) - 1  # inside one expert's slice
        return FusedPart(_module_name(structure, stored), int(expert.group(1)), int(group[1:]), parts, dim)
    return None


# ---------------------------------------------------------------------------------
# one checkpoint's tensors in that structure

class Layout:
    """One checkpoint's stored tensor names sorted into stacks and the rest."""

    def __init__(self, structure: Structure, names, config: dict):
        stacks = tuple(replace(stack, per_layer_keys=_per_layer_keys(config, stack)) for stack in structure.stacks)
        structure = replace(structure, stacks=stacks)
        self.structure = structure
        self.config = config
        self.layers: dict[str, LayerName] = {}
        self.by_layer: dict[tuple[str, int], list[str]] = {}
        self.module_names: dict[str, str] = {}
        self.by_module: dict[str, str] = {}  # module name -> stored name
        self.by_module_rest: dict[tuple[str, int, str], str] = {}
        for name in names:
            module = structure.module_name(name)
            self.module_names[name] = module
            # renamed but not fused: each of Mixtral's experts keeps its own name here
            renamed = _renamed(structure, name)
            self.by_module.setdefault(renamed, name)
            parts = _stack_position(structure, name, module, renamed)
            if parts is not None:
                self.layers[name] = parts
                self.by_layer.setdefault((parts.stack.role, parts.index), []).append(name)
                self.by_module_rest.setdefault((parts.stack.role, parts.index, parts.module_rest), name)

    # ---- stacks -----------------------------------------------------------------
    @property
    def stacks(self) -> tuple[Stack, ...]:
        return self.structure.stacks

    @property
    def text(self) -> Stack:
        return self.structure.text

    def depth(self, stack: Optional[Stack] = None) -> int:
        """Layers in `stack` (the text decoder by default), from its config key."""
        stack = stack or self.text
        value = config_value(self.config, stack.depth_key)
        if type(value) is int:
            return value
        indices = [p.index for p in self.layers.values() if p.stack == stack]
        return max(indices) + 1 if indices else 0

    def layer_tensors(self, index: int, stack: Optional[Stack] = None) -> list[str]:
        return self.by_layer.get(((stack or self.text).role, index), [])

    def split(self, name: str) -> Optional[LayerName]:
        return self.layers.get(name)

    def counterpart(self, name: str, other: "Layout", index: Optional[int] = None) -> Optional[str]:
        """The name `other` stores for what `name` is here (at layer `index` when given):
        the same module, whatever each checkpoint's naming."""
        parts = other.layers.get(name)
        if parts is not None:
            wanted = parts.index if index is None else index
            return self.by_module_rest.get((parts.stack.role, wanted, parts.module_rest))
        return self.by_module.get(_renamed(other.structure, name))

    def vocabulary_rows(self, tensors) -> Optional[int]:
        """Rows of the input embedding (one per token), else the config's vocab_size."""
        for name, info in tensors.items():
            if self.is_input_embedding(name) and info.shape:
                return info.shape[0]
        scope = owner_scope(self.config, self.text)
        return scope.get("vocab_size") if isinstance(scope, dict) else None

    def stack_of(self, name: str) -> Optional[Stack]:
        """The stack whose submodule holds `name` (its blocks, or its embeddings and norms
        outside the blocks); None for tensors of no stack's submodule (the output head, a
        projector between towers)."""
        parts = self.layers.get(name)
        if parts is not None:
            return parts.stack
        module = self.module_names.get(name, name)
        if self.is_input_embedding(name) or self.is_output_head(name):
            return self.text
        owners = [s for s in self.stacks if s.root and module.startswith(s.root + ".")]
        if owners:
            return max(owners, key=lambda s: len(s.root))
        return self.text if len(self.stacks) == 1 or not self.text.root else None

    # ---- the rest ---------------------------------------------------------------
    def is_input_embedding(self, name: str) -> bool:
        return self.module_names.get(name, name) in self.structure.input_embeddings

    def is_output_head(self, name: str) -> bool:
        return self.module_names.get(name, name) == self.structure.output_head

    def is_vocabulary(self, name: str) -> bool:
        """Tensors with one row per token: input embeddings and the output head."""
        return self.is_input_embedding(name) or self.is_output_head(name)

    def comes_before(self, name: str, stack: Optional[Stack] = None) -> bool:
        """Whether a tensor outside the blocks sits before `stack`'s blocks (embeddings)
        or after them (final norm, output head), by where transformers registers it."""
        stack = stack or self.stack_of(name) or self.text
        module = self.module_names.get(name, name)
        if self.is_input_embedding(name):
            return True
        if self.is_output_head(name):
            return False
        order = _order_index(self.structure)
        first = order.get(stack.module)
        position = order.get(module)
        if first is None or position is None:
            return False
        return position < first

    def tied_head_source(self, name: str) -> Optional[str]:
        """For an output head the checkpoint does not store (tied embeddings): the stored
        input embedding it reuses."""
        if self.module_names.get(name, name) != self.structure.output_head and not _looks_like_head(name):
            return None
        return next((n for n in self.module_names if self.is_input_embedding(n)), None)

    def match_names(self, name: str) -> tuple[str, ...]:
        """The names a parameter `filter` is matched against: the stored one and the one
        transformers loads it into (so `mlp` finds Mixtral's stored `block_sparse_moe`)."""
        module = self.module_names.get(name)
        return (name,) if module is None or module == name else (name, module)


def _per_layer_keys(config: dict, stack: Stack) -> tuple[tuple[str, ...], ...]:
    """Config lists with one entry per layer of `stack` (layer_types, ...), by their paths."""
    owner = stack.depth_key[:-1]
    scope = owner_scope(config, stack)
    depth = scope.get(stack.depth_key[-1]) if isinstance(scope, dict) else None
    if type(depth) is not int:
        return ()
    return tuple(owner + (key,) for key, value in sorted(scope.items())
                 if isinstance(value, list) and len(value) == depth and not key.endswith(("_id", "_ids")))


def _looks_like_head(name: str) -> bool:
    return name.startswith("lm_head") or name.endswith("embed_out.weight")


@lru_cache(maxsize=64)
def _order_index(structure: Structure) -> dict[str, int]:
    """Module parameter name (and each stack's module path) -> registration position."""
    order = {}
    for position, name in enumerate(structure.parameter_order):
        order.setdefault(name, position)
        for stack in structure.stacks:
            if name.startswith(stack.module + "."):  # a structure from tensor names lists a block's first name
                order.setdefault(stack.module, position)
    return order


def _stack_position(structure: Structure, stored: str, module: str, renamed: str) -> Optional[LayerName]:
    for stack in structure.stacks:
        head = stack.module + "."
        if not module.startswith(head):
            continue
        index_text, _, _ = module[len(head):].partition(".")
        if not index_text.isdigit():
            continue
        start = head + index_text + "."
        module_rest = renamed[len(start):] if renamed.startswith(start) else module[len(start):]
        # find the same index in the stored name, after the stack's own last path part
        last = stack.module.rsplit(".", 1)[-1]
        parts = stored.split(".")
        for position in range(1, len(parts) - 1):
            if parts[position] == index_text and parts[position - 1] == last:
                return LayerName(stack, ".".join(parts[:position]) + ".", int(index_text),
                                 ".".join(parts[position + 1:]), module_rest)
    return None


def config_value(config: dict, path: tuple[str, ...]):
    scope = config
    for key in path:
        if not isinstance(scope, dict):
            return None
        scope = scope.get(key)
    return scope


def owner_scope(config: dict, stack: "Stack"):
    """The part of a config that holds `stack`'s settings (its depth key's owner: the config
    itself, or text_config of a multimodal model); None when the config lacks it."""
    return config_value(config, stack.depth_key[:-1])


def set_config_value(config: dict, path: tuple[str, ...], value) -> None:
    scope = config
    for key in path[:-1]:
        scope = scope.setdefault(key, {})
    scope[path[-1]] = value


def layout_of(checkpoint) -> Layout:
    """The layout of a checkpoint's tensors (cached on the checkpoint)."""
    layout = getattr(checkpoint, "_layout", None)
    if layout is None:
        names = list(checkpoint.tensors)
        try:
            structure = structure_of(checkpoint.config, checkpoint.reference)
        except UnknownArchitecture as unknown:
            structure = structure_from_names(checkpoint.config, names, unknown)
        layout = Layout(structure, names, checkpoint.config)
        checkpoint._layout = layout
    return layout


def structure_from_names(config: dict, names: list[str], unknown: UnknownArchitecture) -> Structure:
    """For an architecture transformers lacks (its own code, not run here): the decoder-only
    convention mergekit also falls back to, one stack `<prefix>.layers|h|blocks.<i>.` whose
    depth a top-level key holds. Anything else is refused with the reason."""
    prefixes: dict[str, set[int]] = {}
    for name in names:
        match = LAYER_NAME.match(name)
        if match:
            prefixes.setdefault(match["prefix"], set()).add(int(match["index"]))
    depth_key = next((k for k in LAYER_COUNT_KEYS if type(config.get(k)) is int), None)
    if len(prefixes) != 1 or depth_key is None or \
            max(next(iter(prefixes.values()))) + 1 != config[depth_key]:
        raise MergeError(f"{unknown}, and its tensor names do not show one stack of "
                         f"{config.get(depth_key, '?')} layers") from None
    module = next(iter(prefixes))[:-1]
    outside = [n for n in names if LAYER_NAME.match(n) is None and n.endswith(".weight")]
    embeddings = tuple(n for n in outside if module_type(n) == "embed")
    head = next((n for n in outside if module_type(n) == "lm_head"), "lm_head.weight")
    order = tuple(embeddings) + (module + ".0",)
    return Structure(str((config.get("architectures") or [config.get("model_type")])[0]),
                     (Stack(TEXT_ROLE, module, module.rsplit(".", 1)[0] if "." in module else "", (depth_key,)),),
                     embeddings, head, order, ())


# ---------------------------------------------------------------------------------
# names that need no structure

def layer_tensor_name(prefix: str, index: int, rest: str) -> str:
    return f"{prefix}{index}.{rest}"


def module_type(name: str) -> str:
    """q, k, v, o, gate, up, down, norm, embed, lm_head, or other."""
    for needle, kind in MODULE_TYPES:
        if needle in name:
            return kind
    return "other"


LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<rest>.+)$")



def learn_into_table(configs: list[dict], table: Path = TABLE) -> list[str]:
    """Learn each config's structure from transformers and write it into the shipped table
    (sorted, one entry per architecture); returns the keys written."""
    entries = json.loads(table.read_text()) if table.is_file() else {}
    keys = []
    for config in configs:
        key = structure_key(config)
        entries[key] = structure_to_json(_learn_structure(config, key))
        keys.append(key)
    table.write_text(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
    _shipped.cache_clear()
    return keys


if __name__ == "__main__":  # python -m merging.architecture MODEL_FOLDER_OR_CONFIG_JSON ...
    import sys

    found = [Path(p) / "config.json" if Path(p).is_dir() else Path(p) for p in sys.argv[1:]]
    for key in learn_into_table([json.loads(p.read_text()) for p in found]):
        print(f"learned {key}")
