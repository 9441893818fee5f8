"""Experiments: sweeps that move as theory says, history in SQLite, publishing to a hub."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from merging import MergeError, load_config
from merging.evaluate import perplexity_scorer, sweep, with_parameter
from merging.history import History
from merging.layer_values import expand, points_from_config

TEXT_A = ["the cat sat on the mat", "the red cat sat on a mat", "a cat sat on the red mat"]
TEXT_B = ["blue model layer merge", "merge blue layer model", "model merge layer blue"]


@pytest.fixture(scope="module")
def domain_pair(tiny, tmp_path_factory):
    """Two fine-tunes of the tiny base, each on its own texts."""
    from tiny_models import make_trained

    root = tmp_path_factory.mktemp("domains")
    return (make_trained(tiny["base"], root / "a", TEXT_A, seed=1),
            make_trained(tiny["base"], root / "b", TEXT_B, seed=2))


def slerp(a, b, t=0.5) -> str:
    return f"models:\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\nparameters:\n  t: {t}\ndtype: float32\n"


def test_perplexity_on_each_models_text_moves_monotonically_along_t(domain_pair):
    a, b = domain_pair
    values = [0, 0.25, 0.5, 0.75, 1]
    rows = sweep(slerp(a, b), "t", values, {"ppl_a": perplexity_scorer(TEXT_A), "ppl_b": perplexity_scorer(TEXT_B)},
                 device="cpu")
    ppl_a, ppl_b = [r["ppl_a"] for r in rows], [r["ppl_b"] for r in rows]
    assert ppl_a == sorted(ppl_a) and ppl_a[-1] > 2 * ppl_a[0], ppl_a  # A's text gets harder toward B
    assert ppl_b == sorted(ppl_b, reverse=True) and ppl_b[0] > 2 * ppl_b[-1], ppl_b
    assert load_config(rows[1]["recipe"]).parameters["t"] == 0.25  # each point carries its recipe


def test_a_layer_range_sweep_changes_only_those_layers(tiny):
    config = load_config(slerp(tiny.path("base"), tiny.path("c1"), t=0.2))
    changed = with_parameter(config, "t@layers:1-2", 0.9)
    for points in points_from_config(changed, "t"):
        assert expand(points, 4) == pytest.approx([0.2, 0.9, 0.9, 0.2])
    with pytest.raises(MergeError, match="layers 3..5 are outside 0..3"):
        with_parameter(config, "t@layers:3-5", 0.5)


def test_history_round_trips_and_keeps_users_apart(tmp_path, tiny):
    path = tmp_path / "history.sqlite"
    recipe = slerp(tiny.path("base"), tiny.path("c1"), t=0.3)
    history = History(path)
    first = history.record("ana", recipe)
    history.add_scores(first, "ana", {"ppl_a": 3.5})
    second = history.record("ana", "base_model: x\nexperts: [x]\n", kind="moe")
    history.record("bo", recipe)
    reopened = History(path)  # as after a restart
    entries = reopened.entries("ana")
    assert [e.id for e in entries] == [second, first]
    assert reopened.get(first, "ana").recipe == recipe  # byte for byte
    assert reopened.get(first, "ana").scores == {"ppl_a": 3.5}
    assert entries[1].summary == "slerp t=0.3: base, c1"
    assert len(reopened.entries("bo")) == 1 and reopened.entries("nobody") == []
    with pytest.raises(MergeError, match=f"no merge #{first} in your history"):
        reopened.get(first, "bo")  # another user's entry does not exist for bo
    with pytest.raises(MergeError):
        reopened.add_scores(first, "bo", {"x": 1})
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM merges").fetchone()[0]
    assert rows == 3


def test_history_takes_concurrent_writers(tmp_path):
    history = History(tmp_path / "h.sqlite")
    threads = [threading.Thread(target=lambda i=i: [history.record(f"u{i}", f"r{j}") for j in range(20)])
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(history.entries(f"u{i}")) == 20 for i in range(4))


def test_publish_pushes_a_folder_that_loads(tiny, tmp_path):
    from fake_hub import FakeHub
    from transformers import AutoModelForCausalLM

    from merging import merge
    from merging.publish import push_to_hub

    out = merge(slerp(tiny.path("base"), tiny.path("c1")), tmp_path / "merged")
    with FakeHub({}, storage=tmp_path / "hub") as hub:
        url = push_to_hub(out, "my-merge", token="hf_good", endpoint=hub.url, private=True)
        assert url.endswith("/tester/my-merge") and hub.private["tester/my-merge"] is True
        pushed = tmp_path / "hub" / "tester" / "my-merge"
        model = AutoModelForCausalLM.from_pretrained(pushed)
        assert model.config.num_hidden_layers == 4
        assert (pushed / "README.md").read_text() == (out / "README.md").read_text()

        hub.fail_commits = True  # a failed upload leaves no empty repo behind
        with pytest.raises(MergeError, match="failed .* the new repo was deleted again"):
            push_to_hub(out, "broken", token="hf_good", endpoint=hub.url)
        assert "tester/broken" not in hub.repos
        with pytest.raises(MergeError, match="the hub refused the token"):
            push_to_hub(out, "x", token="hf_wrong", endpoint=hub.url)
        with pytest.raises(MergeError, match="not a valid repo name"):
            push_to_hub(out, "bad name!", token="hf_good", endpoint=hub.url)


def test_publish_says_when_the_hub_is_out_of_reach(tiny, tmp_path, monkeypatch):
    from merging import merge
    from merging.publish import push_to_hub
    from visitors import free_port

    out = merge(slerp(tiny.path("base"), tiny.path("c1")), tmp_path / "merged")
    with pytest.raises(MergeError, match="cannot reach the Hugging Face hub"):
        push_to_hub(out, "x", token="hf_good", endpoint=f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergeError, match="the hub is offline here"):
        push_to_hub(out, "x", token="hf_good")


def test_history_summaries_name_method_and_models(tiny):
    from merging.history import summarize

    stages = (f"name: first\nmodels:\n  - model: {tiny.path('c1')}\nmerge_method: slerp\nbase_model: "
              f"{tiny.path('base')}\nparameters: {{t: 0.5}}\n---\nmodels:\n  - model: first\n  - model: "
              f"{tiny.path('c2')}\nmerge_method: linear\n")
    assert summarize(stages) == "slerp t=0.5: base, c1 | linear: [first], c2 (2 stages)"
    assert summarize(f"base_model: {tiny.path('base')}\ngate_mode: random\nexperts:\n  - source_model: "
                     f"{tiny.path('c1')}\n  - source_model: {tiny.path('c2')}\n") == "moe random 2 per token: base, c1, c2"
    assert summarize("merge_method: [") == "(unreadable recipe)"


def test_history_summaries_tell_merges_apart(tiny):
    """Rows of the same method and models differ by their parameters: t, per-layer
    gradients (shortened), filters, per-model weights and densities."""
    from merging.history import summarize

    base, c1, c2 = tiny.path("base"), tiny.path("c1"), tiny.path("c2")
    head = f"models:\n  - model: {c1}\nmerge_method: slerp\nbase_model: {base}\n"
    assert summarize(head + "parameters: {t: 0.25}\n") == "slerp t=0.25: base, c1"
    assert summarize(head + "parameters: {t: 0.75}\n") == "slerp t=0.75: base, c1"
    assert summarize(head + "parameters: {t: [0, 0.5, 1]}\n") == "slerp t=[0, 0.5, 1]: base, c1"
    assert summarize(head + "parameters: {t: [0, 0.2, 0.4, 0.6, 1]}\n") == "slerp t=[0 .. 1, 5 points]: base, c1"
    filters = head + "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - value: 0.5\n"
    assert summarize(filters) == "slerp t=self_attn [0, 1], else 0.5: base, c1"
    ties = (f"models:\n  - model: {c1}\n    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {c2}\n"
            f"    parameters: {{weight: 0.3, density: 0.7}}\nmerge_method: ties\nbase_model: {base}\n")
    assert summarize(ties) == "ties: base, c1 (weight=0.5 density=0.6), c2 (weight=0.3 density=0.7)"
    long = head + "parameters: {t: 0.5}\n" + "".join(f"# {i}\n" for i in range(3))
    assert len(summarize(long.replace(c1, c1 + "/" + "x" * 300))) <= 240
