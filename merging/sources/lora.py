"""LoRA adapters as models.

A model reference `base+adapter` (mergekit's syntax), or a PEFT adapter folder
(adapter_config.json + adapter_model.safetensors, its base named in the config), reads
as the base with the adapter merged in, one tensor at a time and never on disk:

    W' = W + s * B A,   s = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

with per-module `rank_pattern` / `alpha_pattern`; embeddings take (B A)^T; tensors the
adapter saves whole (`modules_to_save`) replace the base's. Extraction, the other way, is
merging.extract.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from ..access import HUB_ID, current_access
from ..errors import MergeError
from .hub import hub_snapshot, split_hub_id
from .tensors import Checkpoint, read_safetensors_header
from .torch_bin import TorchBinCheckpoint

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def _adapter_weights(folder: Path, reference: str) -> Checkpoint:
    """The adapter's own tensors, as a Checkpoint without a config."""
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

    def __init__(self, reference: str, base: Checkpoint, adapter_folder: Path,
                 open_base: Callable[[str, bool], Checkpoint]):
        config = json.loads((adapter_folder / ADAPTER_CONFIG).read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise MergeError(f"adapter '{adapter_folder}' is a {config.get('peft_type')} adapter; "
                             "only LoRA is supported")
        if config.get("use_dora"):
            raise MergeError(f"adapter '{adapter_folder}' uses DoRA, which MergeLab cannot apply yet")
        super().__init__(reference, base.folder, base.config, dict(base.tensors))
        self.base, self.open_base = base, open_base
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
                target = self._target(module + ".weight", reference)
                self._check_shapes(target, key, b_key, embedding, reference)
                self.updates[target] = (key, b_key, scale, embedding)
            elif ".lora_" not in name:
                target = self._target(name, reference)
                if self.adapter.tensors[key].shape != self.base.tensors[target].shape:
                    raise MergeError(f"adapter '{reference}' replaces '{target}' with shape "
                                     f"{list(self.adapter.tensors[key].shape)}, the base has "
                                     f"{list(self.base.tensors[target].shape)}")
                self.replacements[target] = key

    def _check_shapes(self, target: str, a_key: str, b_key: str, embedding: bool, reference: str) -> None:
        """B @ A must have the base weight's shape (transposed for embeddings and fan_in_fan_out):
        a wrong adapter is refused when opened, not halfway through a merge."""
        if b_key not in self.adapter.tensors:
            raise MergeError(f"adapter '{reference}' has {a_key} but no {b_key}")
        a, b = self.adapter.tensors[a_key].shape, self.adapter.tensors[b_key].shape
        product = (b[0], a[1]) if len(a) == 2 and len(b) == 2 and b[1] == a[0] else None
        if product is not None and (embedding or self.fan_in_fan_out):
            product = product[::-1]
        wanted = tuple(self.base.tensors[target].shape)
        if product != wanted:
            raise MergeError(f"adapter '{reference}' changes '{target}' by B {list(b)} @ A {list(a)}, which does "
                             f"not give the base's shape {list(wanted)} (an adapter for another model?)")

    def _target(self, name: str, reference: str) -> str:
        if name in self.base.tensors:
            return name
        raise MergeError(f"adapter '{reference}' changes '{name}', which its base model does not have")

    @property
    def has_weights(self) -> bool:
        return self.base.has_weights

    def fetched(self) -> Checkpoint:
        """Opened again with weights (a base known by its headers is downloaded now)."""
        if self.folder is None or self.has_weights:
            return self
        return open_lora(self.reference, self.open_base, download_weights=True)

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


def open_lora(reference: str, open_base: Callable[[str, bool], Checkpoint], download_weights: bool = True
              ) -> "LoraCheckpoint":
    """`base+adapter`, or an adapter folder whose config names its base. The base may be
    any model: `open_base` (merging.sources.open_model) opens it."""
    if "+" in reference:
        base_reference, adapter_reference = reference.split("+", 1)
    else:
        base_reference, adapter_reference = None, reference
    adapter_folder = _adapter_folder(adapter_reference, download_weights)
    if base_reference is None:
        base_reference = json.loads((adapter_folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base_reference:
            raise MergeError(f"adapter '{adapter_reference}' does not name its base model; write it as base+adapter")
    base = open_base(base_reference, download_weights)
    return LoraCheckpoint(reference, base, adapter_folder, open_base)


def _adapter_folder(reference: str, download_weights: bool) -> Path:
    folder = Path(reference).expanduser()
    if not current_access().reads_from_hub(reference) and folder.is_dir():
        if not (folder / ADAPTER_CONFIG).is_file():
            raise MergeError(f"'{reference}' is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
        return folder
    if not HUB_ID.match(reference):
        raise MergeError(f"adapter '{reference}' is neither a local folder nor a hub id (org/name)")
    repo, revision = split_hub_id(reference)
    return hub_snapshot(reference, repo, revision, [ADAPTER_CONFIG, "adapter_model.safetensors"], local_only=False)
