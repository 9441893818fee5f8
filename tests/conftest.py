"""Shared fixtures: tiny model families, the demo family and the app server, built once per
test session."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # visitors: the app launcher
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


@dataclass
class FirstStart:
    """The session's server, started as a new user starts `python app.py`: on an empty cache,
    so that it builds the demo family itself (once for the whole test session), and what the
    first start showed meanwhile (checked in test_browser_errors)."""

    app: object  # benchmarks/visitors.Server
    cache: Path
    answered_after: Optional[float] = None  # seconds until the port answered
    starting_page: Optional[bool] = None  # the port served the starting page, not a closed port
    shown: str = ""  # the starting page's texts
    statuses: list = field(default_factory=list)  # what its progress said, in order
    built_after_answer: Optional[float] = None  # seconds from the first answer to the Lab
    log_when_ready: str = ""
    problem: Optional[str] = None


def _watch_first_start(start: FirstStart, started: float) -> None:
    """Follow the first start until the Lab is served, recording what a visitor saw."""
    from visitors import RawVisitor

    app = start.app
    while app.starting() is None and time.time() - started < 120 and app.alive():
        time.sleep(0.2)
    start.answered_after = time.time() - started
    start.starting_page = app.starting()
    try:
        with urllib.request.urlopen(f"{app.url}config", timeout=10) as response:
            config = json.loads(response.read())
        start.shown = json.dumps([c.get("props", {}).get("value") for c in config["components"]])
        visitor = RawVisitor(app.url)
    except Exception as error:
        start.problem = f"the starting page: {type(error).__name__}: {error}"
        return
    while app.starting() is True:
        try:
            # a short timeout: a call in flight when the Lab replaces the starting page gets no answer
            said = visitor.call("startup_progress", timeout=5) or ""
        except Exception as error:
            time.sleep(1)
            if app.starting() is True:  # not the switch to the Lab (the port closes, or says 503, meanwhile)
                start.problem = f"the starting page's progress: {type(error).__name__}: {error}"
            return
        if not start.statuses or start.statuses[-1] != said:
            start.statuses.append(said)
        if "demo models are ready" in said:
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def first_start(tmp_path_factory) -> FirstStart:
    from visitors import start_app

    cache = tmp_path_factory.mktemp("mergelab-cache")
    started = time.time()
    app = start_app(cache, log=tmp_path_factory.mktemp("app") / "app.log")
    start = FirstStart(app, cache)
    try:
        _watch_first_start(start, started)
        # the build takes ~1 min on 2 free cores, minutes on a busy machine
        app.wait_ready(900)
        start.built_after_answer = time.time() - started - start.answered_after
        start.log_when_ready = app.log()
        yield start
    finally:
        app.stop()


@pytest.fixture(scope="session")
def demo_cache(first_start) -> Path:
    """A MERGELAB_CACHE root holding the demo family, built by the session server's first start."""
    return first_start.cache


@pytest.fixture(scope="session")
def demo_family(demo_cache) -> dict:
    from merging.demo import build_family

    return build_family(demo_cache / "demo")  # already built: returns at once


@pytest.fixture(scope="session")
def server(first_start):
    """`python app.py` as a user starts it (on the demo family), on a free local port."""
    return first_start.app.url


@pytest.fixture(scope="session")
def arch_families(tmp_path_factory) -> dict:
    """A base and two children of every architecture in tests/arch_models.py, built once."""
    from arch_models import ARCHITECTURES, make_family

    root = tmp_path_factory.mktemp("architectures")
    return {name: make_family(name, root / name) for name in ARCHITECTURES}


# ---- Chromium, driven by Playwright (Debian's package; .ci/run installs it) ------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def chromium():
    """One browser per test module; each test gets its own context (cookies, session)."""
    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _new_page(browser, width: int, height: int):
    context = browser.new_context(viewport={"width": width, "height": height})
    return context, context.new_page()


@pytest.fixture
def page(chromium):
    """A new visitor's page, tall enough for whole-page screenshots of a tab."""
    context, new_page = _new_page(chromium, 1280, 1400)
    yield new_page
    context.close()


@pytest.fixture
def small_screen(chromium):
    """A new visitor's page at 1400x900: the first screen a person sees on a laptop."""
    context, new_page = _new_page(chromium, 1400, 900)
    yield new_page
    context.close()
