"""A small stand-in for the Hugging Face hub's HTTP API, on localhost, for hub code paths.

It serves model folders under repo ids: repo info (`/api/models/...`), file downloads
and HEAD metadata (`/{repo}/resolve/{revision}/{file}`, with Range support), the way
huggingface_hub talks to the real hub. With `storage`, it also takes writes as the hub
does: who-am-I for a token, repo creation and deletion, preupload (every file "regular",
so contents arrive inline) and NDJSON commits, writing the files under `storage`;
`fail_commits` makes commits fail with HTTP 500. It records every request, and the token
each carried, so tests can see what was downloaded and with whose token; a repo marked in
`private` is read only with its namespace owner's token. Only loopback traffic; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "1234567890abcdef1234567890abcdef12345678"


class FakeHub:
    def __init__(self, repos: dict[str, Path], storage: Path = None, tokens: dict[str, str] = None):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.storage = Path(storage) if storage else None
        self.tokens = tokens or {"hf_good": "tester"}  # token -> user name
        self.private: dict[str, bool] = {}
        self.fail_commits = False
        self.requests: list[tuple[str, str, str]] = []  # method, path, Range header
        self.tokens_sent: list[tuple[str, str]] = []  # path, bearer token ("" when none was sent)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

            def do_POST(self):
                hub.handle_write(self)

            def do_DELETE(self):
                hub.handle_write(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        """Files fetched whole with GET (not HEAD, not a byte range), as their URL paths."""
        return [path for method, path, ranged in self.requests
                if method == "GET" and "/resolve/" in path and not ranged]

    def ranged_reads(self) -> list[str]:
        return [path for method, path, ranged in self.requests if method == "GET" and ranged]

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Range", "")))
        self.tokens_sent.append((path, request.headers.get("Authorization", "").removeprefix("Bearer ").strip()))
        if path == "/api/whoami-v2":
            user = self._user(request)
            if user is None:
                return self._send(request, 401, b'{"error": "Invalid credentials"}', {}, body)
            return self._send(request, 200, json.dumps({"name": user, "type": "user", "auth": {}}).encode(),
                              {"Content-Type": "application/json"}, body)
        if path == "/api/models":  # search
            query = dict(part.split("=", 1) for part in urlparse(request.path).query.split("&") if "=" in part)
            wanted = unquote(query.get("search", "")).lower()
            payload = [{"id": repo, "modelId": repo, "pipeline_tag": "text-generation"}
                       for repo in self.repos if wanted in repo.lower()]
            return self._send(request, 200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)
        if path.startswith("/api/models/"):
            return self._repo_info(request, path[len("/api/models/"):], body)
        if "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            _, _, file = rest.partition("/")
            return self._file(request, repo, file, body)
        self._send(request, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)

    # ---- writes -----------------------------------------------------------------------
    def _user(self, request) -> str:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return self.tokens.get(token)

    def handle_write(self, request: BaseHTTPRequestHandler) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append((request.command, path, ""))
        data = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        user = self._user(request)
        if user is None or self.storage is None:
            return self._send(request, 401, b'{"error": "Invalid credentials"}', {}, True)
        if path in ("/api/repos/create", "/api/repos/delete"):
            payload = json.loads(data)
            repo = f"{payload.get('organization') or user}/{payload['name']}"
            if path.endswith("create"):
                if repo in self.repos:
                    return self._send(request, 409, b'{"error": "You already created this model repo"}', {}, True)
                self.repos[repo] = self.storage / repo
                self.repos[repo].mkdir(parents=True)
                self.private[repo] = payload.get("visibility") == "private" or bool(payload.get("private"))
                return self._json(request, {"url": f"{self.url}/{repo}", "name": repo})
            if repo not in self.repos:
                return self._send(request, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, True)
            import shutil

            shutil.rmtree(self.repos.pop(repo), ignore_errors=True)
            return self._json(request, {})
        if path == "/api/validate-yaml":  # the model card's front matter must parse
            import yaml

            content = json.loads(data)["content"]
            front = content.split("---")[1] if content.startswith("---") else ""
            try:
                yaml.safe_load(front)
            except yaml.YAMLError as error:
                return self._send(request, 400, json.dumps({"errors": [{"message": str(error)}]}).encode(), {}, True)
            return self._json(request, {"errors": [], "warnings": []})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(data)["files"]
            return self._json(request, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
        if path.startswith("/api/models/") and "/commit/" in path:
            repo = path[len("/api/models/"):].split("/commit/")[0]
            if repo not in self.repos:
                return self._send(request, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, True)
            if self.fail_commits:
                return self._send(request, 500, b'{"error": "Internal Error"}', {}, True)
            import base64

            for line in data.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = self.repos[repo] / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            return self._json(request, {"commitUrl": f"{self.url}/{repo}/commit/{COMMIT}", "commitOid": COMMIT})
        self._send(request, 404, b"{}", {}, True)

    def _json(self, request, payload) -> None:
        self._send(request, 200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, True)

    def _readable(self, request, repo: str) -> bool:
        """A private repo is read only with a token of its namespace's user, as on the hub."""
        return not self.private.get(repo) or self._user(request) == repo.split("/")[0]

    def _repo_info(self, request, rest: str, body: bool) -> None:
        repo = rest.split("/revision/")[0].split("/tree/")[0]
        if repo not in self.repos or not self._readable(request, repo):
            return self._send(request, 404, b'{"error": "Repository not found"}',
                              {"X-Error-Code": "RepoNotFound"}, body)
        folder = self.repos[repo]
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        if "/tree/" in rest:
            payload = [{"type": "file", "path": f, "size": (folder / f).stat().st_size, "oid": _etag(folder / f)}
                       for f in files]
        else:
            payload = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                       "siblings": [{"rfilename": f, "size": (folder / f).stat().st_size} for f in files]}
        self._send(request, 200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, request, repo: str, file: str, body: bool) -> None:
        target = self.repos.get(repo, Path("/nonexistent")) / file
        if repo not in self.repos or not self._readable(request, repo):
            return self._send(request, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
        if not target.is_file():
            return self._send(request, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
        data = target.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(target)}"', "Accept-Ranges": "bytes"}
        status = 200
        byte_range = request.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            start, _, end = byte_range[len("bytes="):].partition("-")
            start = int(start)
            end = int(end) if end else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data = data[start:end + 1]
            status = 206
        self._send(request, status, data, headers, body)

    @staticmethod
    def _send(request, status: int, data: bytes, headers: dict, body: bool) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)


_ETAGS: dict[tuple, str] = {}


def _etag(path: Path) -> str:
    """The file's sha256, computed once per (path, size, mtime): a 270 MB model is asked for
    its etag on every HEAD and GET."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _ETAGS:
        _ETAGS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _ETAGS[key]
