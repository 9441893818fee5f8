"""Per-browser-session state, kept out of gr.State: a registry keyed by the session hash.

Each session owns its LiveMerge; parent models loaded for the arena are shared read-only
between sessions (the same folder and dtype load once). A session's entry is dropped when
its browser leaves (Blocks.unload), and with it the merged model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Session:
    live: Optional[object] = None  # merging.LiveMerge
    lock: threading.Lock = field(default_factory=threading.Lock)
    blind_order: Optional[list] = None  # pane labels of the last blind round, until a vote
    workdir: Optional[str] = None  # earlier stages of a multi-stage recipe, the MoE: on disk
    moe: Optional[tuple] = None  # (model, tokenizer, expert names) of the MoE tab
    stop_sweep: bool = False  # set by the Stop button; the running sweep ends after its point
    sweep_rows: list = field(default_factory=list)  # the last sweep's finished points


class SessionRegistry:
    def __init__(self):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_hash: Optional[str]) -> Session:
        key = session_hash or "local"
        with self._lock:
            return self._sessions.setdefault(key, Session())

    def drop(self, session_hash: Optional[str]) -> None:
        """Forget a session: its merged model goes, and so do its stage folders on disk."""
        import shutil

        with self._lock:
            session = self._sessions.pop(session_hash or "local", None)
        if session is not None and session.workdir:
            shutil.rmtree(session.workdir, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._sessions)


class SharedModels:
    """Parent models for the arena, loaded once per (folder, dtype) and never modified."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self._models: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def get(self, folder: str, dtype: torch.dtype, trust_remote_code: bool = False):
        from merging.checkpoint import Checkpoint
        from merging.generation import load_model

        key = (folder, str(dtype), trust_remote_code)
        with self._lock:
            if key not in self._models:
                checkpoint = Checkpoint.open(folder)  # hub ids resolve to their cached snapshot
                if len(self._models) >= self.limit:
                    self._models.pop(next(iter(self._models)))
                self._models[key] = load_model(checkpoint.folder, dtype=dtype, trust_remote_code=trust_remote_code)
            return self._models[key]


SESSIONS = SessionRegistry()
PARENTS = SharedModels()
_HISTORY = None


def history():
    """The app's merge history (one SQLite file, rows keyed by user), opened on first use."""
    global _HISTORY
    if _HISTORY is None:
        from merging.history import History

        _HISTORY = History()
    return _HISTORY
