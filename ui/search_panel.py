"""Search: CMA-ES over parameters of the Lab's recipe (merging.search), every candidate merged
in place and scored on the demo family's skill probes and texts' perplexity. The plot grows
with every evaluation (with two objectives: each one against the other, and the Pareto
front); Stop ends it after the current evaluation; any evaluation loads into the Lab; every
one is recorded in the History.
"""

from __future__ import annotations

from typing import Optional

import gradio as gr
import plotly.graph_objects as go

from merging import MergeConfig, MergeError
from merging.limits import clamp_check, whole_number
from merging.placement import server_max_memory

from .common import gpu, handler, heavy_queue, read_recipe, session_hash, text_lines, user_key
from .session import SESSIONS, history
from .sweep_panel import PROBE_SETS

MOST_PARAMETERS = 8


def _config(recipe: str) -> MergeConfig:
    return read_recipe(recipe, MergeConfig, "a search runs over one merge recipe (not MoE or multi-stage files)")


def search_objectives(config: MergeConfig, probe_sets, probe_count, texts: str) -> list:
    """The objectives asked for, each checked before any work (the sweep's scorers: probe sets
    by accuracy, the texts by perplexity, lower better)."""
    from merging.search import Objective

    from .sweep_panel import _scorers

    scorers = _scorers(config, texts, None, "", None, probe_sets, probe_count)
    objectives = [Objective(name, scorer) for name, scorer in scorers.items() if name.endswith("probes")]
    if "ppl A" in scorers:
        objectives.append(Objective("ppl texts", scorers["ppl A"], maximize=False))
    return objectives


def search_figure(result) -> go.Figure:
    """One objective: its score at each evaluation and the best so far. Two or more: the
    first two against each other, every evaluation, the Pareto front and the best."""
    figure = go.Figure()
    names = result.objectives
    evaluations = result.evaluations
    labels = [f"#{e.index}: " + ", ".join(f"{k}={v}" for k, v in e.values.items()) for e in evaluations]
    if len(names) == 1:
        name = names[0]
        figure.add_trace(go.Scatter(x=[e.index for e in evaluations], y=[e.scores[name] for e in evaluations],
                                    mode="markers", name="evaluations", text=labels))
        best, line = None, []
        for e in evaluations:
            best = e if best is None or e.fitness > best.fitness else best
            line.append(best.scores[name])
        figure.add_trace(go.Scatter(x=[e.index for e in evaluations], y=line, mode="lines", name="best so far"))
        figure.update_layout(xaxis={"title": {"text": "evaluation"}}, yaxis={"title": {"text": name}})
    else:
        x, y = names[0], names[1]
        figure.add_trace(go.Scatter(x=[e.scores[x] for e in evaluations], y=[e.scores[y] for e in evaluations],
                                    mode="markers", name="evaluations", text=labels, marker={"color": "#9aa5b1"}))
        front = sorted(result.front, key=lambda e: e.scores[x])
        figure.add_trace(go.Scatter(x=[e.scores[x] for e in front], y=[e.scores[y] for e in front],
                                    mode="lines+markers", name="Pareto front", marker={"color": "#d1495b"}))
        best = result.best
        figure.add_trace(go.Scatter(x=[best.scores[x]], y=[best.scores[y]], mode="markers", name="best",
                                    marker={"symbol": "star", "size": 16, "color": "#edae49"}))
        figure.update_layout(xaxis={"title": {"text": x}}, yaxis={"title": {"text": y}})
    # the legend in the top margin, right of the plot's own label
    figure.update_layout(height=380, margin={"l": 60, "r": 30, "t": 50, "b": 40},
                         legend={"orientation": "h", "xref": "container", "x": 0.14, "yref": "container",
                                 "y": 0.99, "yanchor": "top"})
    return figure


def _table(result, combine: str) -> dict:
    names = result.objectives
    return {"headers": ["#", *names, combine, "parameters", "history id"],
            "data": [[e.index, *[round(e.scores[n], 4) for n in names], round(e.fitness, 4),
                      "; ".join(f"{k} = {v}" for k, v in e.values.items()), e.entry or ""]
                     for e in result.evaluations]}


def _choices(result) -> list:
    return [(f"#{e.index}: " + " / ".join(f"{n} {e.scores[n]:.3g}" for n in result.objectives), e.index - 1)
            for e in result.ranked()]


