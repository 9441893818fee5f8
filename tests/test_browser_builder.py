"""Build a recipe in Chromium as a person does: every control the method registry generates
is live and writes the recipe; the builder's defaults merge as they are; the per-layer
presets never write a parameter the method lacks. Screenshots as in tests/test_browser.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_browser import page  # noqa: F401  (the Chromium page fixture)

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
def test_every_generated_control_writes_the_recipe_in_chromium(server, page, name, tmp_path):  # noqa: F811
    _open_builder(page, server)
    if name != "slerp":
        _pick_method(page, name)
    controls = _controls(name)
    page.get_by_text(controls[-1][0], exact=True).first.wait_for(timeout=30_000)  # generated
    expected, slider_values = [], iter(SLIDER_VALUES)
    for label, parameter in controls:
        if parameter.kind is bool:
            box = page.get_by_label(label, exact=True)
            assert box.is_enabled(), label
            before = box.is_checked()
            box.click()
            expected.append(f"{parameter.name}: {str(not before).lower()}")
        elif parameter.kind is str:
            choice = [c for c in parameter.choices if c != parameter.default][0]
            dropdown = page.get_by_label(label, exact=True)
            assert dropdown.is_enabled(), label
            dropdown.click()
            page.get_by_role("option", name=choice, exact=True).click()
            expected.append(f"{parameter.name}: {choice}")
        else:
            value = next(slider_values)
            number = page.get_by_label(f"number input for {label}", exact=True)
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


def test_the_builders_defaults_merge_in_chromium(server, page):  # noqa: F811
    _open_builder(page, server)
    page.get_by_role("button", name="Write the recipe").click()
    page.get_by_text("merge_method: slerp").wait_for(timeout=30_000)
    recipe = _recipe(page)
    assert "t: 0.5" in recipe and REVERSE in recipe and JSON in recipe
    page.get_by_role("button", name="Merge", exact=True).click()
    page.get_by_text("(history #").wait_for(timeout=120_000)


def test_per_layer_presets_do_not_add_t_to_a_linear_recipe_in_chromium(server, page):  # noqa: F811
    _open_builder(page, server)
    _pick_method(page, "linear")
    page.get_by_text(f"weight of {REVERSE}").first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Write the recipe").click()
    page.get_by_text("merge_method: linear").wait_for(timeout=30_000)
    page.get_by_text("Per-layer t: control points for attention, MLP and the rest").click()
    page.get_by_label("preset").click()
    page.get_by_role("option", name="LazyMergekit gradient").click()
    page.get_by_text("linear has no 't'").first.wait_for(timeout=30_000)  # says so, writes nothing
    recipe = _recipe(page)
    assert "merge_method: linear" in recipe and "filter" not in recipe
    assert not any(line.strip().startswith("t:") for line in recipe.splitlines()), recipe
