"""History: every merge, MoE build and sweep point of this user, newest first, with its
scores; restore one into the recipe box it came from. The table refreshes itself whenever
its tab is opened (merges and builds happen in the other tabs), and on Refresh."""

from __future__ import annotations

import gradio as gr

from merging import MergeError

from .common import handler, user_key
from merging.history import summarize

from .session import history

COLUMNS = ["id", "time", "kind", "recipe", "scores"]


def _format_scores(scores: dict) -> str:
    return ", ".join(f"{name} {value:.4g}" if isinstance(value, (int, float)) else f"{name} {value}"
                     for name, value in scores.items())


@handler
def list_history(request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> list[list]:
    """The user's merges as table rows: id, time, kind, what the recipe is (method, its
    key parameters, short model names: summarized anew, so rows recorded before the
    summaries said more read the same way), scores."""
    entries = history().entries(user_key(request, profile))
    return [[e.id, e.time_text, e.kind, summarize(e.recipe), _format_scores(e.scores)] for e in entries]


@handler
def restore(entry_id: float, request: gr.Request = None, profile: gr.OAuthProfile | None = None):
    """The entry's recipe, exactly as recorded, into the Lab's recipe box (merges and sweep
    points) or the MoE tab's (MoE builds); the other box is left as it is."""
    if entry_id is None:
        raise MergeError("give the id of a merge in the table")
    try:
        entry_id = int(entry_id)
    except (TypeError, ValueError, OverflowError):
        raise MergeError(f"the id must be a whole number, got {entry_id!r}") from None
    entry = history().get(entry_id, user_key(request, profile))
    message = f"Restored #{entry.id} ({entry.summary}) into the {'MoE' if entry.kind == 'moe' else 'Lab'} tab."
    if entry.kind == "moe":
        return gr.update(), entry.recipe, message
    return entry.recipe, gr.update(), message


def pick_row(event: gr.SelectData):
    """A click on a row of the table puts its id in the id box."""
    return event.row_value[0]


def _enclosing_tab(block) -> gr.Tab | None:
    while block is not None and not isinstance(block, gr.Tab):
        block = getattr(block, "parent", None)
    return block


def build_history_panel(lab_recipe: gr.Code, moe_recipe: gr.Code) -> None:
    """Built inside its tab: selecting the tab lists the history anew."""
    gr.Markdown("Every merge, MoE build and sweep point you make is recorded here with its recipe and scores "
                "(in a local SQLite file; on a shared deployment each user sees only their own).")
    with gr.Row():
        refresh = gr.Button("Refresh")
        entry = gr.Number(None, precision=0, label="id (or click a row)")
        restore_button = gr.Button("Restore into its tab", variant="primary")
    table = gr.Dataframe(headers=COLUMNS, datatype=["number", "str", "str", "str", "str"], interactive=False,
                         label="history", wrap=True)
    status = gr.Markdown()
    refresh.click(list_history, outputs=table, api_name="history")
    tab = _enclosing_tab(table)
    if tab is not None:  # every merge, build and sweep point is recorded before its tab is left
        tab.select(list_history, outputs=table, api_visibility="private", show_progress="hidden",
                   concurrency_limit=None)
    table.select(pick_row, outputs=entry)
    restore_button.click(restore, inputs=entry, outputs=[lab_recipe, moe_recipe, status], api_name="restore")
