"""Where models come from: `open_model(reference)` picks the reader for a reference and
returns a `Checkpoint`, whose tensors are read one at a time.

    tensors.py    TensorInfo, safetensors headers, Checkpoint (the base every reader builds on)
    torch_bin.py  .bin weights (weights_only)          local.py  a model folder on disk
    hub.py        hub snapshots, remote headers, access checks
    gguf.py       GGUF files, dequantized per tensor    lora.py   base+adapter, adapter folders
    vocabulary.py AlignedCheckpoint: models whose vocabularies differ, mapped onto one

Imports go one way: every reader builds on tensors.py (and on each other without cycles:
lora -> hub -> local -> torch_bin -> tensors); only this module knows them all.
"""

from __future__ import annotations

from pathlib import Path

from ..access import HUB_ID, current_access
from ..errors import MergeError
from .gguf import GGUFCheckpoint, gguf_file
from .hub import HubHeaders, hub_endpoint, hub_offline, hub_reachable, open_hub_model
from .local import open_folder
from .lora import LoraCheckpoint, is_adapter_folder, open_lora
from .tensors import (SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, Checkpoint, TensorInfo,
                      read_safetensors_header)
from .torch_bin import TorchBinCheckpoint
from .vocabulary import AlignedCheckpoint, VocabularyAlignment, align_vocabularies, extend_tokenizer


def open_model(reference: str, download_weights: bool = True) -> Checkpoint:
    """The model a reference names: `base+adapter` or a LoRA adapter folder, a .gguf file
    (or a folder holding one and no config.json), a local folder (safetensors or .bin), or
    a hub id `org/name[@revision]`. Without `download_weights`, a hub model not in the
    cache is known by its headers only (enough for checks and plans; `fetched()` downloads
    it). On a public deployment (merging.access) hub ids go to the hub and local paths are
    read only inside the allowed folders."""
    access = current_access()
    if access.restricted:  # a public deployment: hub ids go to the hub, local paths only if allowed
        if "+" in reference:
            return open_lora(reference, open_model, download_weights)  # each side is checked on its own
        if access.reads_from_hub(reference):
            return open_hub_model(reference, download_weights)
    folder = Path(reference).expanduser()
    if ("+" in reference and not folder.exists()) or (folder.is_dir() and is_adapter_folder(folder)):
        return open_lora(reference, open_model, download_weights)
    gguf = gguf_file(reference)
    if gguf is not None:
        return GGUFCheckpoint(reference, gguf)
    if folder.is_dir():
        return open_folder(folder, reference)
    if folder.suffix in (".safetensors", ".gguf", ".bin") or folder.exists():
        raise MergeError(f"model '{reference}' must be a folder with config.json and safetensors weights")
    if not HUB_ID.match(reference):
        raise MergeError(f"model '{reference}' is neither a local folder nor a hub id (org/name)")
    return open_hub_model(reference, download_weights)


__all__ = ["open_model", "open_folder", "open_hub_model", "Checkpoint", "TensorInfo", "read_safetensors_header",
           "SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS", "HubHeaders", "hub_endpoint", "hub_offline",
           "hub_reachable", "TorchBinCheckpoint", "GGUFCheckpoint", "LoraCheckpoint", "AlignedCheckpoint",
           "VocabularyAlignment", "align_vocabularies", "extend_tokenizer"]
