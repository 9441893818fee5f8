"""MergeLab: explore LLM merges in the browser. Run `python app.py`."""

from __future__ import annotations

import sys

import gradio as gr

from merging.errors import MergeError
from ui.history_panel import build_history_panel
from ui.lab import build_lab, forget_session
from ui.moe_panel import build_moe_panel
from ui.sweep_panel import build_sweep_panel
from ui.recipe_panel import build_recipe_panel

QUEUE_LENGTH = 64  # requests waiting at once; more are refused (the page says the queue is full)
INTRO = """# MergeLab
Explore model merges: mergekit-compatible recipes, checked before any heavy work.
Merge, try the merge beside its parents, move t and merge again in place; the same recipe
merges from the command line with `python -m merging RECIPE.yml OUT_DIR`. The example merges
the offline demo family: SmolLM2-135M-Instruct fine-tuned to answer in a JSON record, and to
reverse words. The *Mixture of experts* tab builds a Mixtral-style MoE from them and shows
which expert each token goes to.
"""


def demo_family() -> dict | None:
    """Build (first start) or find the offline demo models, with progress on the console."""
    from tqdm import tqdm

    from merging.demo import build_family

    try:
        with tqdm(total=100, desc="demo models", file=sys.stderr) as bar:
            def progress(fraction, what):
                bar.n = int(100 * fraction)
                bar.set_description(what)
                bar.refresh()
            family = build_family(progress=progress)
        return {name: str(path) for name, path in family.items()}
    except MergeError as error:
        print(f"MergeLab: no demo models ({error})", file=sys.stderr)
        return None


def build_app(family: dict | None = None) -> gr.Blocks:
    # Gradio's own copies of uploads and returned files are deleted an hour after they are made
    with gr.Blocks(title="MergeLab", delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Tab("Lab"):
            lab_recipe, merge_after = build_lab(family)
        with gr.Tab("Sweep") as sweep_tab:
            build_sweep_panel(lab_recipe, family, merge_after, sweep_tab)
        with gr.Tab("Mixture of experts"):
            moe_recipe = build_moe_panel(family)
        with gr.Tab("History"):
            build_history_panel(lab_recipe, moe_recipe)
        with gr.Tab("Check a recipe"):
            build_recipe_panel(family)
        app.unload(forget_session)  # the session's merged model goes when its browser does
    return app


def serve(app: gr.Blocks) -> None:
    """Launch with every request bounded: the queue's length, uploads' size; sessions expire."""
    from merging.limits import is_public_deployment, limit
    from ui.session import SESSIONS

    SESSIONS.sweep_stale_folders()  # session folders a killed server left behind
    SESSIONS.start_reaper()
    try:
        # api_open=False on a public deployment: Gradio's direct REST routes would skip the queue
        app.queue(default_concurrency_limit=2, max_size=QUEUE_LENGTH, api_open=not is_public_deployment()).launch(
            max_file_size=limit("upload_bytes"))
    finally:
        SESSIONS.stop_reaper()


if __name__ == "__main__":
    serve(build_app(demo_family()))
