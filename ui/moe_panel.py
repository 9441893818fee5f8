"""The mixture-of-experts tab: pick a base and experts, write prompts per expert, build a
Mixtral-style model, then ask it and see where every token was routed.

The form writes the recipe (mergekit-moe YAML, the same file `python -m merging` builds);
Build reads the recipe. The built model lives in the session's folder and registry entry.
"""

from __future__ import annotations

import html
import time
from contextlib import closing
from typing import Optional

import gradio as gr
import plotly.graph_objects as go

from merging.moe_config import GATE_MODES, Expert, MoEConfig

from .builder import short_name
from merging import MergeError
from merging.limits import check as check_limit
from merging.plan import format_bytes

from .common import gpu, handler, heavy_queue, page_and_api, read_recipe, remember, session_hash, text_lines
from .session import SESSIONS, model_bytes

MAX_EXPERTS = 4
COLOURS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D"]
DTYPES = ["bfloat16", "float16", "float32"]


def _moe_config(recipe: str) -> MoEConfig:
    return read_recipe(recipe, MoEConfig, "this tab builds mixtures of experts: the recipe needs an 'experts' list")


@handler
def form_to_recipe(base: str, gate_mode: str, per_token: float, dtype: str, *slots) -> str:
    """The form as mergekit-moe YAML; slots are (model, positive, negative) per expert,
    and an empty model leaves its slot out."""
    if len(slots) != 3 * MAX_EXPERTS:
        raise MergeError(f"the form has {MAX_EXPERTS} expert slots of (model, positive, negative prompts)")
    experts = []
    for index in range(0, len(slots), 3):
        model, positive, negative = slots[index:index + 3]
        if model and model.strip():
            experts.append(Expert(model.strip(), text_lines(positive), text_lines(negative)))
    if not base or not base.strip():
        raise MergeError("pick a base model: attention, norms and embeddings come from it")
    if not experts:
        raise MergeError("pick at least one expert model")
    text = MoEConfig(base.strip(), experts, gate_mode, dtype or None, int(per_token or 1)).to_yaml()
    _moe_config(text)  # the same checks as on reading, said now
    return text


@handler
def recipe_to_form(recipe: str) -> list:
    """The recipe's values for the form (base, gate mode, k, dtype, then each slot)."""
    config = _moe_config(recipe)
    if len(config.experts) > MAX_EXPERTS:
        raise MergeError(f"the form shows {MAX_EXPERTS} experts; this recipe has {len(config.experts)} "
                       "(build it from the recipe as it is)")
    values = [config.base_model, config.gate_mode, config.experts_per_token, config.dtype or "bfloat16"]
    for index in range(MAX_EXPERTS):
        expert = config.experts[index] if index < len(config.experts) else None
        values += ([expert.source_model, "\n".join(expert.positive_prompts), "\n".join(expert.negative_prompts)]
                   if expert else ["", "", ""])
    return values


def _estimate(plan) -> str:
    from merging.plan import format_bytes

    base = sum(info.nbytes for info in plan.base.tensors.values())
    extra = f", plus the base ({format_bytes(base)}) while the prompts run through it" \
        if plan.config.gate_mode.startswith("hidden") else ""
    return f"about {format_bytes(plan.output_bytes)} on disk and in memory{extra}"


