"""History: every merge, MoE build and sweep point of this user, newest first, with its
scores; restore one into the recipe box it came from."""

from __future__ import annotations

import gradio as gr

from merging import MergeError

from .common import handler, user_key
from .session import history

COLUMNS = ["id", "time", "kind", "recipe", "scores"]


def _format_scores(scores: dict) -> str:
    return ", ".join(f"{name} {value:.4g}" if isinstance(value, (int, float)) else f"{name} {value}"
                     for name, value in scores.items())


@handler
def list_history(request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> list[list]:
    """The user's merges as table rows: id, time, kind, method and models, scores."""
    entries = history().entries(user_key(request, profile))
    return [[e.id, e.time_text, e.kind, e.summary, _format_scores(e.scores)] for e in entries]


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


def build_history_panel(lab_recipe: gr.Code, moe_recipe: gr.Code) -> None:
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
    table.select(pick_row, outputs=entry)
    restore_button.click(restore, inputs=entry, outputs=[lab_recipe, moe_recipe, status], api_name="restore")