@gpu
@handler
def run_search(recipe: str, parameters: str, probe_sets: list, probe_count: float, texts: str, budget: float,
               seed: float, combine: str, request: gr.Request = None, profile: gr.OAuthProfile | None = None,
               progress=gr.Progress()):
    """Search, yielding (plot, table, status, evaluation choices) after each evaluation; each
    evaluation runs in this request's own thread between yields, so Stop (or a cancelled
    request) ends the search after the current one."""
    from merging import LiveMerge
    from merging.pipeline import plan_stages
    from merging.search import Budget, LocalEvaluator, iter_search, parse_space

    from .lab import LIVE_CACHE_BYTES

    config = _config(recipe)
    if not isinstance(parameters, str):
        raise MergeError("the parameters to search are text, one a line")
    specs = text_lines(parameters)
    if len(specs) > MOST_PARAMETERS:
        raise MergeError(f"{len(specs)} parameters to search; at most {MOST_PARAMETERS}")
    space = parse_space(config, specs)  # every parameter checked, and the candidates' recipes
    evaluations = clamp_check("search_evaluations", budget, "evaluations", minimum=1)
    if combine not in ("sum", "min"):
        raise MergeError("combine the objectives by their sum or their minimum")
    objectives = search_objectives(config, probe_sets, probe_count, texts)
    seed = whole_number(seed, "seed", minimum=0)
    if seed >= 2**32 - 1:
        raise MergeError(f"the seed must be below {2**32 - 1}")
    with SESSIONS.use(session_hash(request)) as session:
        session.stop_search.clear()
        session.search_result = None

        def build(point):
            SESSIONS.reserve(session, "search", plan_stages(point)[0].live_model_bytes + LIVE_CACHE_BYTES)
            return LiveMerge(point, cache_budget_bytes=LIVE_CACHE_BYTES, max_memory=server_max_memory(),
                             offload_folder=session.workdir() / "offload")

        figure, table, choices = gr.update(), gr.update(), gr.update()
        progress(0, desc=f"evaluation 1 of {evaluations}")
        yield figure, table, f"Searching {space.size} dimension(s) with CMA-ES: {evaluations} evaluations ...", choices
        result = None
        try:
            for evaluation, result in iter_search(space, objectives, Budget(evaluations=evaluations), seed=seed,
                                                  combine=combine, evaluator=LocalEvaluator(objectives, build=build),
                                                  history=history(), user=user_key(request, profile)):
                session.search_result = result
                progress(len(result.evaluations) / evaluations,
                         desc=f"evaluation {len(result.evaluations)} of {evaluations}")
                figure, table, choices = search_figure(result), _table(result, combine), gr.update(
                    choices=_choices(result))
                if session.stop_search.is_set():
                    result.stopped = "stopped"
                    break
                yield figure, table, f"{len(result.evaluations)} of {evaluations} evaluations", choices
        finally:
            SESSIONS.release(session, "search")  # the search's model goes with the loop
    if result is None:
        yield figure, table, "**Done**: no evaluation.", choices
        return
    best = result.best
    said = ", ".join(f"{n} {best.scores[n]:.3g}" for n in result.objectives)
    yield (figure, table, f"**Done** ({result.stopped}): {len(result.evaluations)} evaluations, recorded in the "
                          f"history; the best is #{best.index} ({said}).", choices)


@handler
def stop_search(request: gr.Request = None) -> str:
    session = SESSIONS.peek(session_hash(request))
    if session is not None:
        session.stop_search.set()
    return "Stopping after the current evaluation."


@handler
def evaluation_recipe(index: Optional[int], request: gr.Request = None) -> str:
    """The recipe of one evaluation of the last search, for the Lab (which then merges it)."""
    session = SESSIONS.peek(session_hash(request))
    result = session.search_result if session is not None else None
    evaluations = result.evaluations if result is not None else []
    if index is None or not 0 <= int(index) < len(evaluations):
        raise MergeError("run a search, then pick one of its evaluations")
    return evaluations[int(index)].recipe


def build_search_panel(lab_recipe: gr.Code, family: Optional[dict], after_load) -> None:
    """`after_load(event)` chains the Lab's merge after an evaluation is loaded into its recipe."""
    gr.Markdown("Search parameters of the **Lab's recipe** with CMA-ES: each candidate is merged in memory (in "
                "place, tens of milliseconds) and scored; the plot grows with every evaluation. One parameter a "
                "line: `t` (everywhere), `t@points:3` (a gradient of 3 control points over the layers), "
                "`t@layers:4-9`, `weight@MODEL=0:1`, `density@MODEL`.")
    with gr.Row():
        parameters = gr.Textbox("t@points:3", lines=3, label="parameters to search (one a line)", scale=2)
        with gr.Column(scale=1):
            probe_sets = gr.CheckboxGroup(list(PROBE_SETS), value=list(PROBE_SETS) if family else [],
                                          label="objectives: the demo family's skill probes (accuracy)")
            probe_count = gr.Number(8, precision=0, minimum=1, maximum=30, label="probes per set")
        texts = gr.Textbox(lines=3, label="objective: perplexity on these texts (one a line; lower is better)",
                           scale=2)
    with gr.Row():
        budget = gr.Number(16, precision=0, minimum=1, label="evaluations to run")
        seed = gr.Number(0, precision=0, minimum=0, label="seed")
        combine = gr.Radio([("the worse objective", "min"), ("their sum", "sum")], value="min",
                           label="with several objectives, maximize")
    with gr.Row():
        run = gr.Button("Search", variant="primary")
        stop_button = gr.Button("Stop")
    status = gr.Markdown()
    plot = gr.Plot(label="every evaluation")
    table = gr.Dataframe({"headers": ["#", "score", "parameters", "history id"], "data": []},
                         label="every evaluation, in order", interactive=False, elem_id="search-table")
    choice = gr.Dropdown([], label="load an evaluation into the Lab (and merge it)", type="value")
    run.click(run_search, inputs=[lab_recipe, parameters, probe_sets, probe_count, texts, budget, seed, combine],
              outputs=[plot, table, status, choice], api_name="search", **heavy_queue())
    stop_button.click(stop_search, outputs=status, api_name="search_stop")
    after_load(choice.input(evaluation_recipe, inputs=choice, outputs=lab_recipe, api_name="search_point"))