@gpu
@handler
def build(recipe: str, request: gr.Request = None, profile: gr.OAuthProfile | None = None,
          progress=gr.Progress()):
    """Check the recipe, build the MoE into the session's folder (within the server's memory
    budget), load it for the arena."""
    from merging.generation import load_model
    from merging.moe import build_moe, plan_moe

    config = _moe_config(recipe)
    plan = plan_moe(config)
    check_limit("output_bytes", plan.output_bytes, f"this mixture writes {format_bytes(plan.output_bytes)}")
    with SESSIONS.use(session_hash(request)) as session:
        warnings = "".join(f"\n\nwarning: {w}" for w in plan.warnings)
        with session.lock.write():
            session.moe = None  # the old model goes before the new one is built
            base = sum(info.nbytes for info in plan.base.tensors.values()) if config.gate_mode.startswith("hidden") else 0
            SESSIONS.reserve(session, "moe", plan.output_bytes + base)
            yield f"Building {len(config.experts)} experts: {_estimate(plan)}.{warnings}"
            started = time.perf_counter()

            def report(stage, done, total):
                progress(done / total, desc=stage)

            out = build_moe(config, session.workdir() / "moe", progress=report, overwrite=True, plan=plan)
            progress(1.0, desc="loading the model")
            session.moe = (*load_model(out), [short_name(e.source_model) for e in config.experts])
            SESSIONS.reserve(session, "moe", model_bytes(session.moe[0]))
        seconds = time.perf_counter() - started
        entry = remember(recipe, "moe", request, profile)
    yield (f"**Built** (history #{entry}) a MixtralForCausalLM with {len(config.experts)} experts, "
           f"{config.experts_per_token} per token, {plan.parameter_count / 1e6:.0f} M parameters "
           f"in {seconds:.1f} s.{warnings}")


def token_strip(tokens: list[str], experts: list[int], shares, names: list[str]) -> str:
    """The answer's tokens, each coloured by the expert with the largest share of it (averaged
    over layers); hover shows every expert's share."""
    legend = " ".join(f'<span style="background:{COLOURS[i % len(COLOURS)]};color:white;padding:1px 6px;'
                      f'border-radius:4px">{i}: {html.escape(name)}</span>' for i, name in enumerate(names))
    spans = []
    for token, expert, share in zip(tokens, experts, shares.tolist()):
        title = ", ".join(f"{names[i]} {value:.0%}" for i, value in enumerate(share))
        text = html.escape(token).replace("\n", "↵")
        spans.append(f'<span class="moe-token" data-expert="{expert}" title="{html.escape(title)}" '
                     f'style="background:{COLOURS[expert % len(COLOURS)]};color:white;padding:1px 1px;'
                     f'margin:1px;border-radius:3px;white-space:pre">{text}</span>')
    return (f'<div class="moe-legend">{legend}</div>'
            f'<div class="moe-strip" style="line-height:2;margin-top:6px">{"".join(spans)}</div>')


def routing_figure(probabilities, names: list[str], per_token: int) -> go.Figure:
    """Layers x experts: the router's probabilities at the prompt's last token, the chosen
    top-k marked."""
    values = probabilities.tolist()
    chosen = probabilities.topk(per_token, dim=-1).indices.tolist()
    marks = [["✓" if e in picks else "" for e in range(len(names))] for picks in chosen]
    figure = go.Figure(go.Heatmap(z=values, x=[f"{i}: {n}" for i, n in enumerate(names)],
                                  y=list(range(len(values))), text=marks, texttemplate="%{text}",
                                  colorscale="Blues", zmin=0, zmax=1, colorbar={"title": "p"}))
    figure.update_layout(height=max(260, 14 * len(values) + 80), margin={"l": 50, "r": 10, "t": 30, "b": 40},
                         yaxis={"title": "layer", "autorange": "reversed"},
                         title="router at the prompt's last token (✓ = chosen)")
    return figure


@gpu
@handler
def ask(prompt: str, max_new_tokens: float, temperature: float, seed: float, request: gr.Request = None):
    """The MoE's answer streamed as it is generated; at the end its tokens coloured by
    expert and the routers' choice per layer (one more forward pass over the answer)."""
    from merging.limits import limit
    from merging.routing import RoutedAnswer, stream_routed

    from .lab import arena_sampling

    sampling = arena_sampling(prompt, max_new_tokens, temperature, seed)
    with SESSIONS.reading(session_hash(request), "moe", "press Build first: there is no mixture of experts yet") \
            as session:
        model, tokenizer, names = session.moe
        started = time.perf_counter()
        text, answer = "", None
        # closing(): a cancelled request closes the stream, and with it the generation thread
        with closing(stream_routed(model, tokenizer, prompt, sampling,
                                   max_prompt_tokens=limit("prompt_tokens"))) as pieces:
            for piece in pieces:
                if isinstance(piece, RoutedAnswer):
                    answer = piece
                    continue
                text += piece
                history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
                yield (history, "", gr.update(),
                       f"generating ... {time.perf_counter() - started:.1f} s; the routing follows the answer")
    seconds = time.perf_counter() - started
    counts = [answer.answer_experts.count(i) for i in range(len(names))]
    summary = ", ".join(f"{names[i]} {count}" for i, count in enumerate(counts))
    history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.text}]
    yield (history, token_strip(answer.tokens, answer.answer_experts, answer.answer_shares, names),
           routing_figure(answer.last_prompt_token, names, model.config.num_experts_per_tok),
           f"{len(answer.tokens)} tokens in {seconds:.1f} s; tokens per expert: {summary}")


