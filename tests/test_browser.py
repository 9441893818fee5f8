"""The app in a real browser: Debian's Chromium driven by Playwright (fixtures in conftest).

Open the app, press Merge, ask all three panes, see their replies and the weights heatmap.
With MERGELAB_SCREENSHOTS set to a folder, the screenshots are saved there (docs/ for the
README); otherwise into the test's temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

def test_merge_ask_and_see_the_weights_in_chromium(server, page, tmp_path):
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.goto(server)
    t = page.get_by_label("number input for t (0 = smollm2-json, 1 = smollm2-reverse)")
    t.fill("0")
    t.press("Enter")
    page.get_by_text("t: 0.0").wait_for(timeout=30_000)  # the slider rewrote the recipe
    page.get_by_role("button", name="Merge", exact=True).click()
    page.get_by_text("(history #").wait_for(timeout=120_000)
    page.get_by_role("button", name="Ask all three").click()
    bubbles = page.locator(".message-wrap .bot")
    page.wait_for_function("document.querySelectorAll('.message-wrap .bot').length >= 3", timeout=120_000)
    page.get_by_text("merged: ").first.wait_for(timeout=120_000)  # the last pane has finished
    answers = [bubbles.nth(i).inner_text().strip() for i in range(3)]
    assert all(answers) and answers[2] == answers[0]  # at t=0 the merge answers as model A
    page.get_by_role("button", name="Show diagnostics").click()
    page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    page.screenshot(path=str(shots / "app-lab.png"), full_page=True)


def test_build_a_recipe_and_shape_t_per_layer_in_chromium(server, page, tmp_path):
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    page.goto(server)
    page.get_by_text("Build a recipe: models, base, method and parameters").click()
    page.get_by_label("method").click()
    page.get_by_role("option", name="linear: weighted average of the models (model soup)").click()
    page.get_by_text("weight of smollm2-json").first.wait_for(timeout=30_000)  # generated controls
    page.get_by_role("button", name="Write the recipe").click()
    page.get_by_text("merge_method: linear").wait_for(timeout=30_000)  # (its screenshot: test_browser_builder)

    page.goto(server)  # back to the slerp recipe
    page.get_by_text("Per-layer values: control points for attention, MLP and the rest").click()
    page.get_by_label("preset").click()
    page.get_by_role("option", name="LazyMergekit gradient").click()
    page.get_by_text("filter: self_attn").wait_for(timeout=30_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    page.screenshot(path=str(shots / "app-per-layer.png"), full_page=True)


def test_expert_sliders_one_per_layer_in_chromium(server, page, tmp_path):
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    page.goto(server)
    page.get_by_text("Per-layer values: control points for attention, MLP and the rest").click()
    page.get_by_text("Expert: one slider per layer").click()
    page.get_by_role("button", name="Show one slider per layer").click()
    page.get_by_text("layer 29").wait_for(timeout=30_000)  # 30 layers, 30 sliders
    number = page.get_by_label("number input for layer 7")
    number.fill("0.9")
    number.press("Enter")
    page.get_by_role("button", name="Use these values").click()
    page.get_by_text("filter: self_attn").wait_for(timeout=30_000)
    recipe = page.locator(".cm-content").first.inner_text()
    assert "0.9" in recipe
    page.screenshot(path=str(shots / "app-expert-sliders.png"), full_page=True)


def test_build_a_mixture_of_experts_and_see_its_routing_in_chromium(server, page, tmp_path):
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    page.goto(server)
    page.get_by_role("tab", name="Mixture of experts").click()
    page.get_by_role("button", name="Build", exact=True).click()
    page.get_by_text("MixtralForCausalLM with").wait_for(timeout=180_000)
    page.get_by_label("Prompt").last.fill("Reverse the words: zebra anchor glove")
    page.get_by_role("button", name="Ask", exact=True).click()
    page.locator(".moe-strip .moe-token").first.wait_for(timeout=120_000)
    tokens = page.locator(".moe-strip .moe-token")
    assert "".join(tokens.nth(i).inner_text() for i in range(tokens.count())).strip() == "glove anchor zebra"
    experts = {tokens.nth(i).get_attribute("data-expert") for i in range(tokens.count())}
    assert experts == {"1"}  # every token of a reversal goes to the reverse expert
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # the router per layer
    page.get_by_label("Prompt").last.fill("Make a record: Zoe is 44 and lives in Omsk.")
    page.get_by_role("button", name="Ask", exact=True).click()
    # the answer streams into the chat before the strip (made when it is done) replaces the old one
    lengths = []
    for _ in range(1200):
        lengths.append(page.evaluate("""() => { const bots = document.querySelectorAll('.moe-chat .bot');
            return bots.length ? bots[bots.length - 1].innerText.length : 0; }"""))
        if page.evaluate("(document.querySelector('.moe-strip')?.innerText || '').includes('Omsk')"):
            break
        page.wait_for_timeout(50)
    partial = {length for length in lengths[:-1] if length > 0}
    assert len(partial) >= 2, lengths  # seen growing, not only at the end
    page.wait_for_function("(document.querySelector('.moe-strip')?.innerText || '').includes('Omsk')", timeout=120_000)
    page.screenshot(path=str(shots / "app-moe.png"), full_page=True)


def test_sweep_then_history_in_chromium(server, page, tmp_path):
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    page.goto(server)
    page.get_by_role("tab", name="Sweep").click()
    page.get_by_role("button", name="Parameters of the Lab's recipe").click()
    page.get_by_label("parameter").first.wait_for(timeout=30_000)
    assert page.get_by_label("parameter").first.input_value() == "t (everywhere)"
    page.get_by_label("texts A for perplexity (one per line)").fill(
        'Make a record: Ana is 31 and lives in Lima.\n{"person": "Ana", "years": 31, "home": "Lima"}')
    page.get_by_label("texts B for perplexity (one per line)").fill("Reverse the words: red lamp quiet\nquiet lamp red")
    page.get_by_label("probes per set").fill("3")
    page.get_by_label("points").fill("5")
    page.get_by_role("button", name="Run the sweep").click()
    page.get_by_text("Done: 5 points").wait_for(timeout=300_000)
    page.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(timeout=30_000)
    assert page.locator(".js-plotly-plot .scatterlayer .trace").count() == 4  # 2 perplexities, 2 probe sets
    page.screenshot(path=str(shots / "app-sweep.png"), full_page=True)
    page.get_by_label("load a point into the Lab (and merge it)").click()
    page.get_by_role("option", name="t = 0.25").click()
    page.get_by_role("tab", name="History").click()
    page.get_by_role("button", name="Refresh").click()
    page.get_by_text("sweep point").first.wait_for(timeout=60_000)
    page.get_by_role("tab", name="Lab").click()
    page.get_by_text("t: 0.25").first.wait_for(timeout=60_000)  # the point, in the Lab's recipe
    page.get_by_text("(history #").first.wait_for(timeout=120_000)  # ... and merged
    page.get_by_role("tab", name="History").click()
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "app-history.png"), full_page=True)
