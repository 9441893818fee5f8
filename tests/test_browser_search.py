"""The Search tab in Chromium, as a person uses it: name a parameter, pick the objectives, press
Search, watch every evaluation arrive in the plot and the table, stop one, load the best into
the Lab, find the evaluations in the History; a parameter the recipe cannot take is said in
one line under the button."""

from __future__ import annotations

import os
from pathlib import Path

TRACES = ".js-plotly-plot .scatterlayer .trace"


def table_rows(page) -> int:
    """Rows of the evaluations' table (its grid counts the header row too)."""
    return int(page.locator('#search-table [role="grid"]').get_attribute("aria-rowcount")) - 1


def open_search(page, server):
    page.goto(server)
    page.get_by_role("tab", name="Search").click()
    page.get_by_label("parameters to search (one a line)").wait_for(timeout=30_000)


def test_search_watch_it_and_load_the_best_into_the_lab_in_chromium(server, page, tmp_path):
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    open_search(page, server)
    page.get_by_label("parameters to search (one a line)").fill("t")
    page.get_by_label("probes per set").fill("3")
    page.get_by_label("evaluations to run").fill("6")
    page.get_by_role("button", name="Search", exact=True).click()
    page.get_by_text("Done (the budget of 6 evaluations is spent)").wait_for(timeout=300_000)
    page.locator(TRACES).first.wait_for(timeout=30_000)
    assert page.locator(TRACES).count() == 3  # every evaluation, the Pareto front, the best
    assert table_rows(page) == 6
    page.screenshot(path=str(shots / "app-search.png"), full_page=True)

    page.get_by_label("load an evaluation into the Lab (and merge it)").click()
    best = page.get_by_role("option").first
    chosen = best.inner_text()
    assert chosen.startswith("#")
    best.click()
    page.get_by_role("tab", name="Lab").click()
    page.get_by_text("(history #").first.wait_for(timeout=120_000)  # loaded, and merged
    page.get_by_role("tab", name="History").click()
    page.get_by_role("button", name="Refresh").click()
    page.get_by_text("search", exact=True).filter(visible=True).first.wait_for(timeout=60_000)


def test_stop_ends_a_search_after_the_current_evaluation_in_chromium(server, page):
    open_search(page, server)
    page.get_by_label("parameters to search (one a line)").fill("t@points:2")
    page.get_by_label("probes per set").fill("2")
    page.get_by_label("evaluations to run").fill("40")
    page.get_by_role("button", name="Search", exact=True).click()
    page.get_by_text("of 40 evaluations").first.wait_for(timeout=300_000)
    page.get_by_role("button", name="Stop").click()
    page.get_by_text("Done (stopped)").wait_for(timeout=120_000)
    assert table_rows(page) < 40


def test_a_parameter_the_recipe_cannot_take_is_said_in_one_line_in_chromium(server, page):
    open_search(page, server)
    page.get_by_label("parameters to search (one a line)").fill("density")
    page.get_by_role("button", name="Search", exact=True).click()
    page.get_by_text("slerp has no numeric parameter 'density'").first.wait_for(timeout=60_000)
    assert page.locator(TRACES).count() == 0
