"""What the hostile-client tests need: a public server to attack, a visitor that speaks the
queue protocol by hand (no gradio_client, no heartbeat), and the measurements that say an
attack did no harm (checksums of a canary tree, the server's memory and threads)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from visitors import Server, start_app  # noqa: E402


# ---- the server -----------------------------------------------------------------------
@dataclass
class PublicServer(Server):
    """A public app.py to attack: its session folders under its own TMPDIR, its threads'
    Python stacks on demand."""

    @property
    def tmpdir(self) -> Path:
        return self.log_path.parent / "tmp"

    @property
    def sessions_root(self) -> Path:
        return self.tmpdir / "mergelab-sessions"

    def instance_folder(self) -> Path:
        """This server's one folder of session folders (named <pid>-<random>)."""
        folders = [f for f in self.sessions_root.iterdir() if f.is_dir() and f.name.startswith(f"{self.pid}-")]
        assert len(folders) == 1, folders
        return folders[0]

    def session_folder(self, session_hash: str) -> Path:
        """Where the server keeps a session's files: a digest of its hash, never the hash."""
        return self.instance_folder() / hashlib.sha256(session_hash.encode()).hexdigest()[:24]

    def session_folders(self) -> list[Path]:
        return sorted(p for p in self.instance_folder().iterdir() if p.is_dir())

    def rss_mb(self) -> float:
        return self.rss_bytes() / 2**20

    def python_stacks(self) -> list[str]:
        """Every thread's Python stack now (the server prints them on SIGUSR1), one text each."""
        offset = self.log_path.stat().st_size
        os.kill(self.pid, signal.SIGUSR1)

        def dump() -> str:
            with open(self.log_path, errors="replace") as handle:
                handle.seek(offset)
                text = handle.read()
            main = text.find("Current thread")  # the main thread comes last; its stack ends in app.py
            return text if main >= 0 and "in <module>" in text[main:] else ""

        deadline = time.time() + 10
        while not dump() and time.time() < deadline:
            time.sleep(0.1)
        text = dump()
        text = text[min(i for i in (text.find("Thread 0x"), text.find("Current thread")) if i >= 0):]
        return [block for block in text.split("\n\n") if block.strip()]

    def busy_threads(self) -> list[str]:
        """Stacks of threads inside MergeLab's code (merging/, ui/) other than the session
        reaper's wait: once every request has ended, there should be none."""
        def ours(line: str) -> bool:
            return "/merging/" in line or ("/ui/" in line and "ui/session.py" not in line)
        return [stack for stack in self.python_stacks() if any(ours(line) for line in stack.splitlines())]


def start_public_server(cache: Path, workdir: Path, env: Optional[dict] = None, **limits) -> PublicServer:
    """`python app.py` as a public Space runs it (MERGELAB_PUBLIC=1, hub offline), on the demo
    cache, with its own TMPDIR (its session folders are ours to watch) and any MERGELAB_*
    settings given (sessions=3 sets MERGELAB_MAX_SESSIONS=3; memory_budget sets
    MERGELAB_MEMORY_BUDGET); `env` adds or replaces variables (a fake hub's HF_ENDPOINT, say).
    HOME stays the user's: `~` in an attack means the real one. No HF_TOKEN: a Space's owner
    token must not matter. Not waited for."""
    workdir.mkdir(parents=True, exist_ok=True)
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(exist_ok=True)
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("MERGELAB_", "GRADIO_", "SPACE_", "HF_TOKEN"))}
    settings = {"MERGELAB_PUBLIC": "1", "TMPDIR": str(tmpdir), **(env or {})}
    for name, value in limits.items():
        key = "MERGELAB_MEMORY_BUDGET" if name == "memory_budget" else f"MERGELAB_MAX_{name.upper()}"
        settings[key] = str(value)
    # a hook, not a change to the app: SIGUSR1 makes the server print every thread's Python stack
    # (Python 3.11 gives threads no OS names, so /proc cannot say which thread is whose)
    hooks = workdir / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text("import faulthandler, signal\n"
                                            "faulthandler.register(signal.SIGUSR1, all_threads=True)\n")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), environment.get("PYTHONPATH")]))
    return start_app(cache, settings, log=workdir / "app.log", server_class=PublicServer, base_env=environment)


