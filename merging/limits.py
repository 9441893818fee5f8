"""Bounds on what one recipe or one request may ask for, checked before any work.

Every limit has a default for a local run and a stricter one for a public deployment
(a Hugging Face Space, or MERGELAB_PUBLIC=1), and the environment variable
MERGELAB_MAX_<NAME> overrides both (sizes accept 64KB, 2GB, ...). A request over a limit
is refused with one line that names the limit, the value asked for, and the variable:

    check("slices", 10_000, "the recipe has 10000 slices")
    # MergeError: the recipe has 10000 slices; the limit is 512 (MERGELAB_MAX_SLICES)

docs/security.md lists them all; `describe()` prints the table it holds.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

from .errors import MergeError

KB, MB, GB = 1000, 1000**2, 1000**3


@dataclass(frozen=True)
class Limit:
    local: int
    public: int
    what: str
    size: bool = False  # a byte count: shown and parsed with units


LIMITS = {
    # recipes (the library: command line and app alike)
    "recipe_bytes": Limit(1 * MB, 64 * KB, "bytes of recipe text", size=True),
    "yaml_nodes": Limit(100_000, 20_000, "YAML nodes in a recipe, aliases counted expanded"),
    "slices": Limit(512, 256, "slices in a recipe"),
    "output_layers": Limit(1024, 256, "layers of the output model"),
    "models": Limit(64, 8, "models named in a recipe"),
    "experts": Limit(128, 4, "experts of a mixture"),
    "history_bytes": Limit(1 * MB, 64 * KB, "bytes of one history row (recipe and scores)", size=True),
    # requests to the app
    "prompt_chars": Limit(100_000, 8_000, "characters of a prompt"),
    "prompt_tokens": Limit(32_768, 2_048, "tokens of a prompt"),
    "new_tokens": Limit(4_096, 256, "tokens generated for one answer"),
    "score_lines": Limit(10_000, 200, "texts (lines) to score in a sweep"),
    "score_bytes": Limit(10 * MB, 256 * KB, "bytes of texts to score in a sweep", size=True),
    "sweep_points": Limit(101, 21, "points of a sweep"),
    "probes": Limit(30, 30, "probes per skill in a sweep or a search"),
    "search_evaluations": Limit(1000, 40, "evaluations of one search"),
    "search_dimensions": Limit(256, 16, "dimensions of one search (a gradient of K points counts K)"),
    "output_bytes": Limit(10_000 * GB, 16 * GB, "bytes one merge or MoE build may write to disk", size=True),
    "upload_bytes": Limit(100 * MB, 1 * MB, "bytes of one uploaded file", size=True),
    # the server's lifecycle
    "sessions": Limit(64, 16, "visitor sessions held at once"),
    "session_idle_seconds": Limit(24 * 3600, 15 * 60, "seconds a session may stay idle before it is freed"),
    "heavy_workers": Limit(1, 1, "heavy jobs (merge, save, publish, MoE build, sweep) run at once"),
}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
UNITS = {"": 1, "k": KB, "m": MB, "g": GB, "t": 1000 * GB, "ki": 1024, "mi": 1024**2, "gi": 1024**3,
         "ti": 1024**4}


def is_public_deployment() -> bool:
    """A Hugging Face Space, or a server whose operator says it is public."""
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("MERGELAB_PUBLIC", "") == "1"


def env_name(name: str) -> str:
    return f"MERGELAB_MAX_{name.upper()}"


def parse_size(text: str) -> int:
    """'64KB', '2GB', '1GiB' or a plain count."""
    match = SIZE.match(str(text))
    if not match:
        raise MergeError(f"'{text}' is not a number or a size like 64KB or 2GB")
    unit = match[2].lower().rstrip("b")
    if unit not in UNITS:
        raise MergeError(f"'{text}' has an unknown unit")
    return int(float(match[1]) * UNITS[unit])


def limit(name: str) -> int:
    """The limit in force: MERGELAB_MAX_<NAME> if set, else the public or local default."""
    spec = LIMITS[name]
    override = os.environ.get(env_name(name))
    if override:
        return parse_size(override)
    return spec.public if is_public_deployment() else spec.local


def format_value(name: str, value: int) -> str:
    if not LIMITS[name].size:
        return str(value)
    from .plan import format_bytes

    return format_bytes(value)


def check(name: str, value: int, said: str) -> None:
    """Refuse `value` when it is over the limit; `said` describes it ("the recipe has 9
    models"), the error adds the limit and how to change it."""
    bound = limit(name)
    if value > bound:
        raise MergeError(f"{said}; the limit is {format_value(name, bound)} ({env_name(name)})")


def finite_number(value, label: str) -> float:
    """A number from a request (an API call may send anything: text, lists, NaN, 1e999)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MergeError(f"{label} must be a number, got {str(value)[:40]!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise MergeError(f"{label} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise MergeError(f"{label} must be a finite number, got {value!r}")
    return number


def whole_number(value, label: str, minimum: Optional[int] = None) -> int:
    """A whole number from a request, at least `minimum`."""
    number = finite_number(value, label)
    if number != int(number):
        raise MergeError(f"{label} must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise MergeError(f"{label} must be at least {minimum}, got {int(number)}")
    return int(number)


def clamp_check(name: str, value, label: str, minimum: int = 0) -> int:
    """A whole number from a request, within [minimum, the limit `name`]."""
    number = whole_number(value, label, minimum)
    check(name, number, f"{label} is {number}")
    return number


def machine_memory_bytes() -> Optional[int]:
    """Physical memory of this machine (or the container's cgroup limit when lower)."""
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
    return total


def memory_budget() -> int:
    """Bytes the server may hold in models for all visitors together (merged models, arena
    parents, mixtures): MERGELAB_MEMORY_BUDGET, else 60% of the machine's memory (the rest
    is Python, torch, the page cache of mapped weights and the work in flight)."""
    override = os.environ.get("MERGELAB_MEMORY_BUDGET")
    if override:
        return parse_size(override)
    total = machine_memory_bytes() or 8 * GB
    return int(total * 0.6)


def describe() -> str:
    """The limits as a Markdown table (docs/security.md holds it)."""
    rows = ["| limit | local default | public default | variable |", "|---|---|---|---|"]
    for name, spec in LIMITS.items():
        rows.append(f"| {spec.what} | {format_value(name, spec.local)} | {format_value(name, spec.public)} | "
                    f"`{env_name(name)}` |")
    rows.append("| bytes of models held for all visitors | 60% of memory | 60% of memory | "
                "`MERGELAB_MEMORY_BUDGET` |")
    return "\n".join(rows)

