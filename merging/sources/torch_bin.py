"""PyTorch `.bin` checkpoints, read safely: `torch.load(weights_only=True)` only.

A `.bin` file is a pickle. Unpickling an untrusted pickle can run any code, so these files
are loaded with torch's restricted unpickler, which accepts tensors and plain containers
and nothing else; a file that needs more is refused with a message, never unpickled.
Zip-format files are memory-mapped (`mmap=True`), so tensors are read from disk as used.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from ..errors import MergeError
from .tensors import Checkpoint, TensorInfo, shard_files

INDEX_FILE = "pytorch_model.bin.index.json"


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one `.bin` file (weights_only; memory-mapped when the format allows)."""
    try:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MergeError(f"'{path}' holds Python objects besides tensors; loading it could run arbitrary code, "
                         "so it is refused (convert it to safetensors with tools you trust)") from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise MergeError(f"'{path}' is not a readable PyTorch checkpoint ({type(error).__name__})") from None
    for key in ("state_dict", "model"):  # training checkpoints nest the weights one level down
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MergeError(f"'{path}' is not a mapping of tensor names to tensors")
    return state


def bin_files(folder: Path, reference: str) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        return shard_files(index, reference)
    return sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))


class TorchBinCheckpoint(Checkpoint):
    """A model folder whose weights are `.bin` files: every file is opened (mapped, not read)
    up front, which gives the shapes the plan needs; tensors are read as used."""

    def __init__(self, reference: str, folder: Path, config: dict, files: list[Path]):
        self._states = {file: load_state_dict(file) for file in files}
        tensors = {name: TensorInfo(name, tensor.dtype, tuple(tensor.shape), file)
                   for file, state in self._states.items() for name, tensor in state.items()}
        super().__init__(reference, folder, config, tensors)

    def read(self, name: str) -> torch.Tensor:
        return self._states[self.tensors[name].file][name]

    def _advise(self, *args, **kwargs) -> None:
        pass  # torch owns these mappings; the kernel pages them as it likes

    def close(self) -> None:
        self._states.clear()
