"""The base of every model source: `TensorInfo`, safetensors headers, and `Checkpoint`, a
model's config and tensors read lazily from its safetensors files.

Safetensors files are memory-mapped and read one tensor at a time; the pages of a
tensor are handed back to the kernel once it has been used, so resident memory stays
at the tensors in flight, not the model.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..architecture import Layout, layout_of
from ..errors import MergeError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and byte range, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Optional[Path] = None
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check every
    entry against the file before anything is read: a shape is believed only when the
    bytes behind it are there, so a hostile header costs no memory."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a {length}-byte header is larger than safetensors allows")
            if length > file_size - 8:
                raise ValueError(f"its {length}-byte header runs past the end of the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise MergeError(f"'{path}' is not a readable safetensors file ({reason})") from None
    if not isinstance(header, dict):
        raise MergeError(f"'{path}' is not a safetensors file: its header is not a JSON object")
    data_start, data_size = 8 + length, file_size - 8 - length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise MergeError(f"'{path}' has a __metadata__ that is not a mapping of strings")
            continue
        start, end, dtype, shape = _checked_entry(path, name, entry, data_size)
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + start, data_start + end)
    _check_no_overlap(path, infos)
    return infos


def _checked_entry(path: Path, name: str, entry, data_size: int):
    """One header entry's byte range, dtype and shape, each checked, or one MergeError line."""
    where = f"tensor {_quoted(name)} in '{path}'"
    if not isinstance(entry, dict):
        raise MergeError(f"{where} is described by a JSON {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise MergeError(f"{where} has no '{key}' in the header")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise MergeError(f"{where} has unsupported dtype {_quoted(entry['dtype'])}")
    shape = entry["shape"]
    if not (isinstance(shape, list) and all(type(size) is int and size >= 0 for size in shape)):
        raise MergeError(f"{where} has shape {_quoted(shape)}, not a list of non-negative integers")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise MergeError(f"{where} has data_offsets {_quoted(offsets)}, not two integers 0 <= start <= end")
    start, end = offsets
    count = 1
    for size in shape:  # Python integers: a [1e9, 1e9] claim is just a large number, not an allocation
        count *= size
    nbytes = count * dtype.itemsize
    if end - start != nbytes:
        raise MergeError(f"{where} claims shape {_quoted(shape)} of {entry['dtype']} ({nbytes} bytes) "
                         f"over {end - start} bytes")
    if end > data_size:
        raise MergeError(f"'{path}' is truncated: tensor {_quoted(name)} ends past the end of the file")
    return start, end, dtype, tuple(shape)


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes would alias each other's weights."""
    spans = sorted((info.start, info.end, name) for name, info in infos.items() if info.end > info.start)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise MergeError(f"tensors {_quoted(first)} and {_quoted(second)} in '{path}' overlap")


def _quoted(value, limit: int = 80) -> str:
    """A header value for a one-line message: quoted, escaped, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Checkpoint:
    """A model's config and tensors, read lazily from its safetensors files.

    `merging.sources.open_model(reference)` opens one from a local folder, a hub id
    `org/name[@revision]`, a .bin folder, a GGUF file or a LoRA adapter.
    """

    def __init__(self, reference: str, folder: Optional[Path], config: dict,
                 tensors: dict[str, TensorInfo]):
        self.reference = reference
        self.folder = folder
        self.config = config
        self.tensors = tensors
        self._maps: dict[Path, mmap.mmap] = {}
        self._files: dict[Path, object] = {}
        self.warnings: list[str] = []  # what a merge of this model should say (quantization, ...)
        self.memo: dict = {}  # what is learned once from this model's files (its tokenizer's digest)

    # ---- reading ------------------------------------------------------------------
    @property
    def has_weights(self) -> bool:
        """False for a hub model known only by its headers (weights not downloaded yet)."""
        return all(info.file is not None for info in self.tensors.values())

    def fetched(self) -> "Checkpoint":
        """This model with its weights on disk: itself here; a hub model checked by its
        headers (merging.sources.hub.HubHeaders) and what wraps one download them now."""
        return self

    def has(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (a view on the mapped file: copy before changing it)."""
        info = self.tensors[name]
        if info.file is None:
            raise MergeError(f"model '{self.reference}' has no weights on disk yet")
        mapped = self._map(info.file)
        if info.end == info.start:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=info.end - info.start, offset=info.start)
        return flat.view(info.dtype).reshape(info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read the tensor's pages ahead of use."""
        self._advise(name, "MADV_WILLNEED")

    def release(self, name: str, first_byte: int = 0, end_byte: Optional[int] = None) -> None:
        """Drop the tensor's pages (or those of a byte range of it) from this process's
        memory; they stay in the page cache, and are read back if touched again."""
        self._advise(name, "MADV_DONTNEED", first_byte, end_byte)

    def _advise(self, name: str, advice: str, first_byte: int = 0, end_byte: Optional[int] = None) -> None:
        info = self.tensors.get(name)
        if info is None or info.file is None or info.end == info.start:
            return
        mapped = self._map(info.file)
        page = mmap.PAGESIZE
        start = ((info.start + first_byte) // page) * page
        end = info.end if end_byte is None else min(info.end, info.start + end_byte)
        if end <= start:
            return
        try:
            mapped.madvise(getattr(mmap, advice), start, end - start)
        except (OSError, ValueError, AttributeError):
            pass  # advice only: platforms without madvise still merge correctly

    def _map(self, file: Path) -> mmap.mmap:
        mapped = self._maps.get(file)
        if mapped is None:
            handle = open(file, "rb")
            # ACCESS_COPY gives a writable (private, never written) mapping torch accepts.
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._files[file] = handle
            self._maps[file] = mapped
        return mapped

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._maps.clear()  # the maps close when the last tensor viewing them is gone

    # ---- facts --------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """What its tensors are: stacks, embeddings, head (merging.architecture)."""
        return layout_of(self)

    @property
    def num_layers(self) -> int:
        """Layers of the text decoder."""
        return self.layout.depth()

    def layer_tensors(self, index: int) -> list[str]:
        """Names of text layer `index`'s tensors, in stored order."""
        return self.layout.layer_tensors(index)

    def __repr__(self) -> str:
        return f"Checkpoint({self.reference!r}, {len(self.tensors)} tensors)"


def shard_files(index: Path, reference: str) -> list[Path]:
    """The shards a checkpoint index (`*.index.json`) names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError):
        raise MergeError(f"'{index}' is not a valid checkpoint index") from None
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MergeError(f"model '{reference}' is missing shard {missing[0]} named in its index")
    return files


def read_config(folder: Path, reference: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MergeError(f"model '{reference}' has no config.json in '{folder}'")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise MergeError(f"config.json of model '{reference}' is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise MergeError(f"config.json of model '{reference}' is not a JSON object")
    return config
