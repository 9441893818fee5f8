"""Shared fixtures: a family of tiny Llama models built once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_base, make_child  # noqa: E402


class Family(dict):
    """Model folders by short name; `family.path('c1')` gives the absolute path as text."""

    def path(self, name: str) -> str:
        return str(self[name])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Family:
    root = tmp_path_factory.mktemp("tiny")
    family = Family()
    family["base"] = make_base(root / "base", seed=0)
    family["c1"] = make_child(family["base"], root / "c1", seed=1)
    family["c2"] = make_child(family["base"], root / "c2", seed=2, rank=2)
    family["c3"] = make_child(family["base"], root / "c3", seed=3, scale=0.05)
    family["sharded"] = make_child(family["base"], root / "sharded", seed=4, max_shard_size="20KB")
    family["wide"] = make_base(root / "wide", hidden=64, seed=5)
    family["deep"] = make_base(root / "deep", layers=6, seed=6)
    family["tied"] = make_base(root / "tied", seed=7, tied=True)
    family["tied_child"] = make_child(family["tied"], root / "tied_child", seed=8)
    family["more_vocab"] = make_child(family["base"], root / "more_vocab", seed=9, extra_rows=8)
    return family


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A MERGELAB_CACHE root holding the demo family, built once from the shipped adapters."""
    from merging.demo import build_family

    root = tmp_path_factory.mktemp("mergelab-cache")
    build_family(root / "demo")
    return root


@pytest.fixture(scope="session")
def demo_family(demo_cache) -> dict:
    from merging.demo import build_family

    return build_family(demo_cache / "demo")  # already built: returns at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(demo_cache, tmp_path_factory):
    """`python app.py` as a user starts it (on the demo family), on a free local port."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w+")
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", MERGELAB_CACHE=str(demo_cache))
    process = subprocess.Popen([sys.executable, "app.py"], cwd=Path(__file__).resolve().parent.parent, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"app.py exited: {log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app.py did not start within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()
