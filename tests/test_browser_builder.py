"""Build a recipe in Chromium as a person does: every control the method registry generates
is live and writes the recipe; the builder's defaults merge as they are; a failed write says
why under its button; the per-layer editor shapes the values the method takes (each model's
weight and density for TIES) and never one it lacks. Screenshots as in tests/test_browser.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


from merging import get_method

SLIDER_VALUES = (0.13, 0.27, 0.41, 0.59, 0.73, 0.87, 0.31, 0.67)  # distinct, inside every range
JSON, REVERSE = "smollm2-json", "smollm2-reverse"  # the builder's defaults: the Lab's base and model


def _open_builder(page, server):
    page.goto(server)
    page.get_by_text("Build a recipe: models, base, method and parameters").click()


def _pick_method(page, name: str):
    page.get_by_label("method").click()
    page.get_by_role("option", name=f"{name}: {get_method(name).summary}").click()


def _recipe(page) -> str:
    return page.locator(".cm-content").first.inner_text()


def _controls(name: str) -> list[tuple[str, object]]:
    """(label, parameter) of every control the builder generates for `name` on its defaults."""
    method = get_method(name)
    labels = []
    for parameter in method.global_parameters:
        label = parameter.name
        if name == "slerp" and parameter.name == "t":
            label = f"t (0 = {JSON}, 1 = {REVERSE})"
        labels.append((label, parameter))
    owners = [JSON, REVERSE] if method.base == "ignored" else [REVERSE]
    for owner in owners:
        labels.extend((f"{parameter.name} of {owner}", parameter) for parameter in method.model_parameters)
    return labels


@pytest.mark.parametrize("name", ["slerp", "ties", "dare_ties", "linear", "task_arithmetic"])
def test_every_generated_control_writes_the_recipe_in_chromium(server, page, name, tmp_path):
    _open_builder(page, server)
    if name != "slerp":
        _pick_method(page, name)
    controls = _controls(name)
    page.get_by_text(controls[-1][0], exact=True).first.wait_for(timeout=30_000)  # generated
    expected, slider_values = [], iter(SLIDER_VALUES)
    for label, parameter in controls:
        if parameter.kind is bool:
            box = page.get_by_label(label, exact=True).last  # the builder's (the Lab may share a label)
            assert box.is_enabled(), label
            before = box.is_checked()
            box.click()
            expected.append(f"{parameter.name}: {str(not before).lower()}")
        elif parameter.kind is str:
            choice = [c for c in parameter.choices if c != parameter.default][0]
            dropdown = page.get_by_label(label, exact=True).last
            assert dropdown.is_enabled(), label
            dropdown.click()
            page.get_by_role("option", name=choice, exact=True).click()
            expected.append(f"{parameter.name}: {choice}")
        else:
            value = next(slider_values)
            number = page.get_by_label(f"number input for {label}", exact=True).last
            assert number.is_enabled(), label
            number.fill(str(value))
            number.press("Enter")
            expected.append(f"{parameter.name}: {value}")
        page.get_by_text(expected[-1]).first.wait_for(timeout=15_000)  # this control wrote the recipe
    recipe = _recipe(page)
    assert f"merge_method: {name}" in recipe
    for line in expected:
        assert line in recipe, (line, recipe)
    if name == "linear":  # the README shows a linear merge built from these controls
        shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "app-build-recipe.png"), full_page=True)


def test_the_builders_defaults_merge_in_chromium(server, page):
    _open_builder(page, server)
    page.get_by_role("button", name="Write the recipe").click()
    page.get_by_text("merge_method: slerp").wait_for(timeout=30_000)
    recipe = _recipe(page)
    assert "t: 0.5" in recipe and REVERSE in recipe and JSON in recipe
    page.get_by_role("button", name="Merge", exact=True).click()
    page.get_by_text("(history #").wait_for(timeout=120_000)


def _builders_recipe(page, server, method: str, last_control: str):
    """Write the builder's recipe for `method` on its default models, once its controls (the
    last one labelled `last_control`) are generated."""
    _open_builder(page, server)
    _pick_method(page, method)
    page.get_by_text(last_control).first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Write the recipe").click()
    page.get_by_text(f"merge_method: {method}").wait_for(timeout=30_000)


def _per_layer_panel(page, parameter: str):
    """Open the per-layer panel and pick what it shapes."""
    page.get_by_text("Per-layer values: control points for attention, MLP and the rest").click()
    page.get_by_label("parameter", exact=True).click()
    page.get_by_role("option", name=parameter, exact=True).click()


def _parameters_of(recipe: str, model_suffix: str) -> dict:
    import yaml

    config = yaml.safe_load(recipe)
    return next(m.get("parameters") or {} for m in config["models"] if m["model"].endswith(model_suffix))


def test_the_per_layer_editor_shapes_each_models_own_values_in_chromium(server, page):
    """TIES: the panel offers lambda and each model's weight and density (not the base's), a
    preset writes the picked model's density per layer, and the recipe merges."""
    _builders_recipe(page, server, "ties", f"density of {REVERSE}")
    _per_layer_panel(page, f"density of {REVERSE}")
    options = page.get_by_label("parameter", exact=True)
    options.click()
    offered = [text.replace("✓", "").strip() for text in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    assert offered == ["lambda", f"weight of {REVERSE}", f"density of {REVERSE}"], offered
    page.get_by_label("preset").click()
    page.get_by_role("option", name="ramp up (A at the bottom, B at the top)").click()
    page.get_by_text("filter: self_attn").first.wait_for(timeout=30_000)
    recipe = _recipe(page)
    density = _parameters_of(recipe, REVERSE)["density"]
    assert density[0] == {"filter": "self_attn", "value": [0, 1]}, recipe
    assert not any(line.strip().startswith("t:") for line in recipe.splitlines()), recipe
    assert "filter" not in recipe.split("merge_method")[1], recipe  # nothing at the top level
    assert page.get_by_label("attention (self_attn) control points").input_value() == "0, 1"
    page.get_by_role("button", name="Merge", exact=True).click()
    page.get_by_text("(history #").wait_for(timeout=180_000)


def test_per_layer_presets_on_a_linear_recipe_shape_a_models_weight_never_t_in_chromium(server, page):
    _builders_recipe(page, server, "linear", f"weight of {REVERSE}")
    _per_layer_panel(page, f"weight of {JSON}")
    page.get_by_label("preset").click()
    page.get_by_role("option", name="LazyMergekit gradient").click()
    page.get_by_text("filter: self_attn").first.wait_for(timeout=30_000)
    recipe = _recipe(page)
    assert _parameters_of(recipe, JSON)["weight"][0]["value"] == [0, 0.5, 0.3, 0.7, 1], recipe
    assert not any(line.strip().startswith("t:") for line in recipe.splitlines()), recipe


def test_a_failed_write_says_why_under_the_button_and_leaves_the_editor_usable(server, page):
    _open_builder(page, server)
    before = _recipe(page)
    page.get_by_label("models (demo family, a local folder or a hub id: type to add)").click()
    page.get_by_role("option", name="smollm2-135m-instruct", exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Write the recipe").click()
    page.get_by_text("slerp takes exactly 1 model besides the base").wait_for(timeout=30_000)
    assert page.locator(".wrap .error").count() == 0  # no Error box over the editor
    editor = page.locator(".cm-content").first
    assert editor.is_visible() and editor.inner_text() == before
