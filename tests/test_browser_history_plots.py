"""The History tab and the Lab's plots as a person sees them, in Chromium at 1400x900: the
history lists a merge without Refresh and tells two merges apart; the per-layer
diagnostics plot's legend keeps off the data and the axis titles, its titles are whole,
one t-line per distinct curve on t's own range. With MERGELAB_SCREENSHOTS set to a folder,
screenshots go there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest



@pytest.fixture
def page(small_screen):
    return small_screen


def shots_folder(tmp_path) -> Path:
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def lab_recipe(demo_family, t: float) -> str:
    from ui.lab import LAB_RECIPE

    return LAB_RECIPE.format(**{name: str(path) for name, path in demo_family.items()}).replace("t: 0.5", f"t: {t}")


def test_history_lists_new_merges_without_refresh_and_tells_them_apart(server, demo_family, page, tmp_path):
    from gradio_client import Client

    page.goto(server)
    page.get_by_role("tab", name="History").click()  # opened once before the merges
    client = Client(server, verbose=False)
    client.predict(lab_recipe(demo_family, 0.15), api_name="/merge")
    page.get_by_role("tab", name="Lab").click()
    page.get_by_role("tab", name="History").click()  # no Refresh: opening the tab lists it
    summaries = page.locator(".body-cell").filter(visible=True).filter(has_text="slerp t=")
    summaries.filter(has_text="slerp t=0.15: smollm2-json, smollm2-reverse").first.wait_for(timeout=30_000)
    client.predict(lab_recipe(demo_family, 0.85), api_name="/merge")
    page.get_by_role("tab", name="Lab").click()
    page.get_by_role("tab", name="History").click()
    summaries.filter(has_text="slerp t=0.85: smollm2-json, smollm2-reverse").first.wait_for(timeout=30_000)
    texts = [summaries.nth(i).inner_text() for i in range(2)]
    assert "t=0.85" in texts[0] and "t=0.15" in texts[1] and texts[0] != texts[1]  # newest first
    page.screenshot(path=str(shots_folder(tmp_path) / "app-history.png"), full_page=True)


# The per-layer curves plot (the one with a legend and a right-hand t axis), measured in the page.
MEASURE_CURVES = """() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(
      p => p.querySelector('.legend') && p.querySelector('.y2title') && p.querySelector('.xtitle')
           && (p.querySelector('.xtitle').textContent || '') === 'layer');
  if (!plots.length) return null;
  const plot = plots[plots.length - 1];
  const box = e => { const r = e.getBoundingClientRect(); return {l: r.left, r: r.right, t: r.top, b: r.bottom}; };
  const t_lines = (plot.data || []).filter(d => d.yaxis === 'y2');
  return {
    figure: box(plot.querySelector('.main-svg')),
    area: box(plot.querySelector('.nsewdrag')),
    legend: box(plot.querySelector('.legend')),
    titles: ['.xtitle', '.ytitle', '.y2title'].map(s => box(plot.querySelector(s))),
    ytitle: plot.querySelector('.ytitle').textContent,
    legend_names: [...plot.querySelectorAll('.legendtext')].map(e => e.textContent),
    t_curves: t_lines.map(d => JSON.stringify([Array.from(d.x), Array.from(d.y)])),
    t_range: plot._fullLayout.yaxis2.range,
  };
}"""


def overlaps(a: dict, b: dict) -> bool:
    return a["l"] < b["r"] and b["l"] < a["r"] and a["t"] < b["b"] and b["t"] < a["b"]


def test_per_layer_diagnostics_plot_is_legible_at_1400x900(server, page, tmp_path):
    page.goto(server)
    page.get_by_text("Per-layer values: control points for attention, MLP and the rest").click()
    page.get_by_label("preset").click()
    page.get_by_role("option", name="LazyMergekit gradient").click()
    page.get_by_text("filter: self_attn").wait_for(timeout=30_000)  # a gradient t per module kind
    page.get_by_role("button", name="Show diagnostics").click()
    page.wait_for_function(f"({MEASURE_CURVES})() !== null", timeout=120_000)
    page.wait_for_timeout(500)  # plotly's last relayout
    found = page.evaluate(MEASURE_CURVES)
    figure, area, legend = found["figure"], found["area"], found["legend"]
    assert not overlaps(legend, area), found  # the legend is outside the data
    assert not any(overlaps(legend, title) for title in found["titles"]), found  # ... and off the axis titles
    for title in found["titles"]:  # whole axis titles, inside the figure
        assert figure["l"] <= title["l"] and title["r"] <= figure["r"], found
        assert figure["t"] <= title["t"] and title["b"] <= figure["b"], found
    assert found["ytitle"] == "angle_deg"
    assert len(found["t_curves"]) == len(set(found["t_curves"])) >= 2  # one t-line per distinct curve
    t_names = [name for name in found["legend_names"] if name.startswith("t (")]
    assert len(t_names) == len(set(t_names)) == len(found["t_curves"])
    assert found["t_range"][1] <= 1 and found["t_range"][0] >= 0  # t's own range, not 1.7
    page.locator(".js-plotly-plot").last.scroll_into_view_if_needed()
    page.screenshot(path=str(shots_folder(tmp_path) / "app-diagnostics.png"))
