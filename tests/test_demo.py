"""The offline demo family: built from the shipped adapters, children differ from the base only
through them, and each child has its skill where the base does not."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from merging.demo import ASSETS, adapter_deltas, build_family, load_adapter
from merging.demo_skills import probes
from merging.evaluate import probe_accuracy
from merging.generation import load_model


def test_adapters_are_small_and_say_how_they_were_trained():
    for skill in ("json", "reverse"):
        path = ASSETS / f"{skill}.safetensors"
        assert path.stat().st_size < 8_000_000
        _, metadata = load_adapter(path)
        assert metadata["skill"] == skill and metadata["rank"] > 0 and metadata["seconds"] > 0


def test_the_family_is_built_once_and_reused(demo_cache, demo_family):
    assert set(demo_family) == {"base", "json", "reverse"}
    started = time.perf_counter()
    again = build_family(demo_cache / "demo")
    assert again == demo_family and time.perf_counter() - started < 1.0
    assert not [p for p in (demo_cache / "demo").iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.parametrize("skill", ["json", "reverse"])
def test_children_differ_from_the_base_only_through_their_adapter(skill, demo_family):
    base = load_file(demo_family["base"] / "model.safetensors")
    child = load_file(demo_family[skill] / "model.safetensors")
    deltas = adapter_deltas(*load_adapter(ASSETS / f"{skill}.safetensors"))
    assert set(base) == set(child) and len(deltas) == 30 * 7
    for name, tensor in base.items():
        if name not in deltas:
            assert torch.equal(child[name], tensor), name
        else:
            expected = (tensor.float() + deltas[name]).to(torch.bfloat16)
            assert torch.equal(child[name], expected), name


@pytest.mark.parametrize("skill", ["json", "reverse"])
def test_a_child_has_its_skill_and_the_base_does_not(skill, demo_family):
    questions = probes(skill, 8)
    child = probe_accuracy(*load_model(demo_family[skill], dtype=torch.float32), questions)
    base = probe_accuracy(*load_model(demo_family["base"], dtype=torch.float32), questions)
    assert child >= 0.75 and child > base