def build_moe_panel(family: Optional[dict]) -> gr.Code:
    """The tab's components; returns its recipe box (the history restores into it)."""
    from merging.demo_skills import moe_recipe

    recipe_text = moe_recipe(family) if family else ""
    start = recipe_to_form(recipe_text) if family else [""] * 4 + [""] * 3 * MAX_EXPERTS
    gr.Markdown("Build a Mixtral-style mixture of experts from dense Llama/Mistral models: attention, "
                "norms and embeddings from the base, each expert's MLPs from its model, and a router per "
                "layer that sends a token to the experts whose prompts it resembles.")
    with gr.Row():
        base = gr.Textbox(start[0], label="base model (attention, norms, embeddings)", scale=3)
        gate_mode = gr.Dropdown([(f"{name}: {text}", name) for name, text in GATE_MODES.items()],
                                value=start[1] or "hidden", label="gate mode", scale=3)
        per_token = gr.Number(start[2] or 2, precision=0, minimum=1, label="experts per token", scale=1)
        dtype = gr.Dropdown(DTYPES, value=start[3] or "bfloat16", label="dtype", scale=1)
    slots = []
    with gr.Row():
        for index in range(MAX_EXPERTS):
            offset = 4 + 3 * index
            with gr.Column(min_width=220):
                slots.append(gr.Textbox(start[offset], label=f"expert {index}: model"))
                slots.append(gr.Textbox(start[offset + 1], lines=4, label="positive prompts (one per line)"))
                slots.append(gr.Textbox(start[offset + 2], lines=2, label="negative prompts (optional)"))
    with gr.Row():
        write = gr.Button("Write the recipe")
        read = gr.Button("Read the recipe into the form")
        build_button = gr.Button("Build", variant="primary")
    form_note = gr.Markdown()
    recipe = gr.Code(recipe_text, language="yaml", label="MoE recipe (mergekit-moe YAML; "
                                                          "`python -m merging moe.yml OUT` builds the same)")
    status = gr.Markdown("Press **Build** to make the mixture of experts.")
    form = [base, gate_mode, per_token, dtype, *slots]
    # a mistake in the form or the recipe is said in the status; the editor and form stay usable
    page_and_api(write.click, form_to_recipe, inputs=form, outputs=recipe, status=form_note, api_name="moe_recipe")
    page_and_api(read.click, recipe_to_form, inputs=recipe, outputs=form, status=form_note, api_name="moe_form")
    build_button.click(build, inputs=recipe, outputs=status, api_name="moe_build", **heavy_queue())

    gr.Markdown("### Ask the mixture: each answer token coloured by the expert it was routed to")
    with gr.Row():
        prompt = gr.Textbox("Make a record: Zoe is 44 and lives in Omsk.", label="Prompt", scale=4)
        send = gr.Button("Ask", variant="primary", scale=1)
    with gr.Row():
        max_new_tokens = gr.Slider(1, 256, value=48, step=1, label="max new tokens")
        temperature = gr.Slider(0, 1.5, value=0, step=0.05, label="temperature (0 = greedy)")
        seed = gr.Number(0, precision=0, label="seed")
    with gr.Row():
        with gr.Column(scale=3):
            chat = gr.Chatbot(label="mixture of experts", height=220, elem_classes=["moe-chat"])
            strip = gr.HTML(label="tokens by expert (largest share over the layers)")
            info = gr.Markdown()
        with gr.Column(scale=2):
            router = gr.Plot(label="router per layer")
    send.click(ask, inputs=[prompt, max_new_tokens, temperature, seed], outputs=[chat, strip, router, info],
               api_name="moe_ask")
    return recipe