def http(method: str, url: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
         timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one request; an HTTP error status is an answer, not an exception."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_file(server_url: str, path: str) -> tuple[int, bytes]:
    """GET /gradio_api/file=<path> with the path sent as it is (no quoting of ../ or %2F)."""
    return http("GET", server_url.rstrip("/") + "/gradio_api/file=" + path)


def upload(server_url: str, name: str, content: bytes) -> tuple[int, bytes]:
    """POST /gradio_api/upload with one file, multipart as a browser sends it."""
    boundary = "----hostile" + secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return http("POST", server_url.rstrip("/") + "/gradio_api/upload", body,
                {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)


class RawVisitor:
    """A visitor that speaks the queue protocol by hand: POST /gradio_api/queue/join, then
    read /gradio_api/queue/data as server-sent events. It never opens the heartbeat, so the
    server cannot tell when it leaves: only the idle limit frees its session."""

    def __init__(self, server_url: str, session_hash: Optional[str] = None):
        self.url = server_url.rstrip("/")
        self.session_hash = session_hash or secrets.token_hex(6)
        with urllib.request.urlopen(self.url + "/config", timeout=30) as response:
            config = json.load(response)
        self.fn_index = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}

    def another(self) -> "RawVisitor":
        """A new visitor (its own session hash) that knows the same endpoints."""
        visitor = object.__new__(RawVisitor)
        visitor.url, visitor.fn_index, visitor.session_hash = self.url, self.fn_index, secrets.token_hex(6)
        return visitor

    def join(self, api_name: str, data: list, raw_body: Optional[bytes] = None) -> tuple[int, dict]:
        """Put one event in the queue; (status, answer). `raw_body` sends bytes as they are
        (JSON with NaN, say)."""
        body = raw_body if raw_body is not None else json.dumps(self.payload(api_name, data)).encode()
        status, answer = http("POST", self.url + "/gradio_api/queue/join", body,
                              {"Content-Type": "application/json"})
        try:
            return status, json.loads(answer)
        except ValueError:
            return status, {"raw": answer.decode(errors="replace")}

    def payload(self, api_name: str, data: list) -> dict:
        return {"data": data, "fn_index": self.fn_index[api_name.lstrip("/")], "session_hash": self.session_hash,
                "event_data": None, "trigger_id": None}

    def stream(self, timeout: float = 120):
        """The session's server-sent messages, as dicts, until the stream closes."""
        request = urllib.request.Request(f"{self.url}/gradio_api/queue/data?session_hash={self.session_hash}")
        response = urllib.request.urlopen(request, timeout=timeout)
        try:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    yield message
                    if message.get("msg") == "close_stream":
                        return
        finally:
            response.close()

    def call(self, api_name: str, data: list, timeout: float = 120) -> dict:
        """Join, then read until this event completes; returns the process_completed message
        (its 'success', and 'output' with 'data' or 'error')."""
        status, answer = self.join(api_name, data)
        if status != 200 or "event_id" not in answer:
            return {"success": False, "join_status": status, "output": {"error": str(answer)}}
        event_id = answer["event_id"]
        for message in self.stream(timeout):
            if message.get("event_id") == event_id and message.get("msg") == "process_completed":
                return message
        raise AssertionError(f"{api_name}: the stream closed without completing event {event_id}")


def error_of(message: dict) -> str:
    """The error text of a completed queue message ('' when it succeeded)."""
    if message.get("success"):
        return ""
    return str((message.get("output") or {}).get("error") or message)


# ---- the canary -----------------------------------------------------------------------
def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every file and folder under `root` (links not followed) with its checksum: a change
    of one byte, a file added or removed, a mode changed, all show. `skip`: names left out
    wherever they occur (files the server is meant to write, like the history)."""
    digest = {}
    if not root.exists():
        return digest
    for path in sorted(root.rglob("*")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        relative = str(path.relative_to(root))
        if path.is_symlink():
            digest[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            digest[relative] = ("dir", path.stat().st_mode)
        else:
            hasher = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
            stat = path.stat()
            digest[relative] = ("file", stat.st_size, stat.st_mode, hasher.hexdigest())
    return digest


def changes(before: dict, after: dict) -> list[str]:
    return ([f"removed {p}" for p in sorted(set(before) - set(after))]
            + [f"added {p}" for p in sorted(set(after) - set(before))]
            + [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]])


def repo_untracked(repo: Path = REPO) -> set[str]:
    """Files in the working tree that git does not track (ignored ones too), less caches and
    the source files other engineers may be writing meanwhile (.py, .md): anything a merge
    or a stage could write there (config.json, *.safetensors, tokenizer files) shows."""
    listing = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=repo,
                             capture_output=True, text=True, check=True).stdout
    paths = {line[3:] for line in listing.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if "__pycache__" not in p and not p.startswith(".pytest_cache")
            and not p.endswith((".py", ".pyc", ".md"))}
