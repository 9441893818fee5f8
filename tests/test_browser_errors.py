"""Errors and words as a person meets them, in Chromium (see test_browser.py), and the console
and first start as the person running the server meets them.

A mistake shows its message in the panel's status place and leaves every input usable (no
Error box over the recipe editor or the merge status); a near-miss method name says "did you
mean"; models go by short names; a mistake logs one line; a first start answers at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


TYPO = "merge_method: slerpp"
ERROR_BADGE = ".wrap .error"  # Gradio's status tracker when an event failed on an output


def _write_editor(page, text: str, index: int = 0) -> None:
    """Replace a recipe editor's text as a person does: select all, then type over it."""
    editor = page.locator(".cm-content").nth(index)
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)


def test_a_failed_check_says_did_you_mean_and_leaves_the_editor_usable(server, page, tmp_path):
    page.goto(server)
    page.get_by_role("tab", name="Check a recipe").click()
    editor = page.locator(".cm-content").last
    editor.wait_for(timeout=30_000)
    recipe = editor.inner_text().replace("merge_method: slerp", TYPO)
    _write_editor(page, recipe, index=page.locator(".cm-content").count() - 1)
    page.get_by_role("button", name="Check recipe").click()
    page.get_by_text("did you mean slerp?").wait_for(timeout=30_000)
    assert "known methods" not in page.get_by_text("did you mean slerp?").inner_text()
    assert page.locator(ERROR_BADGE).count() == 0
    assert editor.is_visible()  # still there, still editable: fix the typo and check again
    shots = Path(os.environ.get("MERGELAB_SCREENSHOTS") or tmp_path)
    page.screenshot(path=str(shots / "app-recipe-error.png"), full_page=True)
    _write_editor(page, recipe.replace(TYPO, "merge_method: slerp"), index=page.locator(".cm-content").count() - 1)
    page.get_by_role("button", name="Check recipe").click()
    page.get_by_text("output: 30 layers").wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "app-recipe-plan.png"), full_page=True)


def test_a_failed_merge_shows_its_message_in_the_status_not_over_it(server, page):
    page.goto(server)
    recipe = page.locator(".cm-content").first
    recipe.wait_for(timeout=30_000)
    _write_editor(page, recipe.inner_text().replace("merge_method: slerp", TYPO))
    page.get_by_role("button", name="Merge", exact=True).click()
    status = page.get_by_text("Error: unknown merge_method 'slerpp'; did you mean slerp?")
    status.wait_for(timeout=60_000)
    assert page.locator(ERROR_BADGE).count() == 0
    assert recipe.is_visible() and "slerpp" in recipe.inner_text()


def test_arena_panes_and_speed_lines_name_models_by_short_names(server, page, demo_family):
    page.goto(server)
    page.get_by_role("button", name="Merge", exact=True).click()
    page.get_by_text("(history #").wait_for(timeout=120_000)
    page.get_by_role("button", name="Ask all three").click()
    page.get_by_text("merged: ").first.wait_for(timeout=120_000)
    speeds = page.get_by_text("A: smollm2-json:").first
    text = speeds.inner_text()
    assert "B: smollm2-reverse:" in text and "merged:" in text
    for folder in demo_family.values():
        assert str(folder) not in text


def test_a_user_mistake_logs_one_line_without_a_traceback(server, tmp_path_factory):
    from gradio_client import Client

    log = next(tmp_path_factory.getbasetemp().glob("app*/app.log"))
    before = len(log.read_text(errors="replace"))
    with pytest.raises(Exception, match="did you mean slerp"):
        Client(server, verbose=False).predict("models:\n  - model: a/b\nmerge_method: slerpq\n",
                                              api_name="/check_recipe")
    time.sleep(0.5)  # the log is written by another process
    added = log.read_text(errors="replace")[before:]
    lines = [line for line in added.splitlines() if "slerpq" in line]
    assert len(lines) == 1, added
    assert "Traceback" not in added, added


def test_a_first_start_answers_at_once_and_shows_the_demo_build(first_start):
    """On a fresh cache the demo models take about a minute to build: the port answers long
    before, with a starting page whose status follows the build, then serves the Lab. (The
    session's server is that first start: conftest.first_start watched it.)"""
    assert first_start.problem is None, first_start.problem
    assert first_start.starting_page is True, first_start.log_when_ready[-3000:]  # not a closed port
    assert first_start.answered_after < 120
    shown = first_start.shown
    assert "MergeLab is starting" in shown or "Building the offline demo models" in shown, shown
    assert any("Building the offline demo models" in said for said in first_start.statuses), first_start.statuses
    assert first_start.built_after_answer > 5, "the build was over before the port answered: nothing shown"
    assert first_start.log_when_ready.count("Traceback") == 0, first_start.log_when_ready[-3000:]
