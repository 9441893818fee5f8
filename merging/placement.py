"""Models bigger than one device: accelerate places them across GPUs, CPU memory and disk.

    placed = place(model_on_meta, {"cuda:0": "20GiB", "cpu": "60GiB"}, torch.bfloat16, folder)
    placed.tensors["model.layers.30.mlp.up_proj.weight"]   # where that weight's values live

accelerate's `infer_auto_device_map` fills the devices in order (the GPUs, then the CPU,
then files on disk) with whole blocks (a decoder layer is never split), and
`dispatch_model` hooks every block whose weights wait off the execution device, so they
are brought there for the block's forward pass and dropped after it. Weights offloaded
to the CPU live in CPU tensors; weights offloaded to disk live in files in accelerate's
offload format (`<name>.dat`, raw values, with an index), which this module maps into
memory shared with the file. A merge writes every tensor into `tensors[name]`: on its
GPU, in CPU memory, or into the mapped file that the next forward pass reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import MergeError
from .limits import parse_size

MaxMemory = dict[Union[int, str], Union[int, str]]
SETTING = "MERGELAB_DEVICE_MEMORY"


def parse_max_memory(text: str) -> MaxMemory:
    """'cuda:0=20GiB,cpu=60GiB' (or '0=20GiB,cpu=60GiB') as accelerate's max_memory: GPU
    indices and 'cpu', each with a size in bytes; every mistake is named in one line."""
    memory: MaxMemory = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        device, equals, size = part.partition("=")
        device = device.strip().lower()
        if not equals:
            raise MergeError(f"max memory '{part}' has no size: write device=size, e.g. cuda:0=20GiB,cpu=60GiB")
        try:
            nbytes = parse_size(size.strip())
        except MergeError:
            raise MergeError(f"max memory for '{device}' is '{size.strip()}', not a size like 20GiB") from None
        if device == "cpu":
            key: Union[int, str] = "cpu"
        elif re.fullmatch(r"(cuda:)?\d+", device):
            key = int(device.split(":")[-1])
        else:
            raise MergeError(f"max memory names the device '{device}'; devices are cpu and cuda:N (or N)")
        if key in memory:
            raise MergeError(f"max memory names '{device}' twice")
        memory[key] = nbytes
    if not memory:
        raise MergeError("max memory is empty: write device=size, e.g. cuda:0=20GiB,cpu=60GiB")
    if torch.cuda.is_available():
        missing = [k for k in memory if isinstance(k, int) and k >= torch.cuda.device_count()]
    else:
        missing = [k for k in memory if isinstance(k, int)]
    if missing:
        raise MergeError(f"max memory names cuda:{missing[0]}, but this machine has "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s)")
    return memory


def server_max_memory() -> Optional[MaxMemory]:
    """MERGELAB_DEVICE_MEMORY (the server's placement of every visitor's models), if set."""
    text = os.environ.get(SETTING, "").strip()
    return parse_max_memory(text) if text else None


@dataclass
class Placed:
    """A model dispatched across devices, and where each of its weights' values live."""

    device_map: dict[str, Union[int, str]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    offload_folder: Optional[Path] = None

    def devices(self) -> dict[str, int]:
        """How many blocks went to each device ('disk' included)."""
        counts: dict[str, int] = {}
        for device in self.device_map.values():
            key = f"cuda:{device}" if isinstance(device, int) else str(device)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def __str__(self) -> str:
        return ", ".join(f"{count} block(s) on {device}" for device, count in self.devices().items())


def empty_model(make):
    """`make()` run with every parameter on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return make()


def device_of(name: str, device_map: dict) -> Union[int, str]:
    """The device of the block that holds the tensor `name` (the longest matching prefix)."""
    best, device = -1, None
    for block, where in device_map.items():
        if block == "" or name == block or name.startswith(block + "."):
            if len(block) > best:
                best, device = len(block), where
    if device is None:
        raise MergeError(f"the device map places no block holding '{name}'")
    return device


def place(model: torch.nn.Module, max_memory: MaxMemory, dtype: torch.dtype,
          offload_root: Optional[Union[str, Path]] = None) -> Placed:
    """Give the parameters of `model` (on the meta device) empty storage where accelerate
    places them within `max_memory`, and dispatch it. Weights offloaded to disk go to a new
    folder under `offload_root` (the system's temporary folder by default), deleted with
    the returned Placed."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    if hasattr(model, "tie_weights"):
        model.tie_weights()  # so the device map keeps tied weights together
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                       dtype=dtype)
    gpus = sorted({d for d in device_map.values() if isinstance(d, int)})
    execution = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
    placed = Placed(device_map)

    index: dict[str, dict] = {}
    first_name: dict[int, str] = {}  # tied weights (an lm_head sharing the embedding): one tensor, two names
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type != "meta":  # a buffer made at construction, moved by dispatch
            placed.tensors[name] = tensor
            continue
        device = device_of(name, device_map)
        shared = first_name.setdefault(id(tensor), name)
        if shared != name:
            placed.tensors[name] = placed.tensors[shared]
            if device == "disk":  # the hook reads the file under this name too
                os.link(placed.offload_folder / f"{shared}.dat", placed.offload_folder / f"{name}.dat")
                index[name] = index[shared]
            continue
        out_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        if device == "disk":
            if placed.offload_folder is None:
                placed.offload_folder = new_offload_folder(offload_root)
                delete_with(model, placed.offload_folder)  # the files go with the model reading them
            placed.tensors[name] = _mapped(placed.offload_folder / f"{name}.dat", tensor.shape, out_dtype)
            index[name] = {"dtype": str(out_dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        else:
            target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            set_module_tensor_to_device(model, name, target, value=torch.empty(tensor.shape, dtype=out_dtype,
                                                                              device=target))
            placed.tensors[name] = _module_tensor(model, name)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if placed.offload_folder is not None:
        (placed.offload_folder / "index.json").write_text(json.dumps(index))
    dispatch_model(model, device_map, main_device=execution, offload_dir=placed.offload_folder,
                   offload_index=index or None)
    return placed


def _module_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)


def new_offload_folder(root: Optional[Union[str, Path]] = None) -> Path:
    """A new, empty folder for offloaded weights, under `root` (else the temporary folder)."""
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="offload-", dir=root))


def delete_with(owner: object, folder: Path) -> None:
    """Delete `folder` when `owner` (the model reading its files) is garbage."""
    weakref.finalize(owner, shutil.rmtree, folder, True)


def _mapped(path: Path, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose storage is the file `path` (made to size), shared: writes reach the file."""
    count = max(1, shape.numel())  # accelerate stores a scalar as one value
    with open(path, "wb") as file:
        file.truncate(count * dtype.itemsize)
    tensor = torch.from_file(str(path), shared=True, size=count, dtype=dtype)
    return tensor.reshape(shape) if shape.numel() else tensor.reshape(())


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model takes its inputs: the execution device of its embedding (whose weights
    may wait offloaded on the meta device between passes), else its first parameter's."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embeddings, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        device = hook.execution_device
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
