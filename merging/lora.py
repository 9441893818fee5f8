"""LoRA adapters as models, and LoRA extraction from a fine-tune.

A model reference `base+adapter` (mergekit's syntax), or a PEFT adapter folder
(adapter_config.json + adapter_model.safetensors, its base named in the config), reads
as the base with the adapter merged in, one tensor at a time and never on disk:

    W' = W + s * B A,   s = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

with per-module `rank_pattern` / `alpha_pattern`; embeddings take (B A)^T; tensors the
adapter saves whole (`modules_to_save`) replace the base's.

Extraction goes the other way: for every linear weight of the decoder layers,
delta = W_model - W_base ~ U_r S_r V_r^T (truncated SVD), saved as B = U_r S_r,
A = V_r^T with lora_alpha = r (s = 1), in the PEFT layout that peft loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from .architecture import split_layer_name
from .checkpoint import Checkpoint, read_safetensors_header
from .errors import MergeError

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def _adapter_weights(folder: Path, reference: str) -> Checkpoint:
    """The adapter's own tensors, as a Checkpoint without a config."""
    from .torch_bin import TorchBinCheckpoint

    if (folder / "adapter_model.safetensors").is_file():
        return Checkpoint(reference, folder, {}, read_safetensors_header(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").is_file():
        return TorchBinCheckpoint(reference, folder, {}, [folder / "adapter_model.bin"])
    raise MergeError(f"adapter '{reference}' has no adapter_model.safetensors")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key matching the module's name
    (as a regex on the name's end)."""
    for key, value in (patterns or {}).items():
        if re.search(rf"(^|\.){key}$", module):
            return value
    return default


class LoraCheckpoint(Checkpoint):
    """The base with the adapter merged in, tensor by tensor (float32 where adapted)."""

    def __init__(self, reference: str, base: Checkpoint, adapter_folder: Path):
        config = json.loads((adapter_folder / ADAPTER_CONFIG).read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise MergeError(f"adapter '{adapter_folder}' is a {config.get('peft_type')} adapter; "
                             "only LoRA is supported")
        if config.get("use_dora"):
            raise MergeError(f"adapter '{adapter_folder}' uses DoRA, which MergeLab cannot apply yet")
        super().__init__(reference, base.folder, base.config, dict(base.tensors))
        self.base = base
        self.adapter = _adapter_weights(adapter_folder, reference)
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        self.updates: dict[str, tuple[str, str, float, bool]] = {}  # target -> (A, B, scale, embedding)
        self.replacements: dict[str, str] = {}
        for key in self.adapter.tensors:
            # whole tensors the adapter saved: modules_to_save, and embedding layers' base weights
            name = key.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default", "").replace(".base_layer", "")
            match = re.match(r"^(.*)\.lora_(embedding_)?A(?:\.default)?(?:\.weight)?$", name)
            if match:
                module, embedding = match[1], bool(match[2])
                b_key = key.replace("lora_embedding_A" if embedding else "lora_A",
                                    "lora_embedding_B" if embedding else "lora_B")
                rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
                alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
                scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
                self.updates[self._target(module + ".weight", reference)] = (key, b_key, scale, embedding)
            elif ".lora_" not in name:
                self.replacements[self._target(name, reference)] = key

    def _target(self, name: str, reference: str) -> str:
        if name in self.base.tensors:
            return name
        raise MergeError(f"adapter '{reference}' changes '{name}', which its base model does not have")

    @property
    def has_weights(self) -> bool:
        return self.base.has_weights

    def read(self, name: str) -> torch.Tensor:
        replacement = self.replacements.get(name)
        weight = self.adapter.read(replacement) if replacement else self.base.read(name)
        update = self.updates.get(name)
        if update is None:
            return weight
        a_key, b_key, scale, embedding = update
        delta = self.adapter.read(b_key).float() @ self.adapter.read(a_key).float()
        if embedding or self.fan_in_fan_out:
            delta = delta.T
        return weight.float() + scale * delta

    def release(self, name: str, first_byte: int = 0, end_byte: Optional[int] = None) -> None:
        if first_byte == 0 and end_byte is None:  # byte ranges refer to the float32 result, not the file
            self.base.release(name)

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def open_lora(reference: str, download_weights: bool = True) -> Checkpoint:
    """`base+adapter`, or an adapter folder whose config names its base."""
    if "+" in reference:
        base_reference, adapter_reference = reference.split("+", 1)
    else:
        base_reference, adapter_reference = None, reference
    adapter_folder = _adapter_folder(adapter_reference, download_weights)
    if base_reference is None:
        base_reference = json.loads((adapter_folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base_reference:
            raise MergeError(f"adapter '{adapter_reference}' does not name its base model; write it as base+adapter")
    base = Checkpoint.open(base_reference, download_weights)
    return LoraCheckpoint(reference, base, adapter_folder)


def _adapter_folder(reference: str, download_weights: bool) -> Path:
    from .access import current_access

    folder = Path(reference).expanduser()
    if not current_access().reads_from_hub(reference) and folder.is_dir():
        if not (folder / ADAPTER_CONFIG).is_file():
            raise MergeError(f"'{reference}' is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
        return folder
    from .checkpoint import HUB_ID, _hub_snapshot, split_hub_id

    if not HUB_ID.match(reference):
        raise MergeError(f"adapter '{reference}' is neither a local folder nor a hub id (org/name)")
    repo, revision = split_hub_id(reference)
    return _hub_snapshot(reference, repo, revision, [ADAPTER_CONFIG, "adapter_model.safetensors"], local_only=False)


# ---- extraction --------------------------------------------------------------------------
def linear_weights(checkpoint: Checkpoint) -> list[str]:
    """The 2-D `*_proj.weight` tensors of the decoder layers (attention and MLP linears)."""
    return [n for n, info in checkpoint.tensors.items()
            if len(info.shape) == 2 and split_layer_name(n) and n.endswith("_proj.weight")]


def extract_lora(model: str, base: str, out_dir, rank: int, progress: Optional[Callable[[int, int], None]] = None
                 ) -> dict:
    """Write a rank-`rank` LoRA adapter that turns `base` into (approximately) `model`.
    Returns a report: modules adapted, the share of the delta's energy (squared Frobenius
    norm) the rank keeps, and tensors that differ but are not linear weights."""
    from safetensors.torch import save_file

    from .writer import atomic_folder

    if rank < 1:
        raise MergeError(f"--rank must be at least 1, got {rank}")
    tuned, original = Checkpoint.open(model), Checkpoint.open(base)
    names = linear_weights(original)
    if not names:
        raise MergeError(f"base '{base}' has no linear layer weights (*_proj.weight) to adapt")
    for name in names:
        if name not in tuned.tensors or tuned.tensors[name].shape != original.tensors[name].shape:
            raise MergeError(f"model '{model}' has no tensor '{name}' of the base's shape "
                             f"{original.tensors[name].shape}: it is not a fine-tune of this base")
    tensors, kept, total, modules = {}, 0.0, 0.0, set()
    for index, name in enumerate(names, 1):
        delta = tuned.read(name).float() - original.read(name).float()
        energy = float(delta.pow(2).sum())
        if energy > 0:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, s.numel())
            module = name.removesuffix(".weight")
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = vh[:r].contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (u[:, :r] * s[:r]).contiguous()
            kept += float(s[:r].pow(2).sum())
            total += energy
            modules.add(module.rsplit(".", 1)[-1])
        tuned.release(name)
        original.release(name)
        if progress:
            progress(index, len(names))
    others = sorted(n for n in original.tensors if n not in set(names) and n in tuned.tensors
                    and tuned.tensors[n].shape == original.tensors[n].shape
                    and not torch.equal(tuned.read(n), original.read(n)))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "target_modules": sorted(modules), "base_model_name_or_path": base}
    with atomic_folder(Path(out_dir)) as temporary:
        save_file(tensors, temporary / "adapter_model.safetensors", metadata={"format": "pt"})
        (temporary / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {"modules": len(tensors) // 2, "energy_kept": kept / total if total else 1.0, "not_extracted": others}
