"""A model folder on disk: its safetensors (one file, shards named by an index, or any
`*.safetensors`), or failing those its `.bin` files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import MergeError
from .tensors import Checkpoint, TensorInfo, read_config, read_safetensors_header, shard_files
from .torch_bin import TorchBinCheckpoint, bin_files


def open_folder(folder: Path, reference: Optional[str] = None) -> Checkpoint:
    reference = reference or str(folder)
    config = read_config(folder, reference)
    index = folder / "model.safetensors.index.json"
    files = []
    if index.is_file():
        files = shard_files(index, reference)
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        if bin_files(folder, reference):
            return TorchBinCheckpoint(reference, folder, config, bin_files(folder, reference))
        others = [p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".gguf")]
        extra = f" (found {others[0]}; only safetensors and .bin weights are supported)" if others else ""
        raise MergeError(f"model '{reference}' has no safetensors weights in '{folder}'{extra}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    return Checkpoint(reference, folder, config, tensors)
