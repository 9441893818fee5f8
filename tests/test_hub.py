"""Hub ids resolve through huggingface_hub's cache; offline and uncached fails clearly.

No network here: the cache is laid out as huggingface_hub lays it out, in a temporary
HF_HUB_CACHE, and the hub is marked offline.
"""

from __future__ import annotations

import shutil

import pytest

from helpers import load_tensors, run_cli


def cache_model(cache, repo: str, source, revision: str = "main"):
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)
    shutil.copytree(source, root / "snapshots" / commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, cache


def test_cached_hub_models_merge_offline(tiny, tmp_path, offline_cache):
    env, cache = offline_cache
    cache_model(cache, "mergelab-test/tiny-base", tiny["base"])
    cache_model(cache, "mergelab-test/tiny-child", tiny["c1"])
    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: mergelab-test/tiny-child\nmerge_method: slerp\n"
                      "base_model: mergelab-test/tiny-base\nparameters: {t: 1.0}\n")
    result = run_cli(config, tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr
    merged, child = load_tensors(tmp_path / "out"), load_tensors(tiny["c1"])
    assert all((merged[k] - child[k]).abs().max() < 1e-5 for k in child)
    assert "base_model:\n- mergelab-test/tiny-base" in (tmp_path / "out" / "README.md").read_text()


def test_uncached_hub_model_offline_fails_clearly(tmp_path, offline_cache):
    env, _ = offline_cache
    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: someone/not-cached\n    parameters: {weight: 1}\n"
                      "merge_method: linear\n")
    result = run_cli(config, tmp_path / "out", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: model 'someone/not-cached' is not in the Hugging Face cache "
                                     "and the hub is offline (HF_HUB_OFFLINE is set)")


def test_revision_is_part_of_the_reference(tiny, tmp_path, offline_cache):
    env, cache = offline_cache
    cache_model(cache, "mergelab-test/tiny-child", tiny["c1"], revision="v1")
    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: mergelab-test/tiny-child@v1\nmerge_method: passthrough\n")
    result = run_cli(config, tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr


def test_unreachable_hub_fails_clearly(tmp_path):
    # A closed local port stands in for a network without the hub: connection refused.
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: someone/model\nmerge_method: passthrough\n")
    result = run_cli(config, tmp_path / "out", env=env)
    assert result.returncode == 2, result.stderr
    assert "cannot download model 'someone/model': the Hugging Face hub is not reachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def hub_env(tmp_path, hub) -> dict:
    return {"HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5"}


@pytest.fixture
def hub_models(tiny, tmp_path):
    """The tiny base and child as hub repos, the child also carrying a .bin we must not fetch."""
    child = tmp_path / "child-repo"
    shutil.copytree(tiny["c1"], child)
    (child / "pytorch_model.bin").write_bytes(b"not needed")
    return {"org/tiny-base": tiny["base"], "org/tiny-child": child}


def test_dry_run_reads_hub_headers_without_downloading_weights(hub_models, tmp_path):
    from fake_hub import FakeHub

    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: org/tiny-child\nmerge_method: slerp\nbase_model: org/tiny-base\n"
                      "parameters: {t: 0.5}\n")
    with FakeHub(hub_models) as hub:
        result = run_cli(config, tmp_path / "out", "--dry-run", env=hub_env(tmp_path, hub))
        assert result.returncode == 0, result.stderr
        assert "output: 4 layers, 39 tensors" in result.stdout
        downloaded, ranged = hub.downloads(), hub.ranged_reads()
    assert any(path.endswith("/config.json") for path in downloaded)
    assert not any(path.endswith(".safetensors") for path in downloaded), downloaded
    assert any(path.endswith("model.safetensors") for path in ranged)  # headers only
    assert not (tmp_path / "out").exists()


def test_hub_merge_downloads_only_what_it_needs(hub_models, tiny, tmp_path):
    from fake_hub import FakeHub

    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: org/tiny-child\nmerge_method: slerp\nbase_model: org/tiny-base\n"
                      "parameters: {t: 1.0}\n")
    with FakeHub(hub_models) as hub:
        result = run_cli(config, tmp_path / "out", env=hub_env(tmp_path, hub))
        assert result.returncode == 0, result.stderr
        downloaded = hub.downloads()
    assert not any(path.endswith(".bin") for path in downloaded)
    assert sum(path.endswith("model.safetensors") for path in downloaded) == 2
    merged, child = load_tensors(tmp_path / "out"), load_tensors(tiny["c1"])
    assert all((merged[k] - child[k]).abs().max() < 1e-5 for k in child)
    # and once cached, the same merge works offline
    env = dict(hub_env(tmp_path, hub), HF_HUB_OFFLINE="1")
    assert run_cli(config, tmp_path / "again", env=env).returncode == 0


def test_a_missing_hub_model_fails_before_any_weights_download(hub_models, tmp_path):
    from fake_hub import FakeHub

    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: org/tiny-child\nmerge_method: slerp\nbase_model: org/no-such-model\n"
                      "parameters: {t: 0.5}\n")
    with FakeHub(hub_models) as hub:
        result = run_cli(config, tmp_path / "out", env=hub_env(tmp_path, hub))
        downloaded = hub.downloads()
    assert result.returncode == 2
    assert "no model 'org/no-such-model' on the Hugging Face hub" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(path.endswith(".safetensors") for path in downloaded)
