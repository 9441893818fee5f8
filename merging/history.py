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


SUMMARY_CHARS = 240  # a summary is a table cell: long recipes end in "..."


def short_model(name: str) -> str:
    """A model's short name: the last part of its path or hub id."""
    return Path(str(name).rstrip("/")).name or str(name)


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _gradient(values: list) -> str:
    """A per-layer gradient, short: every point up to four, else its ends and count."""
    if len(values) <= 4:
        return "[" + ", ".join(_number(v) for v in values) + "]"
    return f"[{_number(values[0])} .. {_number(values[-1])}, {len(values)} points]"


def _value(value) -> str:
    """A parameter's value in a few characters: a number, a gradient, or filters with
    their values (`self_attn [0, 1], mlp [1, 0], else 0.5`)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        parts = []
        for rule in value:
            shown = _value(rule.get("value"))
            parts.append(f"{rule['filter']} {shown}" if rule.get("filter") else f"else {shown}")
        return ", ".join(parts)
    if isinstance(value, list):
        return _gradient(value)
    return _number(value)


def _parameters(parameters: Optional[dict]) -> str:
    return " ".join(f"{name}={_value(value)}" for name, value in (parameters or {}).items())


def _stage_summary(stage, stage_names: set) -> str:
    """`method params: model (its params), ...` for one merge."""
    models = []
    entries = {entry.model: entry.parameters for entry in stage.model_entries()}
    for name in stage.referenced_models():
        if name in stage_names:
            label = f"[{name}]"
        else:
            label = short_model(name)
        own = _parameters(entries.get(name))
        models.append(f"{label} ({own})" if own else label)
    head = stage.merge_method + (f" {_parameters(stage.parameters)}" if stage.parameters else "")
    slices = len(stage.output_slices())
    suffix = f", {slices} slices" if slices else ""
    return f"{head}: {', '.join(models)}{suffix}"


def summarize(recipe: str) -> str:
    """One line that tells merges apart: method and its key parameters (numbers, per-layer
    gradients shortened, filters), each model by short name with its own parameters."""
    from .config import recipe_from_text

    try:
        config = recipe_from_text(recipe)
    except MergeError:
        return "(unreadable recipe)"
    if hasattr(config, "experts"):
        experts = ", ".join(short_model(e.source_model) for e in config.experts)
        text = (f"moe {config.gate_mode} {config.experts_per_token} per token: {short_model(config.base_model)}, {experts}")
    else:
        stages = getattr(config, "stages", [config])
        names = {s.name for s in stages if getattr(s, "name", None)}
        text = " | ".join(_stage_summary(stage, names) for stage in stages)
        if len(stages) > 1:
            text += f" ({len(stages)} stages)"
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 3] + "..."


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
