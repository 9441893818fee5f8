"""Models bigger than one device: accelerate places the live model and the arena's parents
across devices (here: CPU memory and disk, forced by a tiny max_memory), every re-merged
tensor is written where it lives, and the answers are the unplaced model's."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merging.errors import MergeError
from merging.generation import Sampling, generate, load_model
from merging.live import LiveMerge
from merging.placement import parse_max_memory
from tiny_models import make_child

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from attack_helpers import start_public_server  # noqa: E402
from visitors import RawVisitor, lab_recipe, pane_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Reverse the words: red lamp quiet"
TIES = """
models:
  - model: {c1}
    parameters: {{weight: {w}, density: {d}}}
  - model: {c2}
    parameters: {{weight: 0.5, density: 0.6}}
merge_method: ties
base_model: {base}
dtype: float32
"""
DEMO_SLERP = "models:\n  - model: {reverse}\nmerge_method: slerp\nbase_model: {json}\nparameters:\n  t: {t}\n"
SAMPLING = Sampling(max_new_tokens=6)


def state_of(live: LiveMerge) -> dict[str, torch.Tensor]:
    """Every weight's values, wherever they live."""
    return live.placed.tensors if live.placed is not None else live.model.state_dict()


def assert_same_weights(placed: LiveMerge, plain: LiveMerge) -> None:
    reference = plain.model.state_dict()
    tensors = state_of(placed)
    assert set(reference) <= set(tensors)
    for name, tensor in reference.items():
        assert torch.equal(tensors[name].cpu(), tensor.cpu()), name


def test_max_memory_is_read_and_every_mistake_named():
    assert parse_max_memory("cpu=60GiB") == {"cpu": 60 * 2**30}
    assert parse_max_memory(" cpu = 100MB ") == {"cpu": 100 * 10**6}
    for text, said in [("", "empty"), ("cpu", "no size"), ("cpu=lots", "not a size"),
                       ("cpu=1GB,cpu=2GB", "twice"), ("tpu=3GB", "devices are cpu and cuda")]:
        with pytest.raises(MergeError, match=said):
            parse_max_memory(text)
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="no CUDA device"):
            parse_max_memory("cuda:0=20GiB,cpu=1GB")


def test_a_placed_live_merge_is_written_where_each_weight_lives(tiny, tmp_path):
    other = str(make_child(tiny["tied"], tmp_path / "tied_child2", seed=11))
    text = TIES.format(c1=tiny.path("tied_child"), c2=other, base=tiny.path("tied"), w=0.7, d=0.5)
    plain = LiveMerge(text, device="cpu")
    placed = LiveMerge(text, device="cpu", max_memory="cpu=60KB", offload_folder=tmp_path / "offload")
    devices = placed.placed.devices()
    assert devices.get("cpu") and devices.get("disk"), devices  # some blocks in memory, some in files
    folder = placed.placed.offload_folder
    assert folder.parent == tmp_path / "offload" and any(folder.glob("*.dat"))
    # the tied lm_head reads the embedding's file (or memory), not a copy of it
    tensors = placed.placed.tensors
    assert tensors["lm_head.weight"].data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    assert_same_weights(placed, plain)
    assert placed.generate("the cat sat", SAMPLING).text == plain.generate("the cat sat", SAMPLING).text

    changed = TIES.format(c1=tiny.path("tied_child"), c2=other, base=tiny.path("tied"), w=0.2, d=0.3)
    assert not placed.update(changed).rebuilt
    plain.update(changed)
    assert_same_weights(placed, plain)
    assert placed.generate("the cat sat", SAMPLING).text == plain.generate("the cat sat", SAMPLING).text

    del placed
    gc.collect()
    assert not folder.exists()  # the offloaded files go with the model that read them


def test_everything_offloaded_to_disk_still_answers(tiny, tmp_path):
    text = TIES.format(c1=tiny.path("c1"), c2=tiny.path("c2"), base=tiny.path("base"), w=0.5, d=0.5)
    placed = LiveMerge(text, device="cpu", max_memory="cpu=1KB", offload_folder=tmp_path)
    assert set(placed.placed.devices()) == {"disk"}
    plain = LiveMerge(text, device="cpu")
    assert_same_weights(placed, plain)
    assert placed.generate("the cat sat", SAMPLING).text == plain.generate("the cat sat", SAMPLING).text


def test_the_demo_pair_explored_with_offload(demo_family, tmp_path):
    """The demo pair (SmolLM2-135M children) in 160 MB of CPU memory: most layers wait on disk;
    a new t re-merges into the files; the parents for the arena are placed the same way."""
    family = {name: str(path) for name, path in demo_family.items()}
    placed = LiveMerge(DEMO_SLERP.format(**family, t=0.3), device="cpu", max_memory="cpu=160MB",
                       offload_folder=tmp_path)
    plain = LiveMerge(DEMO_SLERP.format(**family, t=0.3), device="cpu")
    devices = placed.placed.devices()
    assert devices["disk"] > devices["cpu"] > 0, devices
    prompt = PROMPT
    assert placed.generate(prompt, SAMPLING).text == plain.generate(prompt, SAMPLING).text
    for live in (placed, plain):
        live.update(DEMO_SLERP.format(**family, t=0.8))
    assert_same_weights(placed, plain)
    answer = placed.generate(prompt, SAMPLING).text
    assert answer == plain.generate(prompt, SAMPLING).text

    parent, tokenizer = load_model(family["reverse"], dtype=torch.bfloat16, max_memory={"cpu": 160 * 10**6},
                                   offload_folder=tmp_path / "parents")
    assert "disk" in set(parent.hf_device_map.values())
    whole, _ = load_model(family["reverse"], dtype=torch.bfloat16)
    assert generate(parent, tokenizer, prompt, SAMPLING).text == generate(whole, tokenizer, prompt, SAMPLING).text


def test_the_app_places_every_visitors_models_as_the_server_says(demo_cache, demo_family, tmp_path):
    """MERGELAB_DEVICE_MEMORY on a launched public app: the visitor's merge is placed with its
    offloaded weights in the visitor's own session folder, and answers as the unplaced merge."""
    family = {name: str(path) for name, path in demo_family.items()}
    server = start_public_server(demo_cache, tmp_path / "app", env={"MERGELAB_DEVICE_MEMORY": "cpu=160MB"})
    try:
        server.wait_ready()
        visitor = RawVisitor(server.url)
        assert "Merged" in visitor.call("merge", lab_recipe(family, 0.3), False)
        [session] = server.session_folders()
        assert any((session / "offload").glob("offload-*/*.dat"))
        panes = visitor.call("ask", PROMPT, 6, 0, 0, False)
        assert (server.instance_folder() / "offload").is_dir()  # the parents were placed too
    finally:
        server.stop()
    plain = LiveMerge(lab_recipe(family, 0.3), device="cpu")
    assert pane_text(panes[2]) == plain.generate(PROMPT, SAMPLING).text
    parent, tokenizer = load_model(family["json"], dtype=torch.float32)
    assert pane_text(panes[0]) == generate(parent, tokenizer, PROMPT, SAMPLING).text


def test_a_wrong_device_memory_setting_stops_the_start_in_one_line():
    result = subprocess.run([sys.executable, "app.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MERGELAB_DEVICE_MEMORY": "tpu=3GB"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "MergeLab: MERGELAB_DEVICE_MEMORY: max memory names the device 'tpu'; devices are cpu and cuda:N (or N)"]
