"""Merge history: every merge's recipe, time and scores, in a local SQLite database.

    history = History()                                  # ~/.cache/mergelab/history.sqlite
    entry = history.record("local", recipe_yaml, kind="merge")
    history.add_scores(entry, "local", {"ppl_a": 12.3})
    history.entries("local")                             # newest first
    history.get(entry, "local").recipe                    # exactly the recipe recorded

Rows are keyed by user: every read and write names its user, and a user sees only their
own rows (on a shared deployment the app passes the signed-in name or the browser
session). SQLite with WAL journaling takes concurrent writers from the app's threads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .errors import MergeError
from .limits import check as check_limit

SCHEMA = """
CREATE TABLE IF NOT EXISTS merges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    recipe TEXT NOT NULL,
    summary TEXT NOT NULL,
    scores TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS merges_by_user ON merges (user, id);
"""


@dataclass
class Entry:
    id: int
    user: str
    created: float
    kind: str  # "merge", "moe" or "sweep point"
    recipe: str
    summary: str
    scores: dict = field(default_factory=dict)

    @property
    def time_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))


def default_path() -> Path:
    from .folder import cache_root

    return cache_root() / "history.sqlite"


def summarize(recipe: str) -> str:
    """One line: method and models (short names), from the recipe text."""
    from .config import recipe_from_text

    try:
        config = recipe_from_text(recipe)
    except MergeError:
        return "(unreadable recipe)"
    stages = getattr(config, "stages", [config])
    names = {s.name for s in stages if getattr(s, "name", None)}
    models = [m for s in stages for m in s.referenced_models() if m not in names]
    short = [Path(m.rstrip("/")).name or m for m in dict.fromkeys(models)]
    method = "moe" if hasattr(config, "experts") else config.final.merge_method if len(stages) > 1 \
        else config.merge_method
    suffix = f" ({len(stages)} stages)" if len(stages) > 1 else ""
    return f"{method}: {', '.join(short)}{suffix}"


class History:
    def __init__(self, path: Optional[Union[str, Path]] = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection, connection:
            connection.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=10)
        connection.execute("PRAGMA journal_mode=WAL")
        return connection

    def record(self, user: str, recipe: str, kind: str = "merge", scores: Optional[dict] = None) -> int:
        """Store a merge; returns its id. A row is bounded in size (MERGELAB_MAX_HISTORY_BYTES)."""
        scores_text = json.dumps(scores or {})
        size = len(recipe.encode()) + len(scores_text.encode())
        check_limit("history_bytes", size, f"this history entry is {size} bytes")
        with closing(self._connect()) as connection, connection:
            cursor = connection.execute(
                "INSERT INTO merges (user, created, kind, recipe, summary, scores) VALUES (?, ?, ?, ?, ?, ?)",
                (user, time.time(), kind, recipe, summarize(recipe), scores_text))
            return int(cursor.lastrowid)

    def add_scores(self, entry_id: int, user: str, scores: dict) -> None:
        """Merge `scores` into the entry's (a user can score only their own entries)."""
        entry = self.get(entry_id, user)
        merged = json.dumps({**entry.scores, **scores})
        size = len(entry.recipe.encode()) + len(merged.encode())
        check_limit("history_bytes", size, f"this history entry would be {size} bytes")
        with closing(self._connect()) as connection, connection:
            connection.execute("UPDATE merges SET scores = ? WHERE id = ? AND user = ?",
                               (merged, entry_id, user))

    def get(self, entry_id: int, user: str) -> Entry:
        if not 0 < int(entry_id) < 2**63:
            raise MergeError(f"no merge #{entry_id} in your history")
        with closing(self._connect()) as connection:
            row = connection.execute("SELECT id, user, created, kind, recipe, summary, scores FROM merges "
                                     "WHERE id = ? AND user = ?", (int(entry_id), user)).fetchone()
        if row is None:  # another user's entry is reported as missing, not as forbidden
            raise MergeError(f"no merge #{entry_id} in your history")
        return _entry(row)

    def entries(self, user: str, limit: int = 200) -> list[Entry]:
        """The user's entries, newest first."""
        with closing(self._connect()) as connection:
            rows = connection.execute("SELECT id, user, created, kind, recipe, summary, scores FROM merges "
                                      "WHERE user = ? ORDER BY id DESC LIMIT ?", (user, limit)).fetchall()
        return [_entry(row) for row in rows]

    def find(self, user: str, recipe: str) -> Optional[Entry]:
        """The user's newest entry with exactly this recipe."""
        with closing(self._connect()) as connection:
            row = connection.execute("SELECT id, user, created, kind, recipe, summary, scores FROM merges "
                                     "WHERE user = ? AND recipe = ? ORDER BY id DESC LIMIT 1",
                                     (user, recipe)).fetchone()
        return _entry(row) if row else None

    def delete(self, entry_id: int, user: str) -> None:
        self.get(entry_id, user)
        with closing(self._connect()) as connection, connection:
            connection.execute("DELETE FROM merges WHERE id = ? AND user = ?", (int(entry_id), user))


def _entry(row) -> Entry:
    return Entry(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]))
