"""LiveMerge: the in-memory merge equals merge()'s files, and updates touch only what changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import load_tensors
from merging import merge
from merging.generation import Sampling, generate, load_model
from merging.live import LiveMerge
from test_mergekit_equality import CONFIGS

RANDOM_CONFIGS = {
    "dare_ties": """
models:
  - model: {c1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {c2}
    parameters: {{weight: 0.5, density: 0.7}}
merge_method: dare_ties
base_model: {base}
dtype: float32
""",
    "della": """
models:
  - model: {c1}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}
  - model: {c3}
    parameters: {{weight: 0.5, density: 0.6, epsilon: 0.2}}
merge_method: della
base_model: {base}
dtype: float32
""",
}
ALL = {**CONFIGS, **RANDOM_CONFIGS}

SLERP = """
models:
  - model: {c1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - value: {t}
dtype: float32
"""


def paths(tiny, **extra):
    return {**{k: tiny.path(k) for k in tiny}, **extra}


@pytest.mark.parametrize("case", sorted(ALL))
def test_live_model_equals_what_merge_writes(case, tiny, tmp_path):
    text = ALL[case].format(**paths(tiny))
    written = load_tensors(merge(text, tmp_path / "out", device="cpu", seed=5))
    live = LiveMerge(text, device="cpu", seed=5)
    state = live.model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name


def test_update_recomputes_only_changed_tensors(tiny):
    live = LiveMerge(SLERP.format(**paths(tiny, t=0.5)), device="cpu")
    attention = live.model.model.layers[1].self_attn.q_proj.weight
    before = attention.detach().clone()
    pointer = attention.data_ptr()
    stats = live.update(SLERP.format(**paths(tiny, t=0.8)))
    # everything but the 4 attention projections of each of the 4 layers follows t
    assert (stats.recomputed, stats.skipped) == (39 - 16, 16)
    assert not stats.rebuilt
    assert torch.equal(live.model.model.layers[1].self_attn.q_proj.weight, before)
    assert live.model.model.layers[1].self_attn.q_proj.weight.data_ptr() == pointer  # same model, in place
    again = live.update(SLERP.format(**paths(tiny, t=0.8)))
    assert again.recomputed == 0


def test_updated_model_equals_a_fresh_merge(tiny, tmp_path):
    live = LiveMerge(SLERP.format(**paths(tiny, t=0.1)), device="cpu")
    live.update(SLERP.format(**paths(tiny, t=0.9)).replace("[0, 0.5, 1]", "[1, 0.2, 0.4]"))
    written = load_tensors(merge(SLERP.format(**paths(tiny, t=0.9)).replace("[0, 0.5, 1]", "[1, 0.2, 0.4]"),
                                 tmp_path / "out"))
    state = live.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.items())


def test_method_change_recomputes_in_place_and_model_change_rebuilds(tiny):
    live = LiveMerge(SLERP.format(**paths(tiny, t=0.5)), device="cpu")
    model = live.model
    linear = (f"models:\n  - model: {tiny.path('base')}\n    parameters: {{weight: 0.5}}\n"
              f"  - model: {tiny.path('c1')}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n"
              "dtype: float32\n")
    stats = live.update(linear)
    assert not stats.rebuilt and stats.recomputed == 39 and live.model is model
    stats = live.update(linear.replace(tiny.path("c1"), tiny.path("c2")))
    assert stats.rebuilt and "models changed" in stats.reason


def test_new_passthrough_slices_rebuild_and_say_so(tiny):
    text = ("slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n  - sources:\n"
            "      - model: {c1}\n        layer_range: [1, 4]\nmerge_method: passthrough\ndtype: float32\n")
    live = LiveMerge(text.format(**paths(tiny)), device="cpu")
    assert live.model.config.num_hidden_layers == 5
    stats = live.update(text.replace("[1, 4]", "[2, 4]").format(**paths(tiny)))
    assert stats.rebuilt and "layers or shapes changed" in stats.reason
    assert live.model.config.num_hidden_layers == 4


def test_random_methods_repeat_with_the_same_seed(tiny):
    text = RANDOM_CONFIGS["dare_ties"].format(**paths(tiny))
    first = LiveMerge(text, device="cpu", seed=3).model.state_dict()
    second = LiveMerge(text, device="cpu", seed=3).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_slerp_statistics_are_cached_between_updates(tiny):
    live = LiveMerge(SLERP.format(**paths(tiny, t=0.5)), device="cpu")
    cached = len(live.statistics_cache)
    assert cached == 39 and live.cache_bytes == 39 * 3 * 8
    live.update(SLERP.format(**paths(tiny, t=0.7)))
    assert len(live.statistics_cache) == cached  # reused, not recomputed or grown


def test_t0_answers_exactly_as_the_base_model(tiny):
    live = LiveMerge(SLERP.format(**paths(tiny, t=0.0)).replace("[0, 0.5, 1]", "0"), device="cpu")
    base, tokenizer = load_model(tiny["base"])
    sampling = Sampling(max_new_tokens=8)
    assert live.generate("the cat sat", sampling).text == generate(base, tokenizer, "the cat sat", sampling).text
    child, _ = load_model(tiny["c1"])
    live.update(SLERP.format(**paths(tiny, t=1.0)).replace("[0, 0.5, 1]", "1"))
    assert live.generate("the cat sat", sampling).text == generate(child, tokenizer, "the cat sat", sampling).text


def test_stream_yields_pieces_then_the_whole_answer(tiny):
    live = LiveMerge(SLERP.format(**paths(tiny, t=0.5)), device="cpu")
    pieces = list(live.stream("the cat", Sampling(max_new_tokens=6, temperature=0.8, seed=1)))
    final = pieces[-1]
    assert "".join(pieces[:-1]) == final.text and final.new_tokens == 6 and final.tokens_per_second > 0
    again = live.generate("the cat", Sampling(max_new_tokens=6, temperature=0.8, seed=1))
    assert again.text == final.text  # same seed, same sampled answer


TIES = """
models:
  - model: {c1}
    parameters: {{weight: {w1}, density: {d1}}}
  - model: {c2}
    parameters: {{weight: 0.5, density: 0.7}}
merge_method: {method}
base_model: {base}
dtype: float32
"""


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_weight_changes_reuse_pruning_rules_and_density_changes_reuse_histograms(method, tiny, tmp_path):
    text = lambda w1, d1=0.5: TIES.format(**paths(tiny, w1=w1, d1=d1, method=method))  # noqa: E731
    live = LiveMerge(text(0.5), device="cpu", seed=2)
    cache = live.tensor_cache
    per_model = 2 if method == "ties" else 1  # a rule per model and tensor; TIES's also a histogram of |d|
    assert cache.misses == per_model * 2 * 39 and cache.hits == 0 and live.cache_bytes > 0
    stats = live.update(text(0.9))
    assert stats.recomputed == 39 and cache.hits == 2 * 39 and cache.misses == per_model * 2 * 39
    written = load_tensors(merge(text(0.9), tmp_path / "out", seed=2))
    state = live.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.items())
    hits, misses = cache.hits, cache.misses
    live.update(text(0.9, d1=0.3))  # the first model's rules again (TIES: from its cached histograms)
    assert cache.misses == misses + 39 and cache.hits == hits + 39 + (39 if method == "ties" else 0)
    written = load_tensors(merge(text(0.9, d1=0.3), tmp_path / "out2", seed=2))
    state = live.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.items())


def test_a_zero_cache_budget_stores_nothing_and_stays_correct(tiny, tmp_path):
    text = TIES.format(**paths(tiny, w1=0.3, d1=0.5, method="ties"))
    live = LiveMerge(text, device="cpu", cache_budget_bytes=0)
    assert live.tensor_cache.bytes == 0 and live.cache_bytes == 0
    written = load_tensors(merge(text, tmp_path / "out"))
    state = live.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.items())


def test_generate_many_gives_every_model_the_same_prompt_seed_and_settings(tiny):
    from merging.generation import generate_many
    base, tokenizer = load_model(tiny["base"])
    child, _ = load_model(tiny["c1"])
    sampling = Sampling(max_new_tokens=6, temperature=0.9, top_k=20, seed=4)
    answers = generate_many({"a": (base, tokenizer), "a again": (base, tokenizer), "b": (child, tokenizer)},
                            "the dog", sampling)
    assert answers["a"].text == answers["a again"].text  # same seed: same draws
    assert set(answers) == {"a", "a again", "b"} and all(1 <= g.new_tokens <= 6 for g in answers.values())


def test_an_unknown_architecture_needs_trust_remote_code(tiny, tmp_path):
    import json
    import shutil

    from merging import MergeError
    custom = tmp_path / "custom"
    shutil.copytree(tiny["c1"], custom)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "mergelab-custom"
    (custom / "config.json").write_text(json.dumps(config))
    text = f"models:\n  - model: {custom}\nmerge_method: passthrough\n"
    with pytest.raises(MergeError, match="needs trust_remote_code, which is off"):
        LiveMerge(text, device="cpu")


def test_a_merge_of_weights_without_a_tokenizer_is_live_but_says_why_it_cannot_chat(tiny, tmp_path):
    import shutil

    from merging import MergeError
    bare = {}
    for name in ("base", "c1"):
        bare[name] = tmp_path / name
        bare[name].mkdir()
        for file in Path(tiny[name]).iterdir():
            if file.suffix in (".safetensors", ".json") and "token" not in file.name:
                shutil.copy(file, bare[name] / file.name)
    text = (f"merge_method: slerp\nbase_model: {bare['base']}\nmodels:\n  - model: {bare['base']}\n"
            f"  - model: {bare['c1']}\nparameters:\n  t: 0.5\n")
    live = LiveMerge(text, device="cpu")
    assert live.tokenizer is None and live.update(text.replace("t: 0.5", "t: 0.6")).recomputed > 0
    with pytest.raises(MergeError, match="no tokenizer"):
        live.generate("hello")
