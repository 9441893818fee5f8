"""Sweeps: move one parameter of the Lab's recipe over a range, score every point with
perplexity on texts you paste or upload and with the demo family's skill probes, and
watch the scores arrive point by point. Any point loads into the Lab; the table exports
as CSV; every point is recorded in the history with its scores.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import gradio as gr
import plotly.graph_objects as go

from merging import MergeConfig, MergeError
from merging.limits import check as check_limit, clamp_check, finite_number, whole_number
from merging.placement import server_max_memory

from merging.layer_values import layer_parameters

from .builder import short_name
from .common import gpu, handler, heavy_queue, read_recipe, remember, session_hash, text_lines
from .session import SESSIONS

PROBE_SETS = ("json skill", "reverse skill")  # the demo family's held-out probes
LAYER_RANGE = "@layers"


def _config(recipe: str) -> MergeConfig:
    return read_recipe(recipe, MergeConfig, "sweeps run over one merge recipe (not MoE or multi-stage files)")


def parameter_choices(recipe: str, quiet: bool = False):
    """The numeric parameters the recipe's method declares: global ones, per-model ones for
    each model that takes them (not TIES's base), and a layer range of t. `quiet`: an unreadable recipe changes nothing."""
    try:
        config = _config(recipe)
    except Exception:
        if quiet:
            return gr.update()
        raise
    keys = layer_parameters(config)  # the library's rule: never a value the method ignores
    choices = [(f"{name} of {short_name(model)}" if model else f"{name} (everywhere)", key)
               for key in keys for name, _, model in [key.partition("@")]]
    if "t" in keys:
        choices.append(("t on a layer range (from / to below)", "t" + LAYER_RANGE))
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


@handler
def sweep_parameters(recipe: str):
    return parameter_choices(recipe)


def _lines(text: Optional[str], upload: Optional[str]) -> list[str]:
    """Texts to score, one per line, from the box and an uploaded file, within the limits."""
    uploaded = ""
    if upload:
        size = os.path.getsize(upload)
        check_limit("score_bytes", size, f"the uploaded file is {size} bytes")
        uploaded = Path(upload).read_text(encoding="utf-8", errors="replace")
    text = text or ""
    size = len(text.encode("utf-8", "replace")) + len(uploaded.encode("utf-8", "replace"))
    check_limit("score_bytes", size, f"the texts to score are {size} bytes")
    lines = text_lines(text) + text_lines(uploaded)
    check_limit("score_lines", len(lines), f"there are {len(lines)} texts to score")
    return lines


def _scorers(config: MergeConfig, texts_a, upload_a, texts_b, upload_b, probe_sets, probe_count) -> dict:
    """The sweep's scorers, each checked before any work: the texts are tokenized with the
    merge's tokenizer now, so texts too short to score are refused before the first merge."""
    from transformers import AutoTokenizer

    from merging.demo_skills import probes
    from merging.evaluate import perplexity_scorer, probe_scorer, tokenize_texts
    from merging.pipeline import plan_stages

    scorers = {}
    tokenizer = None
    for name, text, upload in (("ppl A", texts_a, upload_a), ("ppl B", texts_b, upload_b)):
        lines = _lines(text, upload)
        if lines:
            if tokenizer is None:
                plan = plan_stages(config)[0]
                if plan.tokenizer_donor is None:
                    raise MergeError("the models have no tokenizer to score texts with")
                tokenizer = AutoTokenizer.from_pretrained(plan.checkpoints[plan.tokenizer_donor].folder)
            tokenize_texts(tokenizer, lines)
            scorers[name] = perplexity_scorer(lines)
    count = clamp_check("probes", probe_count, "probes per set", minimum=1)
    for probe_set in probe_sets or []:
        if probe_set not in PROBE_SETS:
            raise MergeError(f"unknown probe set '{probe_set}'")
        skill = probe_set.split()[0]
        scorers[f"{skill} probes"] = probe_scorer(probes(skill, count))
    if not scorers:
        raise MergeError("give some texts for perplexity or pick a probe set: there is nothing to score with")
    return scorers


def values_between(start: float, stop: float, points: int) -> list[float]:
    if points < 2:
        raise MergeError("a sweep needs at least 2 points")
    check_limit("sweep_points", points, f"the sweep has {points} points")
    return [round(start + (stop - start) * i / (points - 1), 6) for i in range(points)]


def sweep_figure(rows: list[dict], names: list[str], parameter: str) -> go.Figure:
    """Scores against the parameter: perplexities on the left axis (log), probe accuracy on
    the right."""
    figure = go.Figure()
    for name in names:
        accuracy = name.endswith("probes")
        figure.add_trace(go.Scatter(x=[r["value"] for r in rows], y=[r[name] for r in rows], name=name,
                                    mode="lines+markers", yaxis="y2" if accuracy else "y",
                                    line={"dash": "dot" if accuracy else "solid"}))
    # the legend in the top margin, above the data and right of the plot's own label; axes grow
    # their margins for whole titles
    figure.update_layout(xaxis={"title": {"text": parameter}, "automargin": True}, height=360,
                         margin={"l": 60, "r": 60, "t": 50, "b": 40},
                         yaxis={"title": {"text": "perplexity"}, "type": "log", "automargin": True},
                         yaxis2={"title": {"text": "probe accuracy"}, "overlaying": "y", "side": "right",
                                 "range": [0, 1.05], "automargin": True},
                         legend={"orientation": "h", "xref": "container", "x": 0.17, "yref": "container",
                                 "y": 0.99, "yanchor": "top"})
    return figure


def empty_table(parameter: str = "value") -> dict:
    """The table before a sweep: its real headers (the parameter, every score, the history
    id) and no rows, not a grid numbered 1 2 3."""
    return {"headers": [parameter, "ppl A", "ppl B", *[f"{s.split()[0]} probes" for s in PROBE_SETS], "history id"],
            "data": []}


def _write_csv(path: Path, rows: list[dict], names: list[str], parameter: str) -> str:
    """The table as CSV, one file per session (each sweep overwrites the last)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([parameter, *names, "history id"])
        for row in rows:
            writer.writerow([row["value"], *[row[n] for n in names], row.get("history", "")])
    return str(path)


@gpu
@handler
def run_sweep(recipe: str, parameter: str, first_layer: float, last_layer: float, start: float, stop: float,
              points: float, texts_a: str, upload_a, texts_b: str, upload_b, probe_sets: list, probe_count: float,
              request: gr.Request = None, profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
    """Score the recipe at each value, yielding (plot, table, status, CSV file, point
    choices) as each point finishes. Each point is merged and scored in this request's own
    thread, between yields: Stop, or a cancelled request, ends the sweep after the point."""
    from merging import LiveMerge
    from merging.evaluate import iter_sweep, sweep_points
    from merging.pipeline import plan_stages

    from .lab import LIVE_CACHE_BYTES

    config = _config(recipe)
    if not parameter:
        raise MergeError("pick a parameter to sweep")
    parameter = str(parameter)
    if parameter.endswith(LAYER_RANGE):
        first = whole_number(first_layer, "from layer", minimum=0)
        parameter = f"{parameter}:{first}-{whole_number(last_layer, 'to layer', minimum=first)}"
    values = values_between(finite_number(start, "from"), finite_number(stop, "to"), whole_number(points, "points"))
    sweep_points(config, parameter, values)  # every point's recipe checked before anything is loaded
    scorers = _scorers(config, texts_a, upload_a, texts_b, upload_b, probe_sets, probe_count)
    names = list(scorers)
    with SESSIONS.use(session_hash(request)) as session:
        session.stop_sweep.clear()
        session.sweep_rows = []

        def build(point):
            SESSIONS.reserve(session, "sweep", plan_stages(point)[0].live_model_bytes + LIVE_CACHE_BYTES)
            return LiveMerge(point, cache_budget_bytes=LIVE_CACHE_BYTES, max_memory=server_max_memory(),
                             offload_folder=session.workdir() / "offload")

        rows: list[dict] = []
        figure, table, choices = gr.update(), [], gr.update()
        progress(0, desc=f"point 1 of {len(values)}")
        yield figure, table, f"Merging and scoring {len(values)} points of {parameter} ...", None, choices
        try:
            for row in iter_sweep(config, parameter, values, scorers, build=build):
                row["history"] = remember(row["recipe"], "sweep point", request, profile,
                                          {name: row[name] for name in names} | {parameter: row["value"]})
                rows.append(row)
                session.sweep_rows = rows
                progress(len(rows) / len(values), desc=f"point {len(rows)} of {len(values)}")
                figure = sweep_figure(rows, names, parameter)
                table = {"headers": [parameter, *names, "history id"],
                         "data": [[r["value"], *[round(r[n], 4) for n in names], r["history"]] for r in rows]}
                choices = gr.update(choices=[(f"{parameter} = {r['value']:g}", i) for i, r in enumerate(rows)])
                if session.stop_sweep.is_set() or len(rows) == len(values):
                    break
                yield figure, table, f"{len(rows)} of {len(values)} points", None, choices
        finally:
            SESSIONS.release(session, "sweep")  # the sweep's model goes with the loop
        csv_path = _write_csv(session.workdir() / "sweep.csv", rows, names, parameter) if rows else None
    stopped = " (stopped)" if len(rows) < len(values) else ""
    yield figure, table, f"**Done**{stopped}: {len(rows)} points, recorded in the history.", csv_path, choices


@handler
def stop_sweep(request: gr.Request = None) -> str:
    session = SESSIONS.peek(session_hash(request))
    if session is not None:
        session.stop_sweep.set()
    return "Stopping after the current point."


@handler
def point_recipe(index: Optional[int], request: gr.Request = None) -> str:
    """The recipe of one finished point, for the Lab (which then merges it)."""
    session = SESSIONS.peek(session_hash(request))
    rows = session.sweep_rows if session is not None else []
    if index is None or not 0 <= int(index) < len(rows):
        raise MergeError("run a sweep, then pick one of its points")
    return rows[int(index)]["recipe"]


def build_sweep_panel(lab_recipe: gr.Code, family: Optional[dict], after_load, tab: gr.Tab) -> None:
    """`after_load(event)` chains the Lab's merge after a point is loaded into its recipe;
    selecting `tab` refreshes the parameter choices from the Lab's recipe."""
    start_choices = parameter_choices(lab_recipe.value, quiet=True)
    gr.Markdown("Sweep one parameter of the **Lab's recipe**: each point is merged in memory and scored; the "
                "plot grows as points finish.")
    with gr.Row():
        parameter = gr.Dropdown(start_choices.get("choices", []), value=start_choices.get("value"), label="parameter",
                                scale=3, allow_custom_value=True)
        refresh = gr.Button("Parameters of the Lab's recipe", scale=1)
        first_layer = gr.Number(0, precision=0, label="from layer (layer range)", scale=1)
        last_layer = gr.Number(0, precision=0, label="to layer", scale=1)
    with gr.Row():
        start = gr.Number(0.0, label="from")
        stop = gr.Number(1.0, label="to")
        points = gr.Number(5, precision=0, minimum=2, maximum=101, label="points")
    with gr.Row():
        with gr.Column():
            texts_a = gr.Textbox(lines=3, label="texts A for perplexity (one per line)")
            upload_a = gr.File(label="or a .txt file (one text per line)", file_types=[".txt"], type="filepath",
                               height=110)
        with gr.Column():
            texts_b = gr.Textbox(lines=3, label="texts B for perplexity (one per line)")
            upload_b = gr.File(label="or a .txt file (one text per line)", file_types=[".txt"], type="filepath",
                               height=110)
        with gr.Column():
            probe_sets = gr.CheckboxGroup(list(PROBE_SETS), value=list(PROBE_SETS) if family else [],
                                          label="the demo family's held-out skill probes (accuracy)")
            probe_count = gr.Number(8, precision=0, minimum=1, maximum=30, label="probes per set")
    with gr.Row():
        run = gr.Button("Run the sweep", variant="primary")
        stop_button = gr.Button("Stop")
    status = gr.Markdown()
    with gr.Row():
        plot = gr.Plot(label="scores along the sweep")
    table = gr.Dataframe(empty_table(), label="scores", interactive=False)
    with gr.Row():
        csv_file = gr.File(label="the table as CSV", interactive=False)
        point = gr.Dropdown([], label="load a point into the Lab (and merge it)", type="value")
    inputs = [lab_recipe, parameter, first_layer, last_layer, start, stop, points, texts_a, upload_a, texts_b,
              upload_b, probe_sets, probe_count]
    refresh.click(sweep_parameters, inputs=lab_recipe, outputs=parameter, api_name="sweep_parameters")
    tab.select(lambda recipe: parameter_choices(recipe, quiet=True), inputs=lab_recipe, outputs=parameter,
               api_name="sweep_tab_choices", api_visibility="undocumented")
    run.click(run_sweep, inputs=inputs, outputs=[plot, table, status, csv_file, point], api_name="sweep",
              **heavy_queue())
    stop_button.click(stop_sweep, outputs=status, api_name="sweep_stop")
    after_load(point.input(point_recipe, inputs=point, outputs=lab_recipe, api_name="sweep_point"))
