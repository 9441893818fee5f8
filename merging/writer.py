"""Writing a merged model: streamed safetensors shards, atomically placed folders.

Because the plan knows every output tensor's name, dtype and shape before the first
one is computed, each shard's header is written first and tensors are streamed into
it as they are produced: memory holds the tensors in flight, never a whole shard.
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import FolderNotEmpty, MergeError
from .sources.tensors import TORCH_TO_SAFETENSORS

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
        """Close the open shard after a failure; the failure, not a second one from flushing
        onto a full disk, is what the caller hears about."""
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass


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
        raise FolderNotEmpty(f"output folder '{out_dir}' is not empty; choose another or allow overwriting it")
    parent = out_dir.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as error:
            raise MergeError(f"cannot create the output's parent folder '{parent}' ({error.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise MergeError(f"cannot write to '{parent}'")


def check_free_space(needs: Iterable[tuple[Path, int]]) -> None:
    """Refuse, before any tensor is read, outputs their disks cannot hold. `needs` pairs a
    folder that will be written into with the bytes it will get; folders on one disk add up."""
    from .plan import format_bytes

    by_disk: dict[int, tuple[Path, int]] = {}
    for folder, count in needs:
        place = _nearest_existing(Path(folder).resolve())
        disk = os.stat(place).st_dev
        first_place, total = by_disk.get(disk, (place, 0))
        by_disk[disk] = (first_place, total + count)
    for place, needed in by_disk.values():
        free = shutil.disk_usage(place).free
        if needed > free:
            raise MergeError(f"the output needs {format_bytes(needed)} on the disk of '{place}', which has "
                             f"{format_bytes(free)} free")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


# ---- claiming an output folder ----------------------------------------------------------
# Everything a run keeps beside OUT_DIR is named `.<name>.<kind>-<random>`: while the claim
# on OUT_DIR is held, any such folder there is this run's or a dead run's. So cleanup goes by
# pattern, not by a remembered name: an interruption may land between a folder's creation
# and the assignment of its name.
SIBLING_KINDS = ("partial", "old", "stages")
# The folders this call chain holds, so a multi-stage merge can hold its output across
# stages while the final stage's atomic_folder claims it again (a context, not a global:
# another thread writing to the same folder still collides on the lock).
_held: contextvars.ContextVar[frozenset] = contextvars.ContextVar("mergelab_held_folders", default=frozenset())


def lock_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


@contextmanager
def claim_folder(out_dir: Path, wait: bool = False) -> Iterator[Path]:
    """Hold `out_dir` for this run alone while the block runs, or fail at once with one line
    when another run holds it (`wait`: wait for it instead); on claiming, the leftovers of
    killed runs there are removed. The lock is an flock on `.<name>.lock` beside the folder:
    the kernel drops it when the process dies, however it dies."""
    out_dir = Path(out_dir).resolve()
    held = _held.get()
    if out_dir in held:
        yield out_dir
        return
    descriptor = _lock(out_dir, wait)
    token = _held.set(held | {out_dir})
    try:
        remove_siblings(out_dir)
        yield out_dir
    finally:
        _held.reset(token)
        _unlock(out_dir, descriptor)


def _lock(out_dir: Path, wait: bool = False) -> int:
    path = lock_file(out_dir)
    for _ in range(100):
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise MergeError(f"cannot create the lock file '{path}' ({error.strerror})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MergeError(f"another merge is writing to '{out_dir}' right now") from None
            raise MergeError(f"cannot lock '{path}' ({error.strerror})") from None
        if _is_file_at(path, descriptor):
            return descriptor
        os.close(descriptor)  # its holder removed the file we locked: lock the one there now
    raise MergeError(f"cannot lock '{path}': it keeps being replaced")


def _unlock(out_dir: Path, descriptor: int) -> None:
    path = lock_file(out_dir)
    try:
        # removed while still locked: whoever opened it meanwhile finds it gone and starts over
        if _is_file_at(path, descriptor):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _is_file_at(path: Path, descriptor: int) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def sibling_paths(out_dir: Path, kinds=SIBLING_KINDS) -> list[Path]:
    """The `.<name>.<kind>-<random>` entries beside `out_dir`."""
    out_dir = Path(out_dir).resolve()
    prefix = f".{out_dir.name}."
    # no '.' or '-' after the kind: the siblings of `a.partial-x` (`.a.partial-x.partial-...`) are not `a`'s
    suffix = re.compile(rf"(?:{'|'.join(kinds)})-[0-9a-z_]+")
    return sorted(Path(entry.path) for entry in os.scandir(out_dir.parent)
                  if entry.name.startswith(prefix) and suffix.fullmatch(entry.name[len(prefix):]))


def remove_siblings(out_dir: Path, kinds=SIBLING_KINDS) -> list[str]:
    """Remove the `.<name>.<kind>-*` entries beside `out_dir`; call only while holding its
    claim (then they are this run's or a dead run's). Returns their names."""
    removed = []
    for path in sibling_paths(out_dir, kinds):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
        removed.append(path.name)
    return removed


def make_sibling_folder(out_dir: Path, kind: str) -> Path:
    """A new empty folder `.<name>.<kind>-<random>` beside `out_dir`. os.mkdir's 0o777 lets
    the kernel apply the umask, so other users see what they would see of any new folder."""
    if kind not in SIBLING_KINDS:
        raise ValueError(f"unknown sibling kind {kind}")
    out_dir = Path(out_dir).resolve()
    for _ in range(100):
        folder = out_dir.parent / f".{out_dir.name}.{kind}-{secrets.token_hex(6)}"
        try:
            os.mkdir(folder, 0o777)
            return folder
        except FileExistsError:
            continue
    raise MergeError(f"cannot create a temporary folder beside '{out_dir}'")


@contextmanager
def atomic_folder(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `out_dir`; on success it becomes `out_dir`,
    on failure it disappears. An existing `out_dir` is replaced only after success.
    `out_dir` is claimed throughout (see claim_folder)."""
    out_dir = Path(out_dir).resolve()
    check_output_folder(out_dir, overwrite)
    with claim_folder(out_dir):
        check_output_folder(out_dir, overwrite)  # a run may have finished between the check and the claim
        try:
            temporary = make_sibling_folder(out_dir, "partial")
            yield temporary
            _move_into_place(temporary, out_dir)
        except BaseException:
            _undo(out_dir)
            raise


def build_once(folder: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """A cache folder that several threads or processes may want at once (a GGUF file's derived
    config, the demo models): the first builds it atomically, the others wait for its claim and
    then find it complete."""
    folder = Path(folder).resolve()
    if complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with claim_folder(folder, wait=True):
        if not complete(folder):
            with atomic_folder(folder, overwrite=True) as temporary:  # re-enters the claim
                build(temporary)
    return folder


def _move_into_place(temporary: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = make_sibling_folder(out_dir, "old")
        out_dir.rename(old)  # a folder renamed onto an empty folder replaces it
    temporary.rename(out_dir)
    remove_siblings(out_dir, ("old",))


def _undo(out_dir: Path) -> None:
    """After a failure or an interruption at any step: the user's folder back in place if it
    had been moved aside, and this run's hidden folders gone."""
    moved_aside = sibling_paths(out_dir, ("old",))
    if not out_dir.exists() and moved_aside:
        moved_aside[0].rename(out_dir)
    remove_siblings(out_dir, ("partial", "old"))
