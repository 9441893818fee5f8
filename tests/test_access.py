"""Whose hub token and which local folders a merge may use (merging/access.py): locally the
machine's own login and any folder; on a public deployment the visitor's own token or none,
and only the demo cache and the visitor's session folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from merging import MergeError
from merging.access import access_scope, visitor_access
from merging.sources import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture
def private_hub(tiny, tmp_path):
    """A hub with one private repo of user 'tester' and one public repo; the server's own
    token (HF_TOKEN, tester's) can read both. Yields the hub and the environment that points
    a process at it (huggingface_hub reads its endpoint and cache when imported)."""
    from fake_hub import FakeHub

    with FakeHub({"tester/secret": tiny["c1"], "org/open": tiny["base"]}) as hub:
        hub.private["tester/secret"] = True
        yield hub, {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_TOKEN": "hf_good",
                    "HF_HUB_OFFLINE": "0"}


ACCESS_SCRIPT = """
import json, os
from merging import MergeError
from merging.access import access_scope, visitor_access
from merging.sources import open_model

def attempt(reference, phase):
    import urllib.request
    try:  # a marker in the hub's request log: what follows belongs to this phase
        urllib.request.urlopen(os.environ["HF_ENDPOINT"] + "/marker/" + phase.replace(" ", "-"))
    except Exception:
        pass
    try:
        return "read" if open_model(reference).has_weights else "no weights"
    except MergeError as error:
        return str(error)

seen = {"local": attempt("tester/secret", "local")}          # the machine's own login; now in the cache
os.environ["MERGELAB_PUBLIC"] = "1"
seen["anonymous"] = attempt("tester/secret", "anonymous")         # cached, and the server's token could read it
seen["anonymous, open repo"] = attempt("org/open", "open")
with access_scope(visitor_access("hf_good")):
    seen["owner signed in"] = attempt("tester/secret", "owner")
with access_scope(visitor_access("hf_someone_else")):
    seen["someone else signed in"] = attempt("tester/secret", "other")
print(json.dumps(seen))
"""


def test_a_public_deployment_never_reads_the_hub_with_the_servers_token(private_hub):
    import json
    import os
    import subprocess

    hub, env = private_hub
    result = subprocess.run([sys.executable, "-c", ACCESS_SCRIPT], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **env), cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    refused = "no model 'tester/secret' on the Hugging Face hub that you can read (if it is private, sign in)"
    assert seen == {"local": "read", "anonymous": refused, "anonymous, open repo": "read",
                    "owner signed in": "read", "someone else signed in": refused}
    phases, phase = {}, None
    for path, token in hub.tokens_sent:
        if path.startswith("/marker/"):
            phase = path.removeprefix("/marker/")
        else:
            phases.setdefault(phase, set()).add(token)
    assert "hf_good" in phases.pop("local")  # the machine's own login, locally
    assert phases == {"anonymous": {""}, "open": {""}, "owner": {"hf_good"}, "other": {"hf_someone_else"}}


def test_public_local_paths_only_inside_the_allowed_folders(tiny, demo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    monkeypatch.setenv("MERGELAB_CACHE", str(demo_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outside = tiny.path("c1")
    messages = set()
    for reference in (outside, outside + "/../c1", "~/nowhere", str(tmp_path / "does-not-exist")):
        with pytest.raises(MergeError) as refused:
            open_model(reference)
        messages.add(str(refused.value).replace(reference, "X"))
    assert messages == {"model 'X': local paths are disabled on a public deployment"}  # existence not revealed
    assert open_model(str(demo_cache / "demo" / "smollm2-json")).num_layers == 30
    session_folder = tmp_path / "session"
    model = session_folder / "stages" / "00-first"
    model.parent.mkdir(parents=True)
    model.symlink_to(Path(outside))  # a link inside the session folder to a model outside it
    with access_scope(visitor_access(None, (session_folder,))):
        with pytest.raises(MergeError, match="local paths are disabled"):
            open_model(str(model))
    with pytest.raises(MergeError, match="hub is offline"):  # shaped like a hub id: the hub's, never a folder
        open_model("tests/fake_hub.py")


def test_the_launched_public_app_uses_no_token_of_its_own(private_hub, demo_cache, tmp_path):
    """The Space owner's HF_TOKEN is in the server's environment; a visitor naming the owner's
    private repo is told it cannot be read, and the hub never saw the owner's token."""
    from gradio_client import Client
    from visitors import launch_app

    hub, env = private_hub
    server = launch_app(demo_cache, env={"MERGELAB_PUBLIC": "1", **env}, log=tmp_path / "app.log")
    try:
        client = Client(server.url, verbose=False)
        recipe = "models:\n  - model: tester/secret\n  - model: org/open\nmerge_method: linear\n"
        with pytest.raises(Exception, match="no model 'tester/secret' on the Hugging Face hub that you can read"):
            client.predict(recipe, api_name="/check_recipe")
        open_recipe = "models:\n  - model: org/open\nmerge_method: passthrough\n"
        assert "output: 4 layers" in client.predict(open_recipe, api_name="/check_recipe")
        client.close()
    finally:
        server.stop()
    assert hub.tokens_sent and all(token != "hf_good" for _, token in hub.tokens_sent)
