"""Per-visitor state, kept out of gr.State: one registry, one lock, keyed by the browser session.

A session holds its merged model, its mixture of experts, its sweep's points and a folder
on disk (earlier stages of a multi-stage recipe, the MoE, the sweep's CSV). Sessions end:
when the browser leaves (Blocks.unload), when idle longer than MERGELAB_MAX_SESSION_IDLE_SECONDS
(the reaper thread frees them; a client that never sends a heartbeat is freed this way),
and, when the server holds its most sessions or its memory budget is spent, the oldest idle
one makes room. A session in use by a running handler is never freed under it.

Models count against one server-wide budget (MERGELAB_MEMORY_BUDGET): merged models, MoEs,
sweep models and the arena's parent models, which are shared read-only between sessions and
freed when no one has asked them anything for the idle time.

Session folders live under <tmp>/mergelab-sessions/<instance>/, one instance per server process,
held by an flock: a server that starts removes the folders of instances whose process is gone.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from merging.errors import MergeError
from merging.limits import limit, memory_budget
from merging.plan import format_bytes

WRITE_WAIT_SECONDS = 120  # a merge waits this long for answers being generated from the old weights


class ReadWriteLock:
    """Many readers (answers generated from the merged model) or one writer (a merge that
    rewrites its weights in place). Writers waiting keep new readers out, so a merge is not
    starved by a stream of questions. Not tied to threads: a generator handler may take it in
    one worker thread and release it in another."""

    def __init__(self):
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def write(self, timeout: float = WRITE_WAIT_SECONDS) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                free = self._condition.wait_for(lambda: not self._writer and not self._readers, timeout)
            finally:
                self._writers_waiting -= 1
            if not free:
                self._condition.notify_all()
                raise MergeError("the merged model is still answering; merge again when the answer is done")
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


@dataclass
class Session:
    key: str
    folder: Path  # made on first use, removed with the session
    live: Optional[object] = None  # merging.LiveMerge
    moe: Optional[tuple] = None  # (model, tokenizer, expert names) of the MoE tab
    blind_order: Optional[list] = None  # pane labels of the last blind round, until a vote
    sweep_rows: list = field(default_factory=list)  # the last sweep's finished points
    stop_sweep: threading.Event = field(default_factory=threading.Event)  # the Stop button
    search_result: Optional[object] = None  # the last search's evaluations (merging.search.SearchResult)
    stop_search: threading.Event = field(default_factory=threading.Event)  # the search's Stop button
    lock: ReadWriteLock = field(default_factory=ReadWriteLock)
    held: dict = field(default_factory=dict)  # bytes of models held, by what ("live", "moe", "sweep")
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0  # handlers running for it now
    ended: bool = False  # the browser left while a handler ran: freed when it returns

    def workdir(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def free_models(self) -> None:
        self.live = self.moe = self.search_result = None
        self.sweep_rows = []
        self.held.clear()


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


class SessionRegistry:
    """The one owner of every session; `use(hash)` is how a handler gets its session."""

    def __init__(self, root: Optional[Path] = None):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.parents = SharedModels(self)
        self._root = Path(root) if root else None
        self._instance: Optional[Path] = None
        self._instance_lock = None
        self._reaper: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    # ---- folders -----------------------------------------------------------------
    @property
    def root(self) -> Path:
        """Session folders hold scratch only (stage outputs, the MoE, the sweep's CSV): under the
        temporary folder, where Gradio also takes the files a handler returns."""
        return self._root or Path(os.environ.get("MERGELAB_SESSIONS") or Path(tempfile.gettempdir()) / "mergelab-sessions")

    def instance_folder(self) -> Path:
        """This process's folder of session folders, locked while the process lives."""
        with self._lock:
            if self._instance is None:
                self.root.mkdir(parents=True, exist_ok=True)
                folder = self.root / f"{os.getpid()}-{secrets.token_hex(4)}"
                folder.mkdir()
                handle = open(folder / ".lock", "w")
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._instance, self._instance_lock = folder, handle
            return self._instance

    def folder_for(self, session_hash: Optional[str]) -> Path:
        """A session's folder, named by a digest: the hash a client sends never becomes a path."""
        digest = hashlib.sha256((session_hash or "local").encode()).hexdigest()[:24]
        return self.instance_folder() / digest

    def sweep_stale_folders(self) -> list[Path]:
        """Remove the session folders of server processes that are gone (their lock is free)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for folder in self.root.iterdir():
            if folder == self._instance or not folder.is_dir():
                continue
            try:
                with open(folder / ".lock", "a") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live server's
            except OSError:
                pass  # no lock file: a half-made folder
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        return removed

    # ---- sessions ----------------------------------------------------------------
    @contextmanager
    def use(self, session_hash: Optional[str]) -> Iterator[Session]:
        """The visitor's session (made if new, room made if the server is full), marked in use
        until the block ends."""
        key = session_hash or "local"
        folder = self.folder_for(key)
        with self._lock:
            session = self._sessions.get(key)
            evicted = []
            if session is None:
                evicted = self._make_room(limit("sessions") - 1)
                session = self._sessions[key] = Session(key, folder)
            session.users += 1
            session.ended = False
        for old in evicted:
            self._free(old)
        session.workdir()  # every session has its folder while it lives (its files, and a sign it is there)
        try:
            yield session
        finally:
            with self._lock:
                session.users -= 1
                session.last_used = time.monotonic()
                finished = session.ended and session.users == 0
                if finished:
                    self._sessions.pop(key, None)
            if finished:
                self._free(session)

    @contextmanager
    def reading(self, session_hash: Optional[str], what: str, missing: str) -> Iterator[Session]:
        """The visitor's session, in use and read-locked, when it holds `what` ("live": its
        merged model, "moe": its mixture); else `missing` is the error, and no session is made
        for a visitor who has built nothing."""
        known = self.peek(session_hash)
        if known is None or getattr(known, what) is None:
            raise MergeError(missing)
        with self.use(session_hash) as session, session.lock.read():
            if getattr(session, what) is None:  # freed or rebuilt in between
                raise MergeError(missing)
            yield session

    def peek(self, session_hash: Optional[str]) -> Optional[Session]:
        """The session if it exists; never makes one."""
        with self._lock:
            return self._sessions.get(session_hash or "local")

    def drop(self, session_hash: Optional[str]) -> None:
        """The browser left: free the session now, or when its running handler returns."""
        key = session_hash or "local"
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return
            session.stop_sweep.set()
            if session.users:
                session.ended = True
                return
            self._sessions.pop(key)
        self._free(session)

    def expire_idle(self, idle_seconds: Optional[float] = None) -> int:
        """Free sessions idle longer than the limit, and parent models no one asked of late."""
        idle = limit("session_idle_seconds") if idle_seconds is None else idle_seconds
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._sessions.values() if not s.users and now - s.last_used > idle]
            for session in stale:
                self._sessions.pop(session.key)
        for session in stale:
            self._free(session)
        if self.parents.expire(idle):
            release_freed_memory()
        return len(stale)

    def _make_room(self, keep: int) -> list[Session]:
        """With the registry's lock held: take out the oldest idle sessions until at most `keep`
        remain (the caller frees them after the lock), or refuse the newcomer when every
        session is busy."""
        taken = []
        while len(self._sessions) > keep:
            idle = [s for s in self._sessions.values() if not s.users]
            if not idle:
                raise MergeError(f"the server is full ({len(self._sessions)} visitors are working); "
                                 "try again in a few minutes")
            oldest = min(idle, key=lambda s: s.last_used)
            taken.append(self._sessions.pop(oldest.key))
        return taken

    def _free(self, session: Session) -> None:
        session.free_models()
        shutil.rmtree(session.folder, ignore_errors=True)
        release_freed_memory()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ---- memory ------------------------------------------------------------------
    def held_bytes(self, leaving_out: Optional[tuple[Session, str]] = None) -> int:
        with self._lock:
            total = sum(n for s in self._sessions.values() for what, n in s.held.items()
                        if leaving_out is None or (s, what) != leaving_out)
        return total + self.parents.held_bytes()

    def reserve(self, session: Session, what: str, nbytes: int) -> None:
        """Account `nbytes` for the session's `what` (replacing what it held for it), after
        making sure it fits the server's budget: idle sessions make room, oldest first;
        else the request is refused with what it needs and what is free."""
        budget = memory_budget()
        while True:
            held = self.held_bytes(leaving_out=(session, what))
            if held + nbytes <= budget:
                break
            if not self._free_one_idle(besides=session) and not self.parents.evict_one():
                raise MergeError(f"this needs {format_bytes(nbytes)} of memory; {format_bytes(max(0, budget - held))} "
                                 f"of the server's {format_bytes(budget)} budget is free (MERGELAB_MEMORY_BUDGET)")
        with self._lock:
            session.held[what] = nbytes

    def release(self, session: Session, what: str) -> None:
        with self._lock:
            session.held.pop(what, None)

    def _free_one_idle(self, besides: Session) -> bool:
        with self._lock:
            idle = [s for s in self._sessions.values() if not s.users and s is not besides and s.held]
            if not idle:
                return False
            oldest = min(idle, key=lambda s: s.last_used)
            self._sessions.pop(oldest.key)
        self._free(oldest)
        return True

    # ---- the reaper --------------------------------------------------------------
    def start_reaper(self) -> None:
        """One thread, owned here, that frees idle sessions until stop_reaper(); it looks
        every quarter of the idle limit (at most every 30 s)."""
        if self._reaper is not None:
            return

        def run():
            while not self._stopping.wait(min(30.0, max(1.0, limit("session_idle_seconds") / 4))):
                self.expire_idle()

        self._reaper = threading.Thread(target=run, name="mergelab-session-reaper", daemon=True)
        self._reaper.start()

    def stop_reaper(self) -> None:
        self._stopping.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None


@dataclass
class _Parent:
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: Optional[tuple] = None  # (model, tokenizer)
    nbytes: int = 0
    last_used: float = field(default_factory=time.monotonic)


class SharedModels:
    """Parent models for the arena, loaded once per (folder, dtype) and never modified.

    A load holds only its own model's lock, so one slow load stalls no one else."""

    def __init__(self, registry: SessionRegistry, most: int = 4):
        self.registry = registry
        self.most = most
        self._models: dict[tuple, _Parent] = {}
        self._lock = threading.Lock()

    def get(self, reference: str, dtype: torch.dtype, trust_remote_code: bool = False):
        from merging.sources import open_model
        from merging.generation import load_model
        from merging.placement import server_max_memory

        key = (reference, str(dtype), trust_remote_code)
        with self._lock:
            entry = self._models.setdefault(key, _Parent())
            entry.last_used = time.monotonic()
        with entry.lock:
            if entry.loaded is None:
                checkpoint = open_model(reference)  # hub ids resolve to their snapshot, with the visitor's access
                estimate = sum(info.numel for info in checkpoint.tensors.values()) * dtype.itemsize
                self._make_room(estimate, keep=key)
                try:
                    model, tokenizer = load_model(checkpoint.folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                  max_memory=server_max_memory(),
                                                  offload_folder=self.registry.instance_folder() / "offload")
                except BaseException:
                    with self._lock:
                        self._models.pop(key, None)
                    raise
                entry.loaded, entry.nbytes = (model, tokenizer), model_bytes(model)
            return entry.loaded

    def _make_room(self, nbytes: int, keep: tuple) -> None:
        budget = memory_budget()
        while len(self._loaded()) >= self.most or self.registry.held_bytes() + nbytes > budget:
            if not self.evict_one(besides=keep):
                if self.registry._free_one_idle(besides=None):
                    continue
                held = self.registry.held_bytes()
                raise MergeError(f"the arena's parent model needs {format_bytes(nbytes)} of memory; "
                                 f"{format_bytes(max(0, budget - held))} of the server's {format_bytes(budget)} "
                                 "budget is free (MERGELAB_MEMORY_BUDGET)")

    def _loaded(self) -> list:
        with self._lock:
            return [k for k, e in self._models.items() if e.loaded is not None]

    def evict_one(self, besides: Optional[tuple] = None) -> bool:
        """Forget the least recently asked loaded parent (a generation still using it keeps it
        alive until it ends)."""
        with self._lock:
            loaded = [(e.last_used, k) for k, e in self._models.items() if e.loaded is not None and k != besides]
            if not loaded:
                return False
            self._models.pop(min(loaded)[1])
        return True

    def expire(self, idle_seconds: float) -> int:
        """Forget the parents no one has asked for `idle_seconds`; how many went."""
        now = time.monotonic()
        with self._lock:
            idle = [k for k, e in self._models.items() if e.loaded is not None and now - e.last_used > idle_seconds]
            for key in idle:
                self._models.pop(key)
        return len(idle)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._models.values())


def release_freed_memory() -> None:
    """Hand memory freed by dropped models back to the system (glibc keeps freed heap pages)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


SESSIONS = SessionRegistry()
PARENTS = SESSIONS.parents
_HISTORY = None
_HISTORY_LOCK = threading.Lock()


def history():
    """The app's merge history (one SQLite file, rows keyed by user), opened on first use."""
    global _HISTORY
    with _HISTORY_LOCK:
        if _HISTORY is None:
            from merging.history import History

            _HISTORY = History()
        return _HISTORY
