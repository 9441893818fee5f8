"""The lab: a recipe, a t slider, Merge (in place), weight diagnostics, and the arena where
model A, model B and the merge answer the same prompt with the same settings.

Every handler takes the session from the registry; no model or tensor goes into gr.State.
"""

from __future__ import annotations

import html
import random
import re
from contextlib import closing
from typing import Optional

import gradio as gr

from merging import MergeConfig, MultiStageConfig, MergeError
from merging.analysis import METRICS, diagnose_plan, heatmap
from merging.config import recipe_from_text
from merging.evaluate import layer_facts, with_parameter
from merging.generation import Sampling, stream_many
from merging.layer_values import (edit_range, expand, layer_parameters, parameter_bounds, points_from_config,
                                   require_layer_parameter, with_layer_points)
from merging.limits import (check as check_limit, clamp_check, finite_number, is_public_deployment, limit,
                            whole_number)
from merging.placement import server_max_memory
from merging.plan import format_bytes
from merging.pipeline import merge_stages_into, plan_stages

from . import layers
from .builder import build_builder, short_name
from .common import gpu, handler, heavy_queue, page_and_api, read_recipe, remember, session_hash
from .publish_panel import build_publish_panel
from .session import PARENTS, SESSIONS

LAB_RECIPE = """\
models:
  - model: {reverse}
merge_method: slerp
base_model: {json}
parameters:
  t: 0.5
dtype: float32
"""
LIVE_CACHE_BYTES = 512 * 1024**2  # a session's cache of pruned task vectors (TIES/DARE weight changes)


def _config(recipe: str) -> MergeConfig:
    return read_recipe(recipe, MergeConfig,
                       "the lab merges one recipe at a time; multi-stage files merge from the command line")


@handler
def set_t(recipe: str, t: float) -> str:
    """The recipe with one global t (replacing gradients and filters)."""
    return with_parameter(_config(recipe), "t", finite_number(t, "t")).to_yaml()


def memory_estimate(plan) -> str:
    """What building the session will hold: the merged model, and each parent for the arena."""
    return (f"about {format_bytes(plan.live_model_bytes)} for the merged model, the same again for each of the "
            f"two parents in the arena, and {format_bytes(plan.source_bytes)} of source weights mapped from disk")


