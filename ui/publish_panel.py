"""Save the Lab's merge to a folder, or publish it to the Hugging Face hub; either way the
model card carries the recipe, the sources and the scores the history holds for it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import gradio as gr

from merging import MergeConfig, MergeError, merge, plan_stages
from merging.errors import FolderNotEmpty
from merging.limits import check as check_limit, is_public_deployment
from merging.plan import format_bytes

from .common import handler, heavy_queue, page_and_api, read_recipe, session_hash, user_key
from .session import SESSIONS, history


def _config(recipe: str) -> MergeConfig:
    return read_recipe(recipe, MergeConfig, "save one merge recipe at a time; multi-stage files merge from the "
                                            "command line")


def scores_section(recipe: str, user: str) -> str:
    """The model card's scores: those of the newest history entry with exactly this recipe."""
    entry = history().find(user, recipe)
    if entry is None or not entry.scores:
        return ""
    rows = "\n".join(f"| {name} | {value:.4g} |" if isinstance(value, (int, float)) else f"| {name} | {value} |"
                     for name, value in entry.scores.items())
    return f"## Scores\n\nMeasured in MergeLab (history #{entry.id}):\n\n| score | value |\n|---|---|\n{rows}"


def _merge(recipe: str, target: Path, user: str, progress, overwrite: bool = False) -> Path:
    """The recipe's merge into `target`, once its size is within the output limit."""
    config = _config(recipe)
    plans = plan_stages(config)
    size = plans[-1].output_bytes
    check_limit("output_bytes", size, f"this merge writes {format_bytes(size)}")
    return merge(config, target, card_extra=scores_section(recipe, user), plans=plans, overwrite=overwrite,
                 progress=lambda done, total, name: progress(done / total, desc=f"merging {name}"))


@handler
def save_merge(recipe: str, folder: str, overwrite: bool = False, request: gr.Request = None,
               profile: gr.OAuthProfile | None = None, progress=gr.Progress()) -> str:
    """Write the recipe's merge to a folder with its model card (merge(), atomic); a folder
    holding files is replaced only with `overwrite`. Not on a public deployment: the server's
    disk is not the visitor's (publish to the hub instead)."""
    if is_public_deployment():
        raise MergeError("saving to the server's disk is off on a public deployment; publish to the hub instead")
    _config(recipe)
    if not folder or not folder.strip():
        raise MergeError("give a folder to save the merged model in")
    target = Path(folder).expanduser()
    try:
        _merge(recipe, target, user_key(request, profile), progress, overwrite=bool(overwrite))
    except FolderNotEmpty as error:
        raise MergeError(f"{error}: tick 'overwrite the folder'") from None
    return f"**Saved** to `{target}`: weights, config, tokenizer and a model card with the recipe."


@handler
def publish(recipe: str, repo: str, private: bool, token: str, request: gr.Request = None,
            profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None,
            progress=gr.Progress()) -> str:
    """Merge into the session's folder and push it to the hub with the token given, else the
    signed-in user's (on a Space with OAuth), else, run locally, your own `hf auth login`.
    Hub access is checked before the merge starts; the merged folder is removed afterwards."""
    from merging.publish import check_hub_access, push_to_hub

    _config(recipe)
    token = (token or "").strip() or (oauth_token.token if oauth_token is not None else None)
    if not token and is_public_deployment():  # never the server's own login
        raise MergeError("sign in with Hugging Face, or paste a token with write access, to publish")
    repo_id = check_hub_access(repo, token)
    with SESSIONS.use(session_hash(request)) as session:
        work = Path(tempfile.mkdtemp(prefix="publish-", dir=session.workdir()))
        try:
            folder = _merge(recipe, work / "model", user_key(request, profile), progress)
            progress(1.0, desc=f"uploading to {repo_id}")
            url = push_to_hub(folder, repo_id, token=token, private=bool(private))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return f"**Published** to [{repo_id}]({url}) ({'private' if private else 'public'})."


def build_publish_panel(recipe: gr.Code) -> None:
    gr.Markdown("### Save or publish")
    with gr.Row(visible=not is_public_deployment()):  # the server's disk is not a visitor's
        folder = gr.Textbox("merged-model", label="folder", scale=4)
        overwrite = gr.Checkbox(False, label="overwrite the folder", scale=1)
        save = gr.Button("Save the merged model", scale=1)
    saved = gr.Markdown()
    page_and_api(save.click, save_merge, inputs=[recipe, folder, overwrite], outputs=saved, api_name="save",
                 **heavy_queue())
    with gr.Row():
        if os.environ.get("OAUTH_CLIENT_ID"):  # a Space with hf_oauth; elsewhere a token or hf auth login
            gr.LoginButton(scale=1)
        repo = gr.Textbox("my-merge", label="hub repo (name, or org/name)", scale=2)
        private = gr.Checkbox(True, label="private", scale=1)
        token = gr.Textbox("", type="password", scale=2,
                           label="token with write access (empty: " + ("sign in" if is_public_deployment()
                                                                       else "your hf auth login") + ")")
        push = gr.Button("Publish to the hub", scale=1)
    published = gr.Markdown()
    page_and_api(push.click, publish, inputs=[recipe, repo, private, token], outputs=published, api_name="publish",
                 **heavy_queue())
