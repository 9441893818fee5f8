"""Shared fixtures: a family of tiny Llama models built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def server(demo_cache, tmp_path_factory):
    """`python app.py` as a user starts it (on the demo family), on a free local port."""
    from visitors import launch_app

    app = launch_app(demo_cache, log=tmp_path_factory.mktemp("app") / "app.log")
    yield app.url
    app.stop()


@pytest.fixture(scope="session")
def arch_families(tmp_path_factory) -> dict:
    """A base and two children of every architecture in tests/arch_models.py, built once."""
    from arch_models import ARCHITECTURES, make_family

    root = tmp_path_factory.mktemp("architectures")
    return {name: make_family(name, root / name) for name in ARCHITECTURES}