@gpu
@handler
def merge_recipe(recipe: str, trust_remote_code: bool = False, request: gr.Request = None,
                 profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
    """Build the session's merged model (saying first what it will hold, within the server's
    memory budget), or update it in place. A multi-stage recipe merges its earlier stages into
    the session's folder first. `trust_remote_code` lets models with their own architecture
    code run it (never on a public deployment)."""
    from merging import LiveMerge

    trust_remote_code = bool(trust_remote_code) and not is_public_deployment()
    config = recipe_from_text(recipe or "")
    if not isinstance(config, (MergeConfig, MultiStageConfig)):
        raise MergeError("the lab merges merge recipes; build a mixture of experts in its own tab")
    plans = plan_stages(config)  # every stage checked before any work
    with SESSIONS.use(session_hash(request)) as session:
        if isinstance(config, MultiStageConfig):
            written = sum(plan.output_bytes for plan in plans[:-1])
            check_limit("output_bytes", written, f"the earlier stages write {format_bytes(written)}")
            yield f"Merging {len(plans) - 1} earlier stage(s) to disk first."
            config = merge_stages_into(config, session.workdir() / "stages", plans=plans)
            plans = plan_stages(config)
        with session.lock.write():
            live = session.live
            if live is not None and (live.trust_remote_code != trust_remote_code
                                     or set(live.config.referenced_models()) != set(config.referenced_models())):
                session.live = live = None  # other models: the old one goes before the new one is built
                SESSIONS.release(session, "live")
            if live is None:
                SESSIONS.reserve(session, "live", plans[-1].live_model_bytes + LIVE_CACHE_BYTES)
                yield f"Building: {memory_estimate(plans[-1])}."
                session.live = LiveMerge(config, trust_remote_code=trust_remote_code,
                                         cache_budget_bytes=LIVE_CACHE_BYTES, max_memory=server_max_memory(),
                                         offload_folder=session.workdir() / "offload",
                                         progress=tensor_progress(progress, "building the merged model"))
                stats = session.live.last_stats
            else:
                stats = live.update(config, progress=tensor_progress(progress, "re-merging the changed tensors"))
        entry = remember(recipe, "merge", request, profile)
    yield f"**Merged** (history #{entry}). {stats}"


def tensor_progress(progress: gr.Progress, what: str):
    """A LiveMerge progress callback that moves the page's bar: one step per tensor."""
    return lambda done, total: progress((done, total), desc=what, unit="tensors")


PARENT_PANES = ("A", "B")  # the arena's panes for parents; the merge has the third


def _pane_models(session) -> tuple[list[tuple[str, object, object]], list[str]]:
    """The arena's panes: each parent the recipe names (up to two), then the merge, each as
    (label, model, tokenizer, hover text); and the parents left without a pane (a recipe of
    three or more models)."""
    live = session.live
    names = live.config.referenced_models()
    dtype = next(live.model.parameters()).dtype
    panes = []
    for label, name in zip(PARENT_PANES, names):
        model, tokenizer = PARENTS.get(name, dtype, live.trust_remote_code)
        panes.append((f"{label}: {short_name(name)}", model, tokenizer, name))
    panes.append(("merged", live.model, live.tokenizer, "the merged model"))
    return panes, [short_name(name) for name in names[len(PARENT_PANES):]]


def hover(text: str, full: str) -> str:
    """Markdown showing `text`, with `full` when the pointer rests on it (both escaped: a
    model reference is a visitor's text)."""
    return f'<span title="{html.escape(full, quote=True)}">{html.escape(text)}</span>'


def arena_sampling(prompt: str, max_new_tokens, temperature, seed) -> Sampling:
    """The arena's settings from a request, each bounded before any work."""
    if not prompt or not prompt.strip():
        raise MergeError("write a prompt first")
    from merging.limits import check

    check("prompt_chars", len(prompt), f"the prompt is {len(prompt)} characters")
    temperature = finite_number(temperature, "temperature")
    if not 0 <= temperature <= 5:
        raise MergeError(f"temperature must be between 0 and 5, got {temperature}")
    return Sampling(max_new_tokens=clamp_check("new_tokens", max_new_tokens, "max new tokens", minimum=1),
                    temperature=temperature, seed=_seed(seed))


def _seed(seed) -> int:
    return whole_number(seed, "the seed") % 2**63


@gpu
@handler
def ask(prompt: str, max_new_tokens: int, temperature: float, seed: int, blind: bool = False,
        request: gr.Request = None):
    """Stream the same prompt, seed and sampling to model A, model B and the merge (in a
    random order of panes, unnamed, when `blind`; vote to reveal). A merge waits until the
    answers are done: it never rewrites the weights under a generation."""
    sampling = arena_sampling(prompt, max_new_tokens, temperature, seed)
    with SESSIONS.reading(session_hash(request), "live", "press Merge first: there is no merged model yet") as session:
        panes, without_pane = _pane_models(session)
        order = list(range(len(panes)))
        if blind:
            random.Random().shuffle(order)
        # the merge keeps the third pane; with one parent the second pane stays empty
        slots = list(range(len(panes) - 1)) + [2]
        missing = [f"model {label}" for label in PARENT_PANES[len(panes) - 1:]]
        notes = ([f"this recipe names {len(panes) - 1} model(s): no {' or '.join(missing)} to show"] if missing else []) + (
            [f"not shown: {', '.join(without_pane)} (the arena has panes for two parents)"] if without_pane else [])
        histories = [[{"role": "assistant", "content": f"({notes[0]})"}] if notes else [] for _ in range(3)]
        labels = ["an empty pane"] * 3
        for slot, source in zip(slots, order):
            histories[slot] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
            labels[slot] = panes[source][0]
        session.blind_order = labels if blind else None
        # short names on the page, the model's full source on hover
        shown = [f"pane {slot + 1}" if blind else hover(panes[source][0], panes[source][3])
                 for slot, source in zip(slots, order)]
        speeds = [""] * len(panes)

        def page():
            return (*histories, " · ".join([s for s in speeds if s] + notes))

        # closing(): a cancelled request closes the stream, and with it every generation thread
        with closing(stream_many([(panes[source][1], panes[source][2]) for source in order], prompt, sampling,
                                 max_prompt_tokens=limit("prompt_tokens"))) as pieces:
            for index, piece in pieces:
                if isinstance(piece, str):
                    histories[slots[index]][-1]["content"] += piece
                else:
                    speeds[index] = f"{shown[index]}: {piece.new_tokens} tokens, {piece.tokens_per_second:.1f} tokens/s"
                yield page()


@handler
def vote(choice: str, request: gr.Request = None) -> str:
    """Reveal which pane was which, after a blind round."""
    session = SESSIONS.peek(session_hash(request))
    order = session.blind_order if session is not None else None
    if not order:
        raise MergeError("ask in blind mode first, then vote")
    if choice not in ("pane 1", "pane 2", "pane 3") or int(choice[-1]) > len(order):
        raise MergeError("pick one of the panes")
    picked = int(choice[-1]) - 1
    reveal = ", ".join(f"pane {i + 1} was {label}" for i, label in enumerate(order))
    session.blind_order = None
    return f"You preferred pane {picked + 1}: **{order[picked]}**. ({reveal})"


def clear():
    return [], [], [], ""


@handler
def show_diagnostics(recipe: str, metric: str, request: gr.Request = None):
    """A layers x modules heatmap of `metric`, per-layer curves of it with the merge's exact
    per-layer t (slerp fallbacks marked x), and the records behind them."""
    from merging.analysis import layer_curves, parameter_records

    if metric not in METRICS:
        raise MergeError(f"unknown metric '{metric}'")
    plan = plan_stages(_config(recipe))[0]
    records = diagnose_plan(plan)
    if not records:
        raise MergeError("this recipe has no tensor with two inputs to compare")
    name = next((p.name for p in plan.method.global_parameters if p.name == "t"), None)
    parameters = parameter_records(plan, name) if name else None
    return heatmap(records, metric), layer_curves(records, metric, parameters, name or ""), records


def _names(config: MergeConfig) -> tuple[str, str]:
    names = [short_name(n) for n in config.referenced_models()]
    return (names + ["model A", "model B"])[0], (names[1:] + ["model B"])[0]


def parameter_label(config: MergeConfig, key: str) -> str:
    """`t` (with what its ends give, for slerp), or `weight of MODEL` for `weight@MODEL`."""
    name, _, model = key.partition("@")
    if model:
        return f"{name} of {short_name(model)}"
    if name == "t" and config.merge_method == "slerp":
        return "t (0 = {}, 1 = {})".format(*_names(config))
    return name


def parameter_choices(config: MergeConfig) -> list[tuple[str, str]]:
    """What the per-layer panel can shape in this recipe, as (label, key) pairs."""
    return [(parameter_label(config, key), key) for key in layer_parameters(config)]


def _figure(config: MergeConfig, key: str, points, count: int):
    return layers.values_figure(*points, count, parameter_label(config, key), parameter_bounds(config, key))


@handler
def set_layers(recipe: str, attention: str, mlp: str, other: str, parameter: str = "t", request: gr.Request = None):
    """Write the per-layer control points of `parameter` (`t`, or `weight@MODEL`: see
    merging.layer_values) into the recipe as a filter list; show the values."""
    config = _config(recipe)
    return _write_points(config, parameter, attention, mlp, other, *layer_facts(config))


def _write_points(config: MergeConfig, key: str, attention: str, mlp: str, other: str, count: int,
                  filters: tuple[str, str]):
    """The recipe with these control points for `key`, and the per-layer values they give
    (setting a value never changes the layer count, so the caller's count serves)."""
    points = [layers.parse_points(text, label) for text, label in
              ((attention, "attention"), (mlp, "MLP"), (other, "other"))]
    changed = with_layer_points(config, key, *points, filters=filters)
    return changed.to_yaml(), _figure(changed, key, points, count)


@handler
def read_layers(recipe: str, parameter: str = "t", request: gr.Request = None):
    """The recipe's `parameter` as control points for attention, MLP and the rest, and their values."""
    return layer_views(_config(recipe), parameter)


def layer_views(config: MergeConfig, key: str = "t"):
    """The config's `key` as (attention, MLP, other) control points, and the plot of their values."""
    count, filters = layer_facts(config)
    points = points_from_config(config, key, filters)
    return (*[layers.format_points(p) for p in points], _figure(config, key, points, count))


@handler
def use_preset(name: str) -> tuple[str, str, str]:
    if name not in layers.PRESETS:
        raise MergeError(f"unknown preset '{name}'")
    return tuple(layers.format_points(points) for points in layers.PRESETS[name])


@handler
def edit_layers(recipe: str, attention: str, mlp: str, other: str, module: str, operation: str,
                first: float, last: float, amount: float, parameter: str = "t", request: gr.Request = None):
    """set / add / multiply one module type's `parameter` on a range of layers (one value per
    layer), kept within the parameter's range."""
    config = _config(recipe)
    count, filters = layer_facts(config)
    texts = {"attention": attention, "MLP": mlp, "other": other}
    if module not in texts:
        raise MergeError(f"unknown module type '{module}'")
    points = layers.parse_points(texts[module], module)
    if operation not in ("set", "add", "multiply"):
        raise MergeError(f"unknown operation '{operation}'")
    first, last = whole_number(first, "from layer"), whole_number(last, "to layer")
    require_layer_parameter(config, parameter)  # a parameter the method lacks: said before any work
    low, high = parameter_bounds(config, parameter)
    texts[module] = layers.format_points(edit_range(expand(points, count), operation, first, last,
                                                    finite_number(amount, "amount"), low=low, high=high))
    changed_recipe, figure = _write_points(config, parameter, texts["attention"], texts["MLP"], texts["other"],
                                           count, filters)
    return texts["attention"], texts["MLP"], texts["other"], changed_recipe, figure


def forget_session(request: gr.Request) -> None:
    SESSIONS.drop(session_hash(request))


T_PER_LAYER = "t varies per layer in this recipe: moving this sets one t everywhere"
STALE_MERGE = ("The merged model{entry} is from an **older recipe**: the recipe changed since. "
               "Press **Merge** to bring it up to date.")
STALE_ANSWERS = "*These answers came from an older recipe's merge: merge and ask again.*"
STALE_WEIGHTS = "*These plots are from an older recipe: press Show diagnostics again.*"


def recipe_key(recipe: str) -> str:
    """The recipe as its config writes it, so that spacing and comments are no change; as
    typed when it does not read."""
    try:
        return recipe_from_text(recipe or "").to_yaml()
    except Exception:  # half-typed: any change of text is a change
        return (recipe or "").strip()


def _t_views(recipe: str, config: MergeConfig, layered: Optional[str]):
    """The slider, its note and the bring-back button as the recipe's t says; and the
    per-layer recipe kept for bringing back (this one, when its t varies per layer)."""
    parameter = next((p for p in config.method.global_parameters if p.name == "t"), None)
    if parameter is None:
        return (gr.update(label=f"t: {config.merge_method} has no t (its parameters are in the recipe)",
                          interactive=False), "", gr.update(visible=False), layered)
    setting = (config.parameters or {}).get("t", parameter.default)
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        if layered is not None and set(_config(layered).referenced_models()) == set(config.referenced_models()):
            return (gr.update(value=float(setting), label=parameter_label(config, "t"), interactive=True),
                    f"One t = {float(setting):g} everywhere now; the per-layer t it replaced is kept.",
                    gr.update(visible=True), layered)
        return (gr.update(value=float(setting), label=parameter_label(config, "t"), interactive=True), "",
                gr.update(visible=False), None)
    count, filters = layer_facts(config)
    values = [v for points in points_from_config(config, "t", filters) for v in expand(points, count)]
    return (gr.update(value=round(sum(values) / len(values), 4), label=T_PER_LAYER, interactive=True),
            f"t varies per layer ({min(values):.3g} to {max(values):.3g}; see *Per-layer values*). "
            "Moving the slider replaces it with one t, and keeps it to bring back.",
            gr.update(visible=False), recipe)


def _layer_views(config: MergeConfig, key: Optional[str]):
    """The per-layer panel as the recipe says: the parameters it can shape (keeping `key` when
    the recipe still has it), their control points and plot; empty for a method with none."""
    choices = parameter_choices(config)
    keys = [k for _, k in choices]
    preferred = ["t"] + [k for k in keys if "@" in k] + keys  # t, else the models' own values
    key = key if key in keys else next((k for k in preferred if k in keys), None)
    choice = gr.update(choices=choices, value=key)
    if key is None:
        return choice, "", "", "", None
    try:
        return (choice, *layer_views(config, key))
    except MergeError:
        return choice, "", "", "", None


@handler
def recipe_views(recipe: str, merged: Optional[dict], asked: Optional[str], diagnosed: Optional[str],
                 layered: Optional[str], shaped: Optional[str] = None, request: gr.Request = None):
    """Every view of the recipe, after any change of it: the t slider (its value, or marked as
    varying per layer), the per-layer panel and plot, and the status, answers and plots marked
    when they belong to an older recipe. A recipe that does not read yet changes only the marks."""
    key = recipe_key(recipe)
    if merged is None:
        status = gr.update()
    elif merged["recipe"] == key:
        status = merged["status"]
    else:
        status = STALE_MERGE.format(entry=f" (history #{merged['entry']})" if merged.get("entry") else "")
    marks = (status, STALE_ANSWERS if asked is not None and asked != key else "",
             STALE_WEIGHTS if diagnosed is not None and diagnosed != key else "")
    try:
        config = _config(recipe)
        views = (*_t_views(recipe, config, layered), *_layer_views(config, shaped))
    except Exception:
        views = (gr.update(),) * 3 + (layered,) + (gr.update(),) * 5
    return (*views, *marks)


def merged_record(recipe: str, status: str, merged: Optional[dict]) -> Optional[dict]:
    """What the session's merged model was built from, after a merge that succeeded."""
    if not str(status or "").startswith("**Merged**"):
        return merged
    entry = re.search(r"history #(\d+)", status)
    return {"recipe": recipe_key(recipe), "status": status, "entry": entry[1] if entry else None}


def build_lab(family: Optional[dict]):
    """The lab's components; returns its recipe box and a function that chains a merge of
    it after another event (the sweep tab loads points into the box that way)."""
    recipe_text = LAB_RECIPE.format(**family) if family else ""
    with gr.Row():
        with gr.Column(scale=3):
            recipe = gr.Code(recipe_text, language="yaml", label="Recipe (mergekit YAML)")
        with gr.Column(scale=2):
            t = gr.Slider(0, 1, value=0.5, step=0.05, label=parameter_label(_config(recipe_text), "t")
                          if family else "t (0 = the base model, 1 = the other model)")
            t_note = gr.Markdown()
            bring_back = gr.Button("Bring back the per-layer t", size="sm", visible=False)
            merge = gr.Button("Merge", variant="primary")
            status = gr.Markdown("Press **Merge** to build the merged model.")
            trust = gr.Checkbox(False, label="trust remote code: run the model repos' own Python "
                                "(only for architectures transformers lacks)", visible=not is_public_deployment())
    merged, asked, diagnosed, layered = gr.State(None), gr.State(None), gr.State(None), gr.State(None)
    t.input(set_t, inputs=[recipe, t], outputs=recipe, api_name="set_t")
    bring_back.click(lambda kept: kept, inputs=layered, outputs=recipe, api_name="bring_back_layers")
    page_and_api(merge.click, merge_recipe, inputs=[recipe, trust], outputs=status, api_name="merge", **heavy_queue(
        )).then(merged_record, inputs=[recipe, status, merged], outputs=merged, api_visibility="private")

    with gr.Row():
        panes = [gr.Chatbot(label=label, height=230, elem_classes=["arena-pane"])
                 for label in ("model A", "model B", "merged")]
    speed = gr.Markdown()
    arena_note = gr.Markdown()
    with gr.Row():
        prompt = gr.Textbox("Reverse the words: red lamp quiet", label="Prompt", scale=4)
        send = gr.Button("Ask all three", variant="primary", scale=1)
        reset = gr.Button("Clear", scale=1)
    with gr.Row():
        max_new_tokens = gr.Slider(1, 256, value=32, step=1, label="max new tokens")
        temperature = gr.Slider(0, 1.5, value=0, step=0.05, label="temperature (0 = greedy)")
        seed = gr.Number(0, precision=0, label="seed")
        blind = gr.Checkbox(False, label="blind: shuffle the panes and hide their names until you vote")
    with gr.Row():
        again = gr.Button("Regenerate all")
        choice = gr.Radio(["pane 1", "pane 2", "pane 3"], label="which answer is best?")
        vote_button = gr.Button("Vote and reveal")
    revealed = gr.Markdown()
    arena_inputs = [prompt, max_new_tokens, temperature, seed, blind]
    for button, name in ((send, "ask"), (again, "regenerate")):
        button.click(ask, inputs=arena_inputs, outputs=[*panes, speed], api_name=name).success(
            lambda record: record and record["recipe"], inputs=merged, outputs=asked, api_visibility="private")
    reset.click(clear, outputs=[*panes, speed], api_name="clear")
    vote_button.click(vote, inputs=choice, outputs=revealed, api_name="vote")

    build_builder(recipe, family)

    with gr.Accordion("Per-layer values: control points for attention, MLP and the rest", open=False):
        with gr.Row():
            # custom values: a script names a model's value (weight@MODEL) that the page lists only
            # once the recipe is read; the library refuses a name the method does not take
            shaped = gr.Dropdown([("t", "t")], value="t", label="parameter", scale=2, allow_custom_value=True,
                                 info="what the method takes: its t or lambda, or each model's weight or density")
            preset = gr.Dropdown(list(layers.PRESETS), value=None, label="preset")
            read = gr.Button("Read from recipe")
            apply = gr.Button("Write into recipe", variant="primary")
        with gr.Row():
            attention = gr.Textbox("0.5", label="attention (self_attn) control points")
            mlp = gr.Textbox("0.5", label="MLP control points")
            other = gr.Textbox("0.5", label="other tensors (norms, embeddings)")
        with gr.Row():
            module = gr.Dropdown(["attention", "MLP", "other"], value="attention", label="edit")
            operation = gr.Dropdown(["set", "add", "multiply"], value="set", label="operation")
            first = gr.Number(0, precision=0, label="from layer")
            last = gr.Number(0, precision=0, label="to layer")
            amount = gr.Number(1.0, label="amount")
            edit = gr.Button("Apply to the range")
        curve = gr.Plot(label="the exact values per layer the merge will use")
        with gr.Accordion("Expert: one slider per layer", open=False):
            with gr.Row():
                expert_module = gr.Dropdown(["attention", "MLP", "other"], value="attention", label="module type")
                expert_show = gr.Button("Show one slider per layer")
                expert_use = gr.Button("Use these values", variant="primary")

            @gr.render(inputs=[recipe, attention, mlp, other, expert_module, shaped], triggers=[expert_show.click])
            @handler
            def per_layer_sliders(recipe_text, attention_text, mlp_text, other_text, module_name, key,
                                  request: gr.Request = None):
                config = _config(recipe_text)
                count, filters = layer_facts(config)
                require_layer_parameter(config, key)
                low, high = parameter_bounds(config, key)
                texts = {"attention": attention_text, "MLP": mlp_text, "other": other_text}
                values = expand(layers.parse_points(texts[module_name], module_name), count)
                low = min([0.0 if low is None else low] + values)
                high = max([1.0 if high is None else high] + values)
                sliders = []
                gr.Markdown(f"**{parameter_label(config, key)}** of the {module_name} tensors, one slider per layer")
                with gr.Row(equal_height=False):
                    for layer, value in enumerate(values):
                        sliders.append(gr.Slider(low, high, value=round(value, 4), step=0.01, label=f"layer {layer}",
                                                 min_width=120, interactive=True,
                                                 key=f"expert-{key}-{module_name}-{layer}"))

                @handler
                def use_values(recipe_now, attention_now, mlp_now, other_now, *slider_values):
                    texts = {"attention": attention_now, "MLP": mlp_now, "other": other_now}
                    texts[module_name] = layers.format_points([float(v) for v in slider_values])
                    new_recipe, figure = _write_points(_config(recipe_now), key, texts["attention"], texts["MLP"],
                                                       texts["other"], count, filters)
                    return texts["attention"], texts["MLP"], texts["other"], new_recipe, figure

                expert_use.click(use_values, inputs=[recipe, attention, mlp, other, *sliders],
                                 outputs=[attention, mlp, other, recipe, curve], api_name="use_layer_sliders")
    preset.input(use_preset, inputs=preset, outputs=[attention, mlp, other], api_name="preset").then(
        set_layers, inputs=[recipe, attention, mlp, other, shaped], outputs=[recipe, curve],
        api_name="preset_write", api_visibility="private")  # named: else it takes /set_layers from the button
    apply.click(set_layers, inputs=[recipe, attention, mlp, other, shaped], outputs=[recipe, curve],
                api_name="set_layers")
    read.click(read_layers, inputs=[recipe, shaped], outputs=[attention, mlp, other, curve], api_name="read_layers")
    shaped.input(read_layers, inputs=[recipe, shaped], outputs=[attention, mlp, other, curve],
                 api_visibility="private")
    edit.click(edit_layers, inputs=[recipe, attention, mlp, other, module, operation, first, last, amount, shaped],
               outputs=[attention, mlp, other, recipe, curve], api_name="edit_layers")

    gr.Markdown("### Weights")
    with gr.Row():
        metric = gr.Dropdown(list(METRICS), value="angle_deg", label="metric")
        show = gr.Button("Show diagnostics")
    with gr.Row():
        plot = gr.Plot(label="layers x module types")
        curves = gr.Plot(label="per layer, with the merge's t (x: slerp falls back to linear)")
    weights_note = gr.Markdown()
    table = gr.JSON(label="records", visible=False)
    show.click(show_diagnostics, inputs=[recipe, metric], outputs=[plot, curves, table], api_name="diagnostics",
               **heavy_queue()).success(recipe_key, inputs=recipe, outputs=diagnosed, api_visibility="private")
    # the recipe is the one source of truth: after any change of it (or of what was built
    # from it) every view shows what it says, or is marked as from an older recipe
    view_inputs = [recipe, merged, asked, diagnosed, layered, shaped]
    view_outputs = [t, t_note, bring_back, layered, shaped, attention, mlp, other, curve, status, arena_note,
                    weights_note]
    for trigger in (recipe.change, merged.change, asked.change, diagnosed.change):
        trigger(recipe_views, inputs=view_inputs, outputs=view_outputs, api_visibility="private",
                show_progress="hidden", trigger_mode="always_last")

    build_publish_panel(recipe)

    def merge_after(event):
        """Chain a merge of the recipe box after `event` (which wrote into it)."""
        return event.then(merge_recipe, inputs=[recipe, trust], outputs=status, **heavy_queue()).then(
            merged_record, inputs=[recipe, status, merged], outputs=merged, api_visibility="private")

    return recipe, merge_after
