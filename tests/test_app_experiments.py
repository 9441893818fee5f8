"""The app's Sweep and History tabs and publishing, over its API and in-process."""

from __future__ import annotations

import csv
import time

import pytest

from merging import load_config


def lab_recipe(demo_family) -> str:
    from ui.lab import LAB_RECIPE

    return LAB_RECIPE.format(**{name: str(path) for name, path in demo_family.items()})


SWEEP_SCORES = ("Make a record: Ana is 31 and lives in Lima.", None, "Reverse the words: red lamp quiet", None,
                ["reverse skill"], 2)


def test_a_sweep_scores_every_point_records_it_and_loads_one_into_the_lab(server, demo_family):
    from gradio_client import Client

    client = Client(server, verbose=False)
    recipe = lab_recipe(demo_family)
    choices = client.predict(recipe, api_name="/sweep_parameters")["choices"]
    assert ["t (everywhere)", "t"] in choices and ["t on a layer range (from / to below)", "t@layers"] in choices
    plot, table, status, csv_path, points = client.predict(recipe, "t", 0, 0, 0, 1, 3, *SWEEP_SCORES,
                                                           api_name="/sweep")
    assert status.startswith("**Done**: 3 points")
    with open(csv_path) as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["t", "ppl A", "ppl B", "reverse probes", "history id"] and len(rows) == 4
    assert [float(r[0]) for r in rows[1:]] == [0, 0.5, 1]
    assert float(rows[1][3]) == 0 < float(rows[3][3])  # the json child cannot reverse; the reverse child can
    assert [c[1] for c in points["choices"]] == [0, 1, 2]
    history = client.predict(api_name="/history")["data"]
    ids = [int(r[-1]) for r in rows[1:]]
    recorded = {row[0]: row for row in history}
    assert all(recorded[i][2] == "sweep point" and "reverse probes" in recorded[i][4] for i in ids)
    loaded = client.predict(1, api_name="/sweep_point")
    assert load_config(loaded).parameters["t"] == 0.5
    restored, _, message = client.predict(ids[1], api_name="/restore")
    assert restored == loaded and f"#{ids[1]}" in message


def test_a_layer_range_sweep_and_the_stop_button(server, demo_family):
    from gradio_client import Client

    client = Client(server, verbose=False)
    job = client.submit(lab_recipe(demo_family), "t@layers", 10, 19, 0, 1, 12, *SWEEP_SCORES[:4], [], 2,
                        api_name="/sweep")
    deadline = time.time() + 120
    while time.time() < deadline and len(job.outputs()) < 3:  # the start message, then a point
        time.sleep(0.2)
    assert "Stopping" in client.predict(api_name="/sweep_stop")
    plot, table, status, csv_path, points = job.result(timeout=300)
    assert "(stopped)" in status
    with open(csv_path) as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0] == "t@layers:10-19" and 2 <= len(rows) < 13


def test_history_restores_exactly_what_was_merged(server, demo_family):
    from gradio_client import Client

    client = Client(server, verbose=False)
    recipe = lab_recipe(demo_family).replace("t: 0.5", "t: 0.35")
    status = client.predict(recipe, api_name="/merge")
    entry = int(status.split("history #")[1].split(")")[0])
    top = client.predict(api_name="/history")["data"][0]
    assert top[0] == entry and top[2] == "merge" and top[3] == "slerp t=0.35: smollm2-json, smollm2-reverse"
    restored, moe, message = client.predict(entry, api_name="/restore")
    assert restored == recipe.strip()  # as recorded; gr.Code shows values stripped of outer whitespace
    with pytest.raises(Exception, match="no merge #999999 in your history"):
        client.predict(999999, api_name="/restore")


class Request:
    def __init__(self, session_hash):
        self.session_hash = session_hash


def test_public_deployments_keep_each_users_history_apart(tmp_path, monkeypatch):
    from merging.history import History
    from ui import session
    from ui.common import remember
    from ui.history_panel import list_history, restore

    monkeypatch.setattr(session, "_HISTORY", History(tmp_path / "h.sqlite"))
    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    mine = remember("models: [a]\n", "merge", Request("alice"))
    remember("models: [b]\n", "merge", Request("bob"))
    assert [row[0] for row in list_history(Request("alice"))] == [mine]
    assert restore(mine, Request("alice"))[0] == "models: [a]\n"
    with pytest.raises(Exception, match=f"no merge #{mine}"):
        restore(mine, Request("bob"))
    monkeypatch.delenv("MERGELAB_PUBLIC")  # locally, one user: every session shares the history
    assert list_history(Request("x")) == []  # ... of the local user, who has recorded nothing here


def test_publish_merges_with_scores_in_the_card_and_pushes(demo_cache, demo_family, tmp_path, monkeypatch):
    from fake_hub import FakeHub
    from transformers import AutoConfig

    from merging.history import History
    from ui import session
    from ui.common import remember
    from ui.publish_panel import publish

    monkeypatch.setattr(session, "_HISTORY", History(tmp_path / "h.sqlite"))
    recipe = lab_recipe(demo_family)
    remember(recipe, "sweep point", None, None, {"reverse probes": 0.5})
    with FakeHub({}, storage=tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        message = publish(recipe, "demo-merge", True, "hf_good", progress=lambda *a, **k: None)
        assert "Published" in message and "tester/demo-merge" in message
        pushed = tmp_path / "hub" / "tester" / "demo-merge"
        assert AutoConfig.from_pretrained(pushed).model_type == "llama"
        card = (pushed / "README.md").read_text()
        assert "## Scores" in card and "| reverse probes | 0.5 |" in card and "merge_method: slerp" in card
        with pytest.raises(Exception, match="the hub refused the token"):  # before any merging
            publish(recipe, "other", True, "hf_nope", progress=lambda *a, **k: None)
        assert [r for r in hub.requests if r[1] == "/api/repos/create"] == [("POST", "/api/repos/create", "")]
    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    monkeypatch.setenv("MERGELAB_CACHE", str(demo_cache))  # the demo models stay allowed
    with pytest.raises(Exception, match="sign in with Hugging Face, or paste a token"):
        publish(recipe, "x", True, "", progress=lambda *a, **k: None)
