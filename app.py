"""MergeLab: explore LLM merges in the browser. Run `python app.py`."""

from __future__ import annotations

import sys

import gradio as gr

QUEUE_LENGTH = 64  # requests waiting at once; more are refused (the page says the queue is full)
INTRO = """# MergeLab
Explore model merges: mergekit-compatible recipes, checked before any heavy work.
Merge, try the merge beside its parents, move t and merge again in place; the same recipe
merges from the command line with `python -m merging RECIPE.yml OUT_DIR`. The example merges
the offline demo family: SmolLM2-135M-Instruct fine-tuned to answer in a JSON record, and to
reverse words. The *Mixture of experts* tab builds a Mixtral-style MoE from them and shows
which expert each token goes to.
"""


class BuildProgress:
    """How far the demo family's build is, for the console and the starting page."""

    def __init__(self):
        self.fraction, self.what, self.done = 0.0, "starting", False

    def text(self) -> str:
        if self.done:
            return "**The demo models are ready**: the Lab opens in a moment."
        if self.fraction == 0:
            return f"**MergeLab is starting**: {self.what}. This page opens the Lab when it is ready."
        return (f"**Building the offline demo models** (first start only; about a minute): "
                f"{100 * self.fraction:.0f}%, {self.what}. This page opens the Lab when they are ready.")


def demo_family(state: BuildProgress | None = None) -> dict | None:
    """Build (first start) or find the offline demo models, with progress on the console (one
    line per step) and in `state`."""
    from tqdm import tqdm

    from merging.demo import build_family
    from merging.errors import MergeError

    state = state or BuildProgress()
    try:
        with tqdm(total=100, desc="demo models", file=sys.stderr) as bar:
            def progress(fraction, what):
                state.fraction, state.what = fraction, what
                bar.n = int(100 * fraction)
                bar.set_description(what, refresh=False)  # one refresh per step, not two lines
                bar.refresh()
            family = build_family(progress=progress)
        return {name: str(path) for name, path in family.items()}
    except MergeError as error:
        print(f"MergeLab: no demo models ({error})", file=sys.stderr)
        return None
    finally:
        state.done = True


STARTING_TITLE = "MergeLab: starting"  # benchmarks/visitors.py waits while the page has this title
RELOAD_WHEN_READY = """() => {
  setInterval(async () => {
    try {
      const answer = await fetch("config", {cache: "no-store"});
      if (answer.ok && !(await answer.json()).title.endsWith("starting")) location.reload();
    } catch (error) {}  // the server is switching to the Lab: try again
  }, 1500);
}"""


def starting_page(state: BuildProgress) -> gr.Blocks:
    """What the port serves while the demo models build: the build's progress, updated each
    second; the page reloads into the Lab once it is served."""
    with gr.Blocks(title=STARTING_TITLE) as page:
        gr.Markdown(INTRO)
        status = gr.Markdown(state.text(), elem_id="startup-progress")
        gr.Timer(1.0).tick(state.text, outputs=status, api_name="startup_progress", show_progress="hidden")
        page.load(None, js=RELOAD_WHEN_READY)
    return page


def app_while_serving() -> gr.Blocks:
    """The app on the demo family. Meanwhile (the library's imports, and on a first start the
    demo models' build, about a minute) the port serves the starting page, so the server
    answers at once and shows how far it is; the starting page closes when the app is built."""
    state = BuildProgress()
    page = starting_page(state)
    page.queue(default_concurrency_limit=8).launch(prevent_thread_lock=True, quiet=True)
    try:
        state.what = "loading the merge library"
        family = demo_family(state)
        state.what = "building the page"
        return build_app(family)
    finally:
        page.close()


def build_app(family: dict | None = None) -> gr.Blocks:
    from ui.history_panel import build_history_panel
    from ui.lab import build_lab, forget_session
    from ui.moe_panel import build_moe_panel
    from ui.recipe_panel import build_recipe_panel
    from ui.search_panel import build_search_panel
    from ui.sweep_panel import build_sweep_panel

    # Gradio's own copies of uploads and returned files are deleted an hour after they are made
    with gr.Blocks(title="MergeLab", delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Tab("Lab"):
            lab_recipe, merge_after = build_lab(family)
        with gr.Tab("Sweep") as sweep_tab:
            build_sweep_panel(lab_recipe, family, merge_after, sweep_tab)
        with gr.Tab("Search"):
            build_search_panel(lab_recipe, family, merge_after)
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


def check_settings() -> None:
    """A mistake in the server's settings (MERGELAB_DEVICE_MEMORY) stops the start, in one line."""
    from merging.errors import MergeError
    from merging.placement import SETTING, server_max_memory

    try:
        server_max_memory()
    except MergeError as error:
        sys.exit(f"MergeLab: {SETTING}: {error}")


if __name__ == "__main__":
    check_settings()
    serve(app_while_serving())
