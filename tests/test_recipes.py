"""Recipes as people write them: published-style mergekit YAML runs here as it runs in
mergekit 0.1.5 (the reference), keys mergekit ignores are warnings (errors with strict),
multi-stage files whose later stages need an earlier stage's files, shipped chat templates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import assert_same_config, run_mergekit

MERGEKIT_TEMPLATES = Path(__import__("mergekit").__file__).parent / "_data" / "chat_templates"
CONVERSATIONS = {
    "two turns": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! \n"},
                  {"role": "user", "content": "How are you?"}],
    "system first": [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
    "one message": [{"role": "user", "content": "  spaced  "}],
}


# ---- (d) chat templates --------------------------------------------------------------
def test_every_mergekit_template_name_is_shipped():
    from merging.folder import TEMPLATES

    ours = {p.stem for p in TEMPLATES.glob("*.jinja")}
    theirs = {p.stem for p in MERGEKIT_TEMPLATES.glob("*.jinja")}
    assert theirs <= ours, f"mergekit ships {sorted(theirs - ours)}, we do not"


@pytest.mark.parametrize("name", sorted(p.stem for p in MERGEKIT_TEMPLATES.glob("*.jinja")))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_shipped_template_renders_as_mergekits(name, conversation, generation_prompt, tiny):
    from transformers import AutoTokenizer

    from merging.folder import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    render = lambda template: tokenizer.apply_chat_template(  # noqa: E731
        CONVERSATIONS[conversation], chat_template=template, tokenize=False,
        add_generation_prompt=generation_prompt)
    expected = render((MERGEKIT_TEMPLATES / f"{name}.jinja").read_text())
    assert render(resolve_chat_template(name, [])) == expected


def test_merged_folder_chat_template_equals_mergekits(tiny, tmp_path):
    from transformers import AutoTokenizer

    from merging import merge

    text = (f"models:\n  - model: {tiny.path('c1')}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tiny.path('c2')}\n    parameters: {{weight: 0.5}}\n"
            "merge_method: linear\nchat_template: llama3\ndtype: float32\n")
    theirs = AutoTokenizer.from_pretrained(run_mergekit(text, tmp_path / "mergekit"))
    ours = AutoTokenizer.from_pretrained(merge(text, tmp_path / "ours"))
    messages = CONVERSATIONS["two turns"]
    rendered = [t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for t in (ours, theirs)]
    assert rendered[0] == rendered[1]
    assert "<|eot_id|>\n<|start_header_id|>" in rendered[0]


# ---- published-style recipes: parse, plan, merge, equal mergekit's merge --------------
RECIPES = Path(__file__).parent / "recipes"
RANDOM_METHODS = {"dare_ties", "della"}  # mergekit draws other random numbers: compared by structure
DTYPES = {"float32": "torch.float32", "bfloat16": "torch.bfloat16", "float16": "torch.float16"}


def recipe_text(name: str, tiny) -> str:
    """A recipe file with its {base}, {c1}, ... placeholders replaced by the tiny models' folders
    (plain replacement: the files keep YAML's own braces, as people write them)."""
    text = (RECIPES / f"{name}.yaml").read_text()
    for key in tiny:
        text = text.replace("{" + key + "}", tiny.path(key))
    return text


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_published_recipe_merges_as_mergekit_does(name, tiny, tmp_path):
    """Parsed (with exactly the expected has-no-effect warnings, errors when strict), planned
    and merged as written (output in the recipe's dtype); then, in float32 (mergekit computes in
    the recipe's dtype, MergeLab in float32 and casts once), equal to mergekit's merge."""
    import yaml

    from helpers import load_tensors, max_relative_error, run_mergekit_multi
    from merging import MergeConfig, MergeError, merge, plan_stages
    from merging.config import check_strict

    text = recipe_text(name, tiny)
    config = MergeConfig.from_yaml(text)
    expected_ignored = int(re.search(r"^# expect-ignored: (\d+)$", text, re.MULTILINE)[1])
    assert len(config.ignored) == expected_ignored, config.ignored
    assert all("has no effect" in note for note in config.ignored)
    if expected_ignored:
        with pytest.raises(MergeError, match="has no effect"):
            check_strict(config)
    documents = list(yaml.safe_load_all(text))
    assert len(plan_stages(config)) == len(documents)
    as_written = load_tensors(merge(config, tmp_path / "as-written", device="cpu"))
    dtype = documents[-1].get("dtype", "float32")
    assert {str(t.dtype) for t in as_written.values()} == {DTYPES[dtype]}

    in_float32 = re.sub(r"^dtype: \w+$", "dtype: float32", text, flags=re.MULTILINE)
    ours = merge(in_float32, tmp_path / "ours", device="cpu")
    if len(documents) > 1:
        theirs = run_mergekit_multi(in_float32, tmp_path / "mergekit", tmp_path / "mergekit-stages")
    else:
        theirs = run_mergekit(in_float32, tmp_path / "mergekit")
    ours_tensors, their_tensors = load_tensors(ours), load_tensors(theirs)
    if documents[-1]["merge_method"] in RANDOM_METHODS:
        assert {k: v.shape for k, v in ours_tensors.items()} == {k: v.shape for k, v in their_tensors.items()}
    else:
        # mergekit's own union vocabularies differ from run to run by ~5e-5 on the added tokens' rows
        tolerance = 1e-4 if "tokenizer_source: union" in text else 1e-5
        assert max_relative_error(ours_tensors, their_tensors) < tolerance
    assert_same_config(ours, theirs)


def test_recipes_cover_what_people_publish():
    methods = {yaml_document["merge_method"] for p in RECIPES.glob("*.yaml")
               for yaml_document in __import__("yaml").safe_load_all(p.read_text())}
    assert {"slerp", "ties", "dare_ties", "della", "model_stock", "sce", "breadcrumbs", "passthrough"} <= methods
    assert 8 <= len(list(RECIPES.glob("*.yaml"))) <= 12


# ---- (a) keys mergekit ignores: warnings that say where they belong; strict: errors ----
BASE_RECIPE = ("models:\n  - model: a/b\n    parameters: {weight: 1, density: 0.5}\nmerge_method: ties\n"
               "base_model: a/c\n")
SCE_RECIPE = "models:\n  - model: a/b\nmerge_method: sce\nbase_model: a/c\n"
IGNORED_KEYS = {
    "int8_mask at the top level": (BASE_RECIPE + "int8_mask: true\n",
                                   "top-level key 'int8_mask' has no effect (mergekit ignores it); "
                                   "did you mean parameters.int8_mask?"),
    "select_topk at the top level": (SCE_RECIPE + "select_topk: 0.5\n",
                                     "top-level key 'select_topk' has no effect (mergekit ignores it); "
                                     "did you mean parameters.select_topk?"),
    "int8_mask under a model": (BASE_RECIPE.replace("density: 0.5", "density: 0.5, int8_mask: true"),
                                "parameter 'int8_mask' of model 'a/b' has no effect (mergekit reads ties's global "
                                "parameters only from the top-level and slice parameters); "
                                "did you mean parameters.int8_mask?"),
    "int8_mask beside a model's parameters": (BASE_RECIPE.replace("merge_method",
                                                                  "    int8_mask: true\nmerge_method"),
                                              "key 'int8_mask' in models[0] has no effect (mergekit ignores it); "
                                              "did you mean parameters.int8_mask?"),
    "pad_to_multiple_of at the top level": (BASE_RECIPE + "pad_to_multiple_of: 64\n",
                                            "top-level key 'pad_to_multiple_of' has no effect (mergekit ignores "
                                            "it); did you mean tokenizer.pad_to_multiple_of?"),
    "pad_to_multiple_of in parameters": (BASE_RECIPE + "parameters: {pad_to_multiple_of: 64}\n",
                                         "parameter 'pad_to_multiple_of' in the top-level parameters has no "
                                         "effect on ties (mergekit ignores it); did you mean "
                                         "tokenizer.pad_to_multiple_of?"),
    "sce's smooth": (SCE_RECIPE + "parameters: {smooth: true}\n",
                     "parameter 'smooth' in the top-level parameters has no effect on sce (mergekit ignores it)"),
    "a misspelt parameter": (BASE_RECIPE.replace("density", "desnity"),
                             "parameter 'desnity' of model 'a/b' has no effect on ties (mergekit ignores it); "
                             "did you mean 'density'?"),
    "another method's parameter": (BASE_RECIPE + "parameters: {select_topk: 0.5}\n",
                                   "parameter 'select_topk' in the top-level parameters has no effect on ties "
                                   "(mergekit ignores it); sce takes it"),
    # (b) keys inside a model entry or a slice source
    "revision beside a model": (BASE_RECIPE.replace("    parameters", "    revision: main\n    parameters"),
                                "key 'revision' in models[0] has no effect (mergekit ignores it); "
                                "did you mean model: NAME@REVISION?"),
    "revision in a slice source": ("slices:\n  - sources:\n      - model: a/b\n        layer_range: [0, 2]\n"
                                   "        revision: main\nmerge_method: passthrough\n",
                                   "key 'revision' in slices[0].sources[0] has no effect (mergekit ignores it); "
                                   "did you mean model: NAME@REVISION?"),
    "a key in the tokenizer block": (BASE_RECIPE + "tokenizer: {source: base, pad_to: 8}\n",
                                     "key 'pad_to' in tokenizer has no effect (mergekit ignores it)"),
    "residual_weight": ("slices:\n  - sources:\n      - model: a/b\n        layer_range: [0, 2]\n"
                        "    residual_weight: 0.5\nmerge_method: passthrough\n",
                        "key 'residual_weight' in slices[0] has no effect (mergekit accepts it but never uses it)"),
}


@pytest.mark.parametrize("case", sorted(IGNORED_KEYS))
def test_a_key_mergekit_ignores_is_a_warning_and_strict_makes_it_an_error(case):
    import yaml
    from mergekit.config import MergeConfiguration

    from merging import MergeConfig, MergeError
    from merging.config import check_strict

    text, message = IGNORED_KEYS[case]
    MergeConfiguration.model_validate(yaml.safe_load(text))  # mergekit takes the recipe
    config = MergeConfig.from_yaml(text)
    assert config.warnings == [message] and config.ignored == [message]
    with pytest.raises(MergeError, match=re.escape(message)):
        check_strict(config)


INVALID_FOR_MERGEKIT_TOO = {
    "two @": ("models:\n  - model: a/b@x@y\nmerge_method: linear\n", "has more than one '@'"),
    "two +": ("models:\n  - model: a/b+c/d+e/f\nmerge_method: linear\n", "has more than one '+'"),
    "a mapping without model": ("models:\n  - model: {path: a/b}\nmerge_method: linear\n", "needs a 'model' key"),
    "empty modules": ("merge_method: linear\nmodules: {}\n", "exactly one of 'models', 'slices' or 'modules'"),
    "a module with models and slices": (
        "merge_method: linear\nmodules:\n  text_decoder:\n    models: [{model: a/b}]\n"
        "    slices: [{sources: [{model: a/b, layer_range: [0, 2]}]}]\n", "modules.text_decoder: give either"),
    "no models": ("merge_method: linear\nmodel:\n  - model: a/b\n", "unknown key 'model' (did you mean 'models'?)"),
}


@pytest.mark.parametrize("case", sorted(INVALID_FOR_MERGEKIT_TOO))
def test_keys_mergekit_refuses_stay_errors(case):
    import yaml
    from mergekit.config import MergeConfiguration

    from merging import MergeConfig, MergeError

    text, message = INVALID_FOR_MERGEKIT_TOO[case]
    with pytest.raises(Exception):
        MergeConfiguration.model_validate(yaml.safe_load(text))
    with pytest.raises(MergeError, match=re.escape(message)):
        MergeConfig.from_yaml(text)


# ---- (b) model references as mergekit reads them ---------------------------------------
@pytest.mark.parametrize("reference", [
    "org/name", "org/name@v1.2", "org/name+org/adapter", "org/name@main+org/adapter@r2",
    {"model": "org/name"}, {"model": {"path": "org/name", "revision": "v1"}},
    {"model": "org/name", "lora": "org/adapter"},
    {"model": {"path": "org/name"}, "lora": {"path": "org/adapter", "revision": "r2"}},
])
def test_model_references_mean_what_they_mean_to_mergekit(reference):
    import yaml
    from mergekit.config import MergeConfiguration

    from merging import MergeConfig

    text = yaml.safe_dump({"models": [{"model": reference}], "merge_method": "passthrough"})
    theirs = MergeConfiguration.model_validate(yaml.safe_load(text)).models[0].model
    config = MergeConfig.from_yaml(text)
    assert config.models[0].model == str(theirs)
    assert config.warnings == []


def test_a_key_mergekit_ignores_in_a_model_mapping_is_a_warning():
    from merging import MergeConfig

    config = MergeConfig.from_yaml("models:\n  - model: {model: org/name, revision: v1}\n"
                                   "merge_method: passthrough\n")
    assert config.models[0].model == "org/name"  # mergekit reads no revision there either
    assert config.warnings == ["key 'revision' in the model reference (models[0]) has no effect (mergekit ignores "
                               "it); did you mean model: NAME@REVISION?"]


def test_a_tokenizer_block_without_source_is_a_union_as_in_mergekit():
    from mergekit.config import MergeConfiguration

    from merging import MergeConfig

    text = "models:\n  - model: a/b\nmerge_method: passthrough\ntokenizer: {pad_to_multiple_of: 8}\n"
    assert MergeConfiguration.model_validate(__import__("yaml").safe_load(text)).tokenizer.source == "union"
    assert MergeConfig.from_yaml(text).tokenizer == {"source": "union", "pad_to_multiple_of": 8}


# ---- the command line and the app -------------------------------------------------------
def test_cli_warns_and_strict_refuses_even_in_a_dry_run(tiny, tmp_path):
    from helpers import run_cli

    path = tmp_path / "recipe.yml"
    path.write_text(recipe_text("quirks_sce_smooth", tiny))
    result = run_cli(path, tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert ("warning: top-level key 'select_topk' has no effect (mergekit ignores it); did you mean "
            "parameters.select_topk?") in result.stderr
    strict = run_cli(path, tmp_path / "out", "--dry-run", "--strict")
    assert strict.returncode == 2
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "has no effect" in lines[0], strict.stderr
    assert "(and 2 more such keys)" in lines[0]
    assert not (tmp_path / "out").exists()
    clean = tmp_path / "clean.yml"
    clean.write_text(recipe_text("sce_select_topk", tiny))
    assert run_cli(clean, tmp_path / "out", "--dry-run", "--strict").returncode == 0


def test_app_recipe_check_has_a_strict_switch(tiny):
    import gradio as gr

    from ui.recipe_panel import check_recipe

    recipe = recipe_text("quirks_sce_smooth", tiny)
    assert "top-level key 'select_topk' has no effect" in check_recipe(recipe)
    with pytest.raises(gr.Error, match="has no effect"):
        check_recipe(recipe, True)


# ---- (c) a later stage whose tokenizer comes from an earlier stage ----------------------
def test_union_over_an_earlier_stage_is_checked_up_front_and_planned_once_it_exists(tiny, tmp_path):
    from merging import MergeError, plan_stages

    text = recipe_text("multi_stage_union", tiny)
    plans = plan_stages(text)
    assert any("planned once that stage is written" in w for w in plans[-1].warnings)
    # everything else is still checked before any work: models, methods, parameters
    first, final = text.split("---\n")
    for broken, message in [(first + "---\n" + final.replace("model: wider", "model: widr"), "'widr' is neither"),
                            (first + "---\n" + final.replace("weight: 0.6", "weight: [0, yes]"),
                             "weight must be a number"),
                            (first + "---\n" + final.replace("method: linear", "method: linaer"),
                             "unknown merge_method 'linaer'"),
                            (first + "---\n" + final.replace(tiny.path("c2"), tiny.path("wide")),
                             "has hidden size 64")]:
        with pytest.raises(MergeError, match=message):
            plan_stages(broken)
