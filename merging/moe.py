"""Mixture of experts from dense models: a Mixtral-style model folder from an MoEConfig.

    from merging.moe import build_moe
    build_moe("moe.yml", "out/my-moe")

Attention, norms, embeddings and lm_head come from the base model; expert e's MLP at
every layer comes from expert e's model (w1 = gate_proj, w2 = down_proj, w3 = up_proj);
each layer gets a router built from the prompts (see merging.routing). The output is
written in the Mixtral checkpoint layout transformers itself saves
(`block_sparse_moe.experts.<e>.w1.weight`), which transformers 4 and 5, vLLM and
llama.cpp's converter all read. Tensors are copied one at a time from the memory-mapped
sources into streamed shards, so memory holds one tensor, not a model; gate_mode hidden
also loads the base model once, to run the prompts through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import folder as folder_files
from .architecture import Layout, structure_of
from .config import load_config
from .engine import resolve_device
from .errors import MergeError
from .moe_config import MoEConfig
from .plan import TORCH_DTYPES, check_loader_fields, format_bytes, tensor_seed
from .sources import Checkpoint, open_model
from .writer import ShardedSafetensorsWriter, atomic_folder, check_output_folder

DENSE_TYPES = ("llama", "mistral")  # dense models whose blocks are Mixtral's, MLP aside
EXPERT_PARTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp", "architectures", "auto_map")
DEFAULT_SHARD_BYTES = 5 * 1000**3

MoEProgress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class MoETensor:
    """One output tensor and where it comes from: the base, an expert's MLP, or a router."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "base" | "expert" | "router"
    source_name: Optional[str] = None
    expert: Optional[int] = None
    layer: Optional[int] = None


