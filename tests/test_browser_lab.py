"""The Lab as a person uses it, in Chromium at 1400x900: the recipe is the one source of truth
(slider, per-layer panel and recipe agree after every kind of edit; a merge or answers from an
older recipe are marked), the three arena panes stream together, a one-model recipe can be
asked, and the first screen holds the recipe, t, Merge and the three panes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest


SLIDER = "number input for t"  # the slider's number box; its label says what t is


@pytest.fixture
def lab(server, small_screen):
    small_screen.goto(server)
    small_screen.locator(".cm-content").first.wait_for(timeout=30_000)
    return small_screen


def recipe_text(page) -> str:
    return page.locator(".cm-content").first.inner_text()


def write_recipe(page, text: str) -> None:
    """Replace the recipe as a person would: select all in the editor and type over it."""
    page.locator(".cm-content").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)


def slider_number(page):
    return page.get_by_label(re.compile(SLIDER)).first


def wait_until(page, check, what: str, timeout: float = 30_000) -> None:
    """Poll `check()` until it is true (the views follow the recipe a moment after it changes)."""
    waited = 0
    while not check():
        if waited >= timeout:
            raise AssertionError(f"waited {timeout / 1000:.0f} s for {what}")
        page.wait_for_timeout(200)
        waited += 200


def per_layer(page, name: str):
    return page.get_by_label(name, exact=True)


def merge(page) -> list[str]:
    """Press Merge and wait for it; returns the progress texts seen meanwhile."""
    page.get_by_role("button", name="Merge", exact=True).click()
    seen = []
    for _ in range(2400):
        if page.get_by_text("Merged (history #").count():
            return seen
        seen.extend(page.locator(".progress-text, .progress-level-inner").all_inner_texts())
        page.wait_for_timeout(50)
    raise AssertionError(f"no merge after 120 s; progress seen: {seen[-5:]}")


def test_first_screen_holds_recipe_t_merge_and_the_three_panes(lab, tmp_path):
    boxes = {"recipe": lab.locator(".cm-editor").first.bounding_box(),
             "t": slider_number(lab).bounding_box(),
             "Merge": lab.get_by_role("button", name="Merge", exact=True).bounding_box()}
    for index, label in enumerate(("model A", "model B", "merged")):
        boxes[label] = lab.locator(".arena-pane").nth(index).bounding_box()
    for name, box in boxes.items():
        assert box is not None, f"{name} is not on the page"
        assert box["y"] >= 0 and box["y"] + box["height"] <= 900 and box["x"] + box["width"] <= 1400, (name, box)


def test_slider_per_layer_panel_and_recipe_agree_after_every_edit(lab):
    lab.get_by_text("Per-layer values: control points for attention, MLP and the rest").click()
    recipe = recipe_text(lab)
    assert "t: 0.5" in recipe and slider_number(lab).input_value() == "0.5"

    # an edit of the recipe moves the slider and the per-layer panel
    write_recipe(lab, recipe.replace("t: 0.5", "t: 0.8"))
    wait_until(lab, lambda: slider_number(lab).input_value() == "0.8", "the slider to read 0.8 from the recipe")
    wait_until(lab, lambda: per_layer(lab, "MLP control points").input_value() == "0.8", "the panel to read 0.8")

    # a per-layer write: the slider says t varies per layer, and the recipe and panel agree
    lab.get_by_label("preset").click()
    lab.get_by_role("option", name="ramp up (A at the bottom, B at the top)").click()
    lab.get_by_text("filter: self_attn").wait_for(timeout=30_000)
    lab.get_by_text("t varies per layer (0 to 1").wait_for(timeout=30_000)
    assert per_layer(lab, "attention (self_attn) control points").input_value() == "0, 1"
    assert lab.get_by_label(re.compile("t varies per layer in this recipe")).count() >= 1

    # the slider over a per-layer t: one t everywhere, said so, and the gradient can come back
    slider_number(lab).fill("0.3")
    slider_number(lab).press("Enter")
    lab.get_by_text("One t = 0.3 everywhere now").wait_for(timeout=30_000)
    assert "t: 0.3" in recipe_text(lab) and "filter" not in recipe_text(lab)
    wait_until(lab, lambda: per_layer(lab, "attention (self_attn) control points").input_value() == "0.3",
               "the panel to follow the slider")
    lab.get_by_role("button", name="Bring back the per-layer t").click()
    lab.get_by_text("filter: self_attn").wait_for(timeout=30_000)
    wait_until(lab, lambda: per_layer(lab, "attention (self_attn) control points").input_value() == "0, 1",
               "the panel to show the gradient again")
    assert not lab.get_by_role("button", name="Bring back the per-layer t").is_visible()

    # a merge (its progress counted in tensors), then an edit: the status says the merged
    # model is from an older recipe
    seen = merge(lab)
    assert any("building the merged model" in text for text in seen), seen[-10:]
    assert any(re.search(r"\d+/272 tensors", text) for text in seen), seen[-10:]  # counted tensor by tensor
    slider_number(lab).fill("0.6")
    slider_number(lab).press("Enter")
    lab.get_by_text("is from an older recipe").wait_for(timeout=30_000)
    assert not lab.get_by_text("Merged (history #").is_visible()
    merge(lab)
    lab.get_by_text("is from an older recipe").wait_for(state="hidden", timeout=30_000)


def pane_texts(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.arena-pane')]
        .map(pane => { const bots = pane.querySelectorAll('.bot'); return bots.length ? bots[bots.length - 1].innerText : ''; })""")


def test_the_three_panes_stream_together_and_older_answers_are_marked(lab):
    shots = os.environ.get("MERGELAB_SCREENSHOTS")
    merge(lab)
    lab.get_by_label("number input for max new tokens").fill("24")
    lab.get_by_label("number input for max new tokens").press("Enter")
    lab.get_by_label("Prompt", exact=True).first.fill("Write a short story about a lamp.")
    lab.get_by_role("button", name="Ask all three").click()
    samples = []
    for _ in range(600):
        samples.append([len(text) for text in pane_texts(lab)])
        if lab.get_by_text(re.compile(r"merged: \d+ tokens")).count():
            break
        lab.wait_for_timeout(50)
    growing_at_once = max(sum(later > earlier for earlier, later in zip(before, after))
                          for before, after in zip(samples, samples[1:]))
    assert growing_at_once >= 2, samples
    assert all(length > 0 for length in samples[-1])
    if shots:
        lab.screenshot(path=str(Path(shots) / "app-lab.png"))  # the first screen, as a person sees it
    slider_number(lab).fill("0.9")
    slider_number(lab).press("Enter")
    lab.get_by_text("These answers came from an older recipe's merge").wait_for(timeout=30_000)


def test_a_one_model_recipe_can_be_asked(lab):
    json_model = re.search(r"base_model: (\S+)", recipe_text(lab))[1]
    write_recipe(lab, f"models:\n  - model: {json_model}\n    parameters:\n      weight: 1.0\n"
                      "merge_method: linear\ndtype: float32\n")
    lab.get_by_text("linear has no t").first.wait_for(timeout=30_000)
    merge(lab)
    lab.get_by_role("button", name="Ask all three").click()
    lab.get_by_text(re.compile(r"merged: \d+ tokens")).wait_for(timeout=120_000)
    texts = pane_texts(lab)
    assert "no model B" in texts[1]
    assert texts[0] and texts[0] == texts[2]  # a linear merge of one model is that model
