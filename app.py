"""MergeLab: explore LLM merges in the browser. Run `python app.py`."""

from __future__ import annotations

import gradio as gr

from ui.recipe_panel import build_recipe_panel

INTRO = """# MergeLab
Explore model merges: mergekit-compatible recipes, checked before any heavy work.
The interactive per-layer merge, weight diagnostics and side-by-side chat arrive with the
next releases; today this page checks a recipe and shows its plan, and the same recipe merges
from the command line with `python -m merging RECIPE.yml OUT_DIR`.
"""


def build_app() -> gr.Blocks:
    with gr.Blocks(title="MergeLab") as app:
        gr.Markdown(INTRO)
        build_recipe_panel()
    return app


if __name__ == "__main__":
    build_app().queue(default_concurrency_limit=2).launch()