@dataclass
class MoEPlan:
    config: MoEConfig
    checkpoints: dict[str, Checkpoint]
    out_config: dict
    out_dtype: torch.dtype
    tensors: list[MoETensor]
    num_layers: int
    hidden_size: int
    warnings: list[str] = field(default_factory=list)

    @property
    def base(self) -> Checkpoint:
        return self.checkpoints[self.config.base_model]

    def expert_checkpoint(self, index: int) -> Checkpoint:
        return self.checkpoints[self.config.experts[index].source_model]

    @property
    def output_bytes(self) -> int:
        return self.parameter_count * self.out_dtype.itemsize

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def summary(self) -> str:
        config = self.config
        per_token = config.experts_per_token
        lines = [f"mixture of experts: MixtralForCausalLM, {len(config.experts)} experts, {per_token} per token, "
                 f"{self.num_layers} layers, gate_mode {config.gate_mode}",
                 f"base (attention, norms, embeddings, lm_head): {config.base_model}"]
        for index, expert in enumerate(config.experts):
            extras = [f"{len(expert.positive_prompts)} positive prompt(s)"] if expert.positive_prompts else []
            if expert.negative_prompts:
                extras.append(f"{len(expert.negative_prompts)} negative")
            if expert.noise_scale:
                extras.append(f"noise {expert.noise_scale:g}")
            if expert.residual_scale is not None:
                extras.append(f"residual scale {expert.residual_scale:g}")
            lines.append(f"expert {index}: {expert.source_model}" + (f" ({', '.join(extras)})" if extras else ""))
        lines.append(f"output: {len(self.tensors)} tensors, {self.parameter_count / 1e6:.1f} M parameters, "
                     f"{str(self.out_dtype).removeprefix('torch.')}, {format_bytes(self.output_bytes)}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _describe(config: MoEConfig, reference: str) -> str:
    if reference == config.base_model:
        return f"the base '{reference}'"
    index = next(i for i, e in enumerate(config.experts) if e.source_model == reference)
    return f"expert {index} ('{reference}')"


def plan_moe(config, checkpoints: Optional[dict[str, Checkpoint]] = None,
             allow_identical_experts: bool = False) -> MoEPlan:
    """Every check that the models' headers allow, before any weight is read or downloaded."""
    config = load_config(config)
    if not isinstance(config, MoEConfig):
        raise MergeError("this is a merge recipe, not an MoE recipe (MoE recipes list 'experts')")
    if not allow_identical_experts:
        config.check_distinct_experts()
    checkpoints = dict(checkpoints or {})
    for reference in config.referenced_models():
        if reference not in checkpoints:
            checkpoints[reference] = open_model(reference, download_weights=False)
    base = checkpoints[config.base_model]
    for reference in config.referenced_models():
        check_loader_fields(reference, checkpoints[reference].config)
        model_type = checkpoints[reference].config.get("model_type")
        if model_type not in DENSE_TYPES:
            raise MergeError(f"{_describe(config, reference)} is a '{model_type}' model; a Mixtral MoE is "
                             f"built from Llama or Mistral models")
    widths = {key: base.config.get(key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    labels = {"hidden_size": "hidden size", "intermediate_size": "MLP width (intermediate_size)",
              "num_hidden_layers": "layer count"}
    for expert in config.experts:
        other = checkpoints[expert.source_model].config
        for key, value in widths.items():
            if other.get(key) != value:
                raise MergeError(f"{_describe(config, expert.source_model)} has {labels[key]} {other.get(key)}, "
                                 f"the base has {value}")
    for key in ("attention_bias", "mlp_bias"):
        if base.config.get(key):
            raise MergeError(f"the base '{config.base_model}' has {key.replace('_', ' ')}es, which Mixtral lacks")

    hidden, layers = widths["hidden_size"], widths["num_hidden_layers"]
    out_dtype = _out_dtype(config, base)
    out_config = mixtral_config(base.config, len(config.experts), config.experts_per_token, out_dtype)
    expected = _mixtral_shapes(out_config)
    tensors: list[MoETensor] = []
    layer_prefix = "model.layers."
    layout = base.layout
    for name, info in base.tensors.items():
        parts = layout.split(name)
        if parts and parts.rest.startswith("mlp."):
            layer_prefix = parts.prefix
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; recomputed from the config
        if name not in expected:
            raise MergeError(f"the base '{config.base_model}' has tensor '{name}', which a Mixtral model has "
                             "no place for")
        if tuple(info.shape) != expected[name]:
            raise MergeError(f"the base's tensor '{name}' has shape {tuple(info.shape)}, Mixtral expects "
                             f"{expected[name]}")
        tensors.append(MoETensor(name, tuple(info.shape), "base", name))
    missing = sorted(n for n in expected if n not in {t.name for t in tensors} and ".block_sparse_moe." not in n
                     and not (n.startswith("lm_head") and out_config.get("tie_word_embeddings")))
    if missing:
        raise MergeError(f"the base '{config.base_model}' has no tensor '{missing[0]}'")

    for layer in range(layers):
        moe_prefix = f"{layer_prefix}{layer}.block_sparse_moe."
        tensors.append(MoETensor(moe_prefix + "gate.weight", (len(config.experts), hidden), "router", layer=layer))
        for index, expert in enumerate(config.experts):
            source = checkpoints[expert.source_model]
            for part, short in EXPERT_PARTS.items():
                source_name = f"{layer_prefix}{layer}.mlp.{part}.weight"
                out_name = f"{moe_prefix}experts.{index}.{short}.weight"
                info = source.tensors.get(source_name)
                if info is None:
                    raise MergeError(f"{_describe(config, expert.source_model)} has no tensor '{source_name}'")
                if tuple(info.shape) != expected[out_name]:
                    raise MergeError(f"{_describe(config, expert.source_model)}'s '{source_name}' has shape "
                                     f"{tuple(info.shape)}, the MoE expects {expected[out_name]}")
                tensors.append(MoETensor(out_name, tuple(info.shape), "expert", source_name, index, layer))
    if config.uses_prompts and base.folder is not None and not _has_tokenizer(base.folder):
        raise MergeError(f"gate_mode {config.gate_mode} tokenizes the prompts, but the base "
                         f"'{config.base_model}' has no tokenizer files")
    return MoEPlan(config, checkpoints, out_config, out_dtype, tensors, layers, hidden, list(config.warnings))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _out_dtype(config: MoEConfig, base: Checkpoint) -> torch.dtype:
    if config.dtype:
        return TORCH_DTYPES[config.dtype]
    stored = base.config.get("dtype") or base.config.get("torch_dtype")
    if stored in TORCH_DTYPES:
        return TORCH_DTYPES[stored]
    floats = [info.dtype for info in base.tensors.values() if info.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def mixtral_config(base_config: dict, num_experts: int, experts_per_token: int, dtype: torch.dtype) -> dict:
    """The base's config.json as a MixtralConfig: same widths, rope, vocabulary and special
    tokens; no sliding window (Llama has none); the experts and top-k added."""
    from transformers import MixtralConfig

    values = {k: v for k, v in base_config.items() if k not in LLAMA_ONLY_KEYS + ("model_type",)}
    values.update(num_local_experts=num_experts, num_experts_per_tok=experts_per_token, sliding_window=None,
                  dtype=str(dtype).removeprefix("torch."))
    try:
        config = MixtralConfig(**values)
    except (TypeError, ValueError) as error:
        raise MergeError(f"the base's config.json does not make a Mixtral config ({error})") from None
    data = config.to_dict()
    data["architectures"] = ["MixtralForCausalLM"]
    data.pop("transformers_version", None)
    return data


def _mixtral_shapes(out_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the Mixtral checkpoint, from the config alone: the
    model is built on the meta device (no memory) and its weights named as transformers
    saves them (per-expert w1/w2/w3 under block_sparse_moe)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**out_config))
    shapes = {}
    state = model.state_dict()
    layout = Layout(structure_of(out_config), list(state), out_config)
    for name, tensor in state.items():
        parts = layout.split(name)
        layer = f"{parts.prefix}{parts.index}" if parts else ""
        if parts and parts.rest == "mlp.experts.gate_up_proj":
            experts, double, hidden = tensor.shape
            for expert in range(experts):
                for short in ("w1", "w3"):
                    shapes[f"{layer}.block_sparse_moe.experts.{expert}.{short}.weight"] = (double // 2, hidden)
        elif parts and parts.rest == "mlp.experts.down_proj":
            for expert in range(tensor.shape[0]):
                shapes[f"{layer}.block_sparse_moe.experts.{expert}.w2.weight"] = tuple(tensor.shape[1:])
        elif parts and parts.rest == "mlp.gate.weight":
            shapes[f"{layer}.block_sparse_moe.gate.weight"] = tuple(tensor.shape)
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes


# ---- building ------------------------------------------------------------------------
def compute_routers(plan: MoEPlan, device: str = "auto", seed: int = 0,
                    progress: Optional[MoEProgress] = None) -> torch.Tensor:
    """Router weights for every layer, (layers, experts, hidden), float32."""
    from .routing import FLOAT32_LIMIT, gate_vectors

    config, base = plan.config, plan.base
    tokenizer = model = embeddings = None
    if config.gate_mode == "cheap_embed":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base.folder)
        embeddings = base.read(next(n for n in base.tensors if "embed_tokens" in n))
    elif config.uses_prompts:
        from .generation import load_model

        device = resolve_device(device)
        # float32 on CPU for exact directions while it fits; otherwise the stored dtype
        stored = next(iter(base.tensors.values())).dtype
        parameters = sum(info.numel for info in base.tensors.values())
        dtype = torch.float32 if device.type == "cpu" and parameters * 4 <= FLOAT32_LIMIT else stored
        model, tokenizer = load_model(base.folder, dtype=dtype, device=device)
    report = (lambda done, total: progress("router prompts", done, total)) if progress else None
    return gate_vectors(config.gate_mode, config.experts, plan.num_layers, plan.hidden_size,
                        tokenizer=tokenizer, model=model, embeddings=embeddings, seed=seed, progress=report)


def expert_tensor(plan: MoEPlan, task: MoETensor, seed: int) -> torch.Tensor:
    """An expert's MLP weight, with its noise (seeded per tensor) and residual scale."""
    expert = plan.config.experts[task.expert]
    tensor = plan.expert_checkpoint(task.expert).read(task.source_name)
    if not expert.noise_scale and (expert.residual_scale is None or "down_proj" not in task.source_name):
        return tensor
    tensor = tensor.float()
    if expert.noise_scale:
        generator = torch.Generator().manual_seed(tensor_seed(seed, task.name))
        tensor = tensor + torch.randn(tensor.shape, generator=generator) * expert.noise_scale
    if expert.residual_scale is not None and "down_proj" in task.source_name:
        tensor = tensor * expert.residual_scale  # scales the expert's contribution to the residual
    return tensor


def build_moe(config, out_dir: Union[str, Path], device: str = "auto", *, seed: int = 0,
              progress: Optional[MoEProgress] = None, out_shard_size: int = DEFAULT_SHARD_BYTES,
              overwrite: bool = False, allow_identical_experts: bool = False,
              plan: Optional[MoEPlan] = None) -> Path:
    """Build the MoE `config` describes into a Hugging Face model folder at `out_dir`.

    Everything is checked before any weight is read; the folder appears only when
    complete. `progress(stage, done, total)` reports router prompts, then tensors."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    resolve_device(device)
    plan = plan or plan_moe(config, allow_identical_experts=allow_identical_experts)
    from .plan import METADATA_MARGIN_BYTES, copied_files_bytes
    from .writer import check_free_space

    check_free_space([(out_dir.resolve().parent,
                       plan.output_bytes + copied_files_bytes(plan.base.folder) + METADATA_MARGIN_BYTES)])
    for reference, checkpoint in plan.checkpoints.items():  # hub models checked by headers: fetch now
        plan.checkpoints[reference] = checkpoint.fetched()
    routers = compute_routers(plan, device, seed, progress)
    plan.warnings.extend(router_warnings(routers))
    entries = [(t.name, plan.out_dtype, t.shape) for t in plan.tensors]
    with atomic_folder(out_dir, overwrite) as temporary:
        writer = ShardedSafetensorsWriter(temporary, entries, out_shard_size)
        try:
            for done, task in enumerate(plan.tensors, 1):
                if task.kind == "router":
                    tensor = routers[task.layer]
                elif task.kind == "expert":
                    tensor = expert_tensor(plan, task, seed)
                else:
                    tensor = plan.base.read(task.source_name)
                writer.write(task.name, [tensor])
                if task.kind == "base":
                    plan.base.release(task.source_name)
                elif task.kind == "expert":
                    plan.expert_checkpoint(task.expert).release(task.source_name)
                if progress:
                    progress("tensors", done, len(plan.tensors))
            writer.close()
        finally:
            writer.abort()
        folder_files.write_config(temporary, plan.out_config)
        folder_files.copy_model_files(temporary, plan.base.folder)
        folder_files.write_model_card(temporary, out_dir.name, plan.config.to_yaml(), plan.config.referenced_models(),
                                      "mixture of experts (Mixtral)", plan.config.base_model,
                                      config_file="mergekit_moe_config.yml", command="mergekit-moe")
    for checkpoint in plan.checkpoints.values():
        checkpoint.close()
    return out_dir


def router_warnings(routers: torch.Tensor) -> list[str]:
    from .routing import degenerate_layers

    layers = degenerate_layers(routers)
    if not layers:
        return []
    which = "every layer" if len(layers) == routers.shape[0] else f"layers {', '.join(map(str, layers))}"
    return [f"the routers of {which} can hardly tell some experts apart (their prompts point the same way); "
            "some experts will be underused"]


__all__ = ["MoEPlan", "plan_moe", "build_moe", "compute_routers", "mixtral_config"]
