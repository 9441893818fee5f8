"""Simulated visitors of a running MergeLab app, for the load benchmark and the concurrency test.

    server = launch_app(cache, env={"MERGELAB_PUBLIC": "1"})     # python app.py, as a user starts it
    visitor = RawVisitor(server.url)                            # raw queue calls: no heartbeat, ever
    status = visitor.call("merge", recipe, False)
    events = visitor.call_stream("ask", prompt, 32, 0.8, 7, False)   # [(seconds, outputs), ...]
    server.rss_bytes(), server.thread_names()

A RawVisitor speaks Gradio's queue protocol over plain HTTP (join, then the server-sent
events of its session), the way a script or a stranger would: it never opens the heartbeat
stream, so its session ends only by the server's idle expiry. gradio_client.Client is the
other kind: it keeps a heartbeat and its `close()` is a browser leaving.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def thread_names(self) -> list[str]:
        names = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                names.append((task / "comm").read_text().strip())
            except OSError:
                pass  # a thread that ended while we looked
        return sorted(names)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def starting(self) -> Optional[bool]:
        """None: the port does not answer; True: it serves the starting page (the demo models
        are building); False: it serves the Lab."""
        try:
            with urllib.request.urlopen(f"{self.url}config", timeout=2) as response:
                return json.loads(response.read()).get("title", "").endswith("starting")
        except (OSError, ValueError):
            return None

    def wait_ready(self, seconds: float = 180) -> "Server":
        """Returns once the Lab answers (not the starting page shown while the demo models
        build); raises with the log's end if the app exits or is late."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited: {self.log()[-3000:]}")
            if self.starting() is False:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app.py did not start within {seconds:.0f} s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_app(cache: Optional[Path], env: Optional[dict] = None, log: Optional[Path] = None,
              python_code: Optional[str] = None, server_class: type = Server, base_env: Optional[dict] = None
              ) -> Server:
    """`python app.py` on the demo family in `cache` (MERGELAB_CACHE; None: as `env` says), on a
    free local port, offline unless `env` says otherwise; not waited for (see wait_ready).
    `python_code` runs instead of app.py (it must start app.py itself); `base_env` replaces
    this process's environment as the one to start from."""
    port = free_port()
    log = Path(log or Path(cache or tempfile.gettempdir()) / f"app-{port}.log")
    environment = {**(os.environ if base_env is None else base_env), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                   "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                   **({"MERGELAB_CACHE": str(cache)} if cache else {}), **(env or {})}
    with open(log, "w") as handle:
        command = [sys.executable, "-c", python_code] if python_code else [sys.executable, "app.py"]
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                   text=True)
    return server_class(process, f"http://127.0.0.1:{port}/", log)


def launch_app(cache: Optional[Path], env: Optional[dict] = None, log: Optional[Path] = None, timeout: float = 180,
               python_code: Optional[str] = None) -> Server:
    """start_app, then wait until the page answers."""
    return start_app(cache, env, log, python_code).wait_ready(timeout)


class CallFailed(Exception):
    """The server answered the call with an error (a gr.Error's message, or a queue refusal)."""


class RawVisitor:
    """One visitor speaking Gradio's queue protocol directly; see the module's docstring."""

    def __init__(self, url: str, session_hash: Optional[str] = None):
        self.url = url.rstrip("/")
        self.session_hash = session_hash or secrets.token_hex(6)
        config = json.loads(urllib.request.urlopen(f"{self.url}/config", timeout=30).read())
        self.prefix = self.url + config.get("api_prefix", "/gradio_api")
        self.functions = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}

    def call_stream(self, api_name: str, *data, timeout: float = 600) -> list[tuple[float, list]]:
        """Every output the event sends, with the seconds since the call, until it completes;
        raises CallFailed with the server's message when it fails."""
        body = json.dumps({"data": list(data), "fn_index": self.functions[api_name], "session_hash": self.session_hash,
                           "event_data": None, "trigger_id": None}).encode()
        started = time.perf_counter()
        join = urllib.request.Request(f"{self.prefix}/queue/join", body, {"Content-Type": "application/json"})
        event_id = json.loads(urllib.request.urlopen(join, timeout=timeout).read())["event_id"]
        outputs: list[tuple[float, list]] = []
        stream = urllib.request.urlopen(f"{self.prefix}/queue/data?session_hash={self.session_hash}", timeout=timeout)
        with stream:
            for raw in stream:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") not in (None, event_id):
                    continue
                kind = message.get("msg")
                if kind == "process_generating":
                    outputs.append((time.perf_counter() - started, message["output"]["data"]))
                elif kind == "process_completed":
                    output = message.get("output", {})
                    if not message.get("success", False):
                        raise CallFailed(output.get("error") or message.get("title") or "the call failed")
                    outputs.append((time.perf_counter() - started, output.get("data")))
                    return outputs
                elif kind == "close_stream":
                    break
        raise CallFailed("the server closed the stream before the call completed")

    def cancel_after_first_output(self, api_name: str, *data, timeout: float = 600) -> float:
        """Start a call, cancel it as soon as it sends its first output (as the page's Stop or a
        closed tab does); returns the seconds until that first output."""
        body = json.dumps({"data": list(data), "fn_index": self.functions[api_name], "session_hash": self.session_hash,
                           "event_data": None, "trigger_id": None}).encode()
        started = time.perf_counter()
        join = urllib.request.Request(f"{self.prefix}/queue/join", body, {"Content-Type": "application/json"})
        event_id = json.loads(urllib.request.urlopen(join, timeout=timeout).read())["event_id"]
        with urllib.request.urlopen(f"{self.prefix}/queue/data?session_hash={self.session_hash}",
                                    timeout=timeout) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data:") and json.loads(line[5:]).get("msg") in ("process_generating",
                                                                                    "process_completed"):
                    break
        first = time.perf_counter() - started
        cancel = json.dumps({"event_id": event_id, "session_hash": self.session_hash,
                             "fn_index": self.functions[api_name]}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{self.prefix}/cancel", cancel,
                                                      {"Content-Type": "application/json"}), timeout=timeout).read()
        return first

    def call(self, api_name: str, *data, timeout: float = 600):
        """The call's final outputs (one value for one output)."""
        data = self.call_stream(api_name, *data, timeout=timeout)[-1][1]
        return data[0] if len(data) == 1 else data


def lab_recipe(family: dict, t: float) -> str:
    return (f"models:\n  - model: {family['reverse']}\nmerge_method: slerp\nbase_model: {family['json']}\n"
            f"parameters:\n  t: {t}\ndtype: float32\n")


def pane_text(history) -> str:
    """The last answer of a chatbot's history (content may come as a list of blocks)."""
    if not history:
        return ""
    content = history[-1]["content"]
    if isinstance(content, list):
        content = "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return content


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]
