"""`python app.py` starts a real Gradio server, and its API checks a recipe."""

from __future__ import annotations

import pytest


def test_app_serves_the_page(server):
    import urllib.request
    with urllib.request.urlopen(server, timeout=10) as response:
        assert "MergeLab" in response.read().decode()


def test_the_default_recipe_merges_the_offline_demo_family(server, demo_family):
    from gradio_client import Client

    from ui.recipe_panel import default_recipe

    recipe = default_recipe({name: str(path) for name, path in demo_family.items()})
    assert str(demo_family["json"]) in recipe and str(demo_family["reverse"]) in recipe
    plan = Client(server, verbose=False).predict(recipe, api_name="/check_recipe")
    assert "output: 30 layers, 272 tensors" in plan


def test_check_recipe_over_the_api(server, tiny):
    from gradio_client import Client

    client = Client(server, verbose=False)
    recipe = (f"models:\n  - model: {tiny.path('c1')}\nmerge_method: slerp\n"
              f"base_model: {tiny.path('base')}\nparameters: {{t: 0.5}}\n")
    plan = client.predict(recipe, api_name="/check_recipe")
    assert "output: 4 layers, 39 tensors" in plan
    with pytest.raises(Exception, match="unknown merge_method"):
        client.predict(recipe.replace("slerp", "slurp"), api_name="/check_recipe")


def test_public_deployment_refuses_local_paths_but_not_the_demo_models(tiny, demo_cache, demo_family,
                                                                       monkeypatch):
    import gradio as gr

    from ui.recipe_panel import check_recipe
    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    monkeypatch.setenv("MERGELAB_CACHE", str(demo_cache))
    recipe = f"models:\n  - model: {tiny.path('c1')}\nmerge_method: passthrough\n"
    with pytest.raises(gr.Error, match="local paths are disabled"):
        check_recipe(recipe)
    demo = f"models:\n  - model: {demo_family['json']}\nmerge_method: passthrough\n"
    assert "output: 30 layers" in check_recipe(demo)


def last_answer(history) -> str:
    content = history[-1]["content"]
    if isinstance(content, list):  # Gradio may send content as a list of blocks
        content = "".join(block.get("text", "") if isinstance(block, dict) else str(block) for block in content)
    return content


def test_lab_merges_answers_beside_its_parents_and_updates_in_place(server, demo_family):
    from gradio_client import Client

    from ui.lab import LAB_RECIPE

    client = Client(server, verbose=False)
    recipe = LAB_RECIPE.format(**{name: str(path) for name, path in demo_family.items()})
    at_zero = client.predict(recipe, 0.0, api_name="/set_t")
    assert "t: 0.0" in at_zero
    assert "Merged" in client.predict(at_zero, api_name="/merge")
    prompt = "Reverse the words: red lamp quiet"
    a, b, merged, speed = client.predict(prompt, 24, 0, 0, False, api_name="/ask")
    assert last_answer(merged) == last_answer(a) != last_answer(b)  # t=0 is model A, greedy
    assert "tokens/s" in speed
    at_one = client.predict(recipe, 1.0, api_name="/set_t")
    status = client.predict(at_one, api_name="/merge")
    assert "recomputed 272 of 272 tensors" in status and "rebuilt" not in status
    a, b, merged, _ = client.predict(prompt, 24, 0, 0, False, api_name="/ask")
    assert last_answer(merged) == last_answer(b) == "quiet lamp red"
    panes = client.predict(prompt, 24, 0, 0, True, api_name="/ask")
    assert sorted(last_answer(p) for p in panes[:3]) == sorted(last_answer(p) for p in (a, b, merged))
    assert "pane 1" in panes[3] and "smollm2" not in panes[3]  # names hidden until the vote
    revealed = client.predict("pane 2", api_name="/vote")
    assert "You preferred pane 2" in revealed and "merged" in revealed


def test_lab_diagnostics_return_rows_and_a_heatmap(server, demo_family):
    from gradio_client import Client

    from ui.lab import LAB_RECIPE

    recipe = LAB_RECIPE.format(**{name: str(path) for name, path in demo_family.items()})
    plot, curves, records = Client(server, verbose=False).predict(recipe, "angle_deg", api_name="/diagnostics")
    assert len(records) == 272 and {"layer", "module", "angle_deg", "slerp_fallback"} <= set(records[0])
    assert plot is not None and curves is not None


def test_lab_errors_are_readable(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="press Merge first"):
        client.predict("hello", 8, 0, 0, False, api_name="/ask")
    with pytest.raises(Exception, match="unknown merge_method"):
        client.predict("models:\n  - model: a/b\nmerge_method: slurp\n", api_name="/merge")


