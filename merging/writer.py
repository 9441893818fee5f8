"""Writing a merged model: streamed safetensors shards, atomically placed folders.

Because the plan knows every output tensor's name, dtype and shape before the first
one is computed, each shard's header is written first and tensors are streamed into
it as they are produced: memory holds the tensors in flight, never a whole shard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from .checkpoint import TORCH_TO_SAFETENSORS
from .errors import MergeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ShardedSafetensorsWriter:
    """Writes tensors, in the announced order, into shards of at most `max_shard_bytes`."""

    def __init__(self, folder: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = _assign_shards(entries, max_shard_bytes)
        count = len(self.shards)
        self.file_names = ([SINGLE_FILE] if count == 1 else
                           [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._order = [name for shard in self.shards for name, _, _ in shard]
        self._specs = {name: (dtype, shape) for shard in self.shards for name, dtype, shape in shard}
        self._next = 0
        self._shard = -1
        self._handle = None
        self._remaining_in_shard = 0

    def write(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """Stream one tensor, given as consecutive row blocks, into its shard (cast to the
        announced dtype on the way)."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"writer expected tensor {expected}, got {name}")
        dtype, shape = self._specs[name]
        if self._remaining_in_shard == 0:
            self._open_next_shard()
        written = 0
        for block in blocks:  # float32 blocks are cast here, once
            data = block.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
            if data.numel():
                self._handle.write(memoryview(data.view(torch.uint8).numpy()))
            written += data.numel() * data.element_size()
        if written != _nbytes(dtype, shape):
            raise RuntimeError(f"{name}: wrote {written} bytes, expected {_nbytes(dtype, shape)}")
        self._remaining_in_shard -= 1
        self._next += 1
        if self._remaining_in_shard == 0:
            self._handle.close()
            self._handle = None

    def _open_next_shard(self) -> None:
        self._shard += 1
        while not self.shards[self._shard]:
            self._shard += 1
        shard = self.shards[self._shard]
        header, offset = {}, 0
        for name, dtype, shape in shard:
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._handle = open(self.folder / self.file_names[self._shard], "wb")
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)
        self._remaining_in_shard = len(shard)

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if len(self.shards) > 1:
            weight_map = {name: self.file_names[i] for i, shard in enumerate(self.shards)
                          for name, _, _ in shard}
            total = sum(_nbytes(d, s) for shard in self.shards for _, d, s in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _nbytes(dtype: torch.dtype, shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def _assign_shards(entries, max_shard_bytes: int) -> list[list]:
    """Greedy, in order: a new shard starts when the next tensor would not fit."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and max_shard_bytes > 0 and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over a folder the user has filled."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"output '{out_dir}' exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"output folder '{out_dir}' is not empty; choose another or pass --overwrite")
    parent = out_dir.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as error:
            raise MergeError(f"cannot create the output's parent folder '{parent}' ({error.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise MergeError(f"cannot write to '{parent}'")


@contextmanager
def atomic_folder(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `out_dir`; on success it becomes `out_dir`,
    on failure it disappears. An existing `out_dir` is replaced only after success."""
    out_dir = Path(out_dir).resolve()
    check_output_folder(out_dir, overwrite)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # mkdtemp's 0700 would hide the model from other users
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old: Optional[Path] = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        out_dir.rename(old)
    temporary.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