def test_per_layer_controls_write_read_and_edit_the_recipe(server, demo_family):
    from gradio_client import Client

    from merging import MergeConfig
    from ui.lab import LAB_RECIPE

    client = Client(server, verbose=False)
    recipe = LAB_RECIPE.format(**{name: str(path) for name, path in demo_family.items()})
    attention, mlp, other = client.predict("LazyMergekit gradient", api_name="/preset")
    assert attention == "0, 0.5, 0.3, 0.7, 1" and mlp == "1, 0.5, 0.7, 0.3, 0" and other == "0.5"
    written, _ = client.predict(recipe, attention, mlp, other, api_name="/set_layers")
    t = MergeConfig.from_yaml(written).parameters["t"]
    assert t == [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    assert client.predict(written, api_name="/read_layers")[:3] == (attention, mlp, other)
    attention, _, _, edited, _ = client.predict(written, attention, mlp, other, "attention", "set", 10, 12, 0.9,
                                                api_name="/edit_layers")
    values = [float(v) for v in attention.split(",")]
    assert len(values) == 30 and values[10:13] == [0.9, 0.9, 0.9] and values[0] == 0 and values[29] == 1
    with pytest.raises(Exception, match="not a list of numbers"):
        client.predict(recipe, "zero", mlp, other, api_name="/set_layers")


def test_save_writes_a_loadable_folder(server, demo_family, tmp_path):
    from gradio_client import Client

    from ui.lab import LAB_RECIPE

    recipe = LAB_RECIPE.format(**{name: str(path) for name, path in demo_family.items()})
    message = Client(server, verbose=False).predict(recipe, str(tmp_path / "saved"), api_name="/save")
    assert "Saved" in message
    assert (tmp_path / "saved" / "model.safetensors").is_file() and (tmp_path / "saved" / "README.md").is_file()


def test_compatibility_verdict_names_what_differs(server, demo_family, tiny):
    from gradio_client import Client

    client = Client(server, verbose=False)
    verdict = client.predict([str(demo_family["json"]), str(demo_family["reverse"]), tiny.path("base")],
                             str(demo_family["base"]), api_name="/compatibility")
    lines = verdict.splitlines()
    assert "reference (base)" in lines[2]
    assert "can merge" in lines[3] and "can merge" in lines[4]
    # the planner's own refusal (merging.compatibility), not a second set of rules
    assert "cannot merge: " in lines[5] and f"model '{tiny.path('base')}' has 4; use slices" in lines[5]


def test_recipe_from_controls_uses_the_declared_parameters(demo_family):
    from merging import MergeConfig
    from ui.builder import recipe_from_controls

    json_model, reverse_model, base = (str(demo_family[k]) for k in ("json", "reverse", "base"))
    text = recipe_from_controls([json_model, reverse_model], base, "ties",
                                {f"{json_model}/weight": 0.7, f"{json_model}/density": 0.4,
                                 f"{reverse_model}/weight": 0.3, f"{reverse_model}/density": 0.6,
                                 "normalize": True, "lambda": 1.0})
    config = MergeConfig.from_yaml(text)
    assert config.merge_method == "ties" and config.base_model == base
    assert config.models[0].parameters == {"weight": 0.7, "density": 0.4}


def test_recipe_from_controls_gives_the_base_a_weight_when_it_is_an_input(demo_family):
    from merging import plan_stages
    from ui.builder import recipe_from_controls

    json_model, base = str(demo_family["json"]), str(demo_family["base"])
    text = recipe_from_controls([json_model], base, "linear",
                                {f"{base}/weight": 0.5, f"{json_model}/weight": 0.5, "normalize": True})
    assert f"model: {base}" in text
    assert plan_stages(text)[0].method.name == "linear"  # every input has its weight


def test_memory_estimate_is_shown_before_loading(demo_family):
    from merging import plan_stages
    from ui.lab import LAB_RECIPE, memory_estimate

    plan = plan_stages(LAB_RECIPE.format(**{k: str(v) for k, v in demo_family.items()}))[0]
    text = memory_estimate(plan)
    assert text.startswith("about 538.1 MB for the merged model")  # 134.5M float32 values
    assert "538.1 MB of source weights mapped" in text  # two bfloat16 children


def test_hub_search_lists_models_and_says_when_offline(tiny, monkeypatch):
    from fake_hub import FakeHub

    from ui.builder import search_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message, _ = search_hub("tiny")
    assert message.startswith("the hub is offline here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with FakeHub({"org/tiny-base": tiny["base"], "org/other": tiny["c1"]}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        message, update = search_hub("tiny")
    assert message.startswith("1 models") and update["choices"] == ["org/tiny-base"]
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    message, _ = search_hub("tiny")
    assert message.startswith("cannot reach the Hugging Face hub")


def test_a_multi_stage_recipe_merges_its_earlier_stages_then_the_last_live(server, demo_family):
    from gradio_client import Client

    paths = {k: str(v) for k, v in demo_family.items()}
    recipe = (f"name: both\nmodels:\n  - model: {paths['reverse']}\nmerge_method: slerp\n"
              f"base_model: {paths['json']}\nparameters: {{t: 0.6}}\ndtype: float32\n---\n"
              f"models:\n  - model: both\nmerge_method: slerp\nbase_model: {paths['base']}\n"
              "parameters: {t: 1.0}\ndtype: float32\n")
    client = Client(server, verbose=False)
    assert "Merged" in client.predict(recipe, api_name="/merge")
    *_, merged, _ = client.predict("Reverse the words: red lamp quiet", 24, 0, 0, False, api_name="/ask")
    assert last_answer(merged) == "quiet lamp red"  # t=1.0: exactly the first stage's 0.6 merge


def test_leaving_frees_the_session_and_its_stage_folders(tmp_path):
    from ui.session import SessionRegistry

    registry = SessionRegistry(tmp_path / "sessions")
    with registry.use("abc") as session:
        session.live = object()
        (session.workdir() / "stages").mkdir()
    folder = session.folder
    assert folder.is_dir() and folder.is_relative_to(tmp_path / "sessions")
    registry.drop("abc")
    assert len(registry) == 0 and not folder.exists() and session.live is None
    with registry.use("abc") as again:
        assert again.live is None  # a new visit starts afresh
    with registry.use("busy") as busy:  # the browser leaves while a handler runs: freed when it returns
        busy.workdir()
        registry.drop("busy")
        assert registry.peek("busy") is busy and busy.folder.exists()
    assert registry.peek("busy") is None and not busy.folder.exists()


def test_public_deployments_never_trust_remote_code(demo_cache, demo_family, monkeypatch):
    from ui.lab import LAB_RECIPE, merge_recipe
    from ui.session import SESSIONS

    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    monkeypatch.setenv("MERGELAB_CACHE", str(demo_cache))
    recipe = LAB_RECIPE.format(**{k: str(v) for k, v in demo_family.items()})
    messages = list(merge_recipe(recipe, True, None, progress=lambda *a, **k: None))
    assert messages[0].startswith("Building: about") and messages[-1].startswith("**Merged** (history #")
    assert SESSIONS.peek(None).live.trust_remote_code is False
    SESSIONS.drop(None)


def test_slerp_t_is_labelled_with_the_models_names():
    from ui.builder import _label

    assert _label("t", "slerp", ["/m/json", "/m/reverse"], "/m/json") == "t (0 = json, 1 = reverse)"
    assert _label("density", "ties", ["a"], "b") == "density"


def test_moe_tab_builds_answers_and_shows_the_routing(server, demo_family):
    from gradio_client import Client

    from merging import load_config
    from merging.demo_skills import moe_recipe

    client = Client(server, verbose=False)
    form = client.predict(moe_recipe(demo_family), api_name="/moe_form")
    assert form[0] == str(demo_family["reverse"]) and form[4] == str(demo_family["json"])
    recipe = client.predict(*form, api_name="/moe_recipe")  # the form writes back the same recipe
    assert load_config(recipe) == load_config(moe_recipe(demo_family))
    status = client.predict(recipe, api_name="/moe_build")
    assert "Built" in status and "2 experts, 1 per token" in status
    history, strip, figure, info = client.predict("Reverse the words: zebra anchor glove", 16, 0, 0,
                                                  api_name="/moe_ask")
    assert history[-1]["content"][0]["text"] == "glove anchor zebra"
    assert strip.count('data-expert="1"') == strip.count("moe-token") > 0  # all to the reverse expert
    assert "smollm2-reverse 4" in info


def test_moe_tab_errors_are_readable(server, demo_family):
    from gradio_client import Client

    client = Client(server, verbose=False)  # a new session: nothing built yet, whatever others built
    with pytest.raises(Exception, match="press Build first"):
        client.predict("hello", 8, 0, 0, api_name="/moe_ask")
    with pytest.raises(Exception, match="needs an 'experts' list"):
        client.predict(f"models:\n  - model: {demo_family['json']}\nmerge_method: linear\n", api_name="/moe_build")
    with pytest.raises(Exception, match="has no positive_prompts"):
        client.predict(str(demo_family["base"]), "hidden", 1, "bfloat16", str(demo_family["json"]), "", "",
                       str(demo_family["reverse"]), "Reverse the words: a b", "", *[""] * 6, api_name="/moe_recipe")
