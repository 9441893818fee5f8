"""Building a recipe without writing YAML: pick models and a base, check that they can merge,
pick a method (each with its one-line explanation) and set its declared parameters with
controls generated from the method registry, within their valid ranges."""

from __future__ import annotations

from typing import Optional

import gradio as gr

from merging import METHODS, MergeConfig, MergeError, get_method
from merging.config import InputModel
from merging.compatibility import as_markdown, compatibility as compatibility_report

from merging.access import hub_token
from merging.layer_values import models_with_parameters
from merging.limits import check as check_limit, limit

from .common import handler, in_page, page_and_api

METHOD_CHOICES = [(f"{name}: {method.summary}", name) for name, method in sorted(METHODS.items())]


@handler
def compatibility(models: list[str], base: Optional[str], request: gr.Request = None) -> str:
    """A table of each model's architecture facts and whether it can merge with the base:
    the library's report (merging.compatibility), made by the planner's own checks."""
    names = list(dict.fromkeys(([base] if base else []) + [str(m) for m in models or []]))
    check_limit("models", len(names), f"{len(names)} models are picked")
    return as_markdown(compatibility_report(models or [], base))


@handler
def search_hub(query: str, request: gr.Request = None) -> tuple[str, dict]:
    """Text-generation models on the hub matching `query`, most downloaded first; says so
    plainly when the hub is offline or unreachable. Returns (message, dropdown update)."""

    from huggingface_hub import HfApi

    from merging.sources.hub import hub_endpoint, hub_offline, hub_reachable

    query = str(query or "")[:200]
    if not query.strip():
        return "type part of a model's name to search the hub", gr.update()
    if hub_offline():
        return ("the hub is offline here (HF_HUB_OFFLINE is set): type a local folder, or a hub id "
                "that is already in the cache"), gr.update()
    endpoint = hub_endpoint()
    if not hub_reachable(endpoint):  # huggingface_hub would retry for half a minute
        return "cannot reach the Hugging Face hub (no connection): type a local folder instead", gr.update()
    try:
        api = HfApi(endpoint=endpoint, token=hub_token())
        found = [m.id for m in api.list_models(search=query.strip(), pipeline_tag="text-generation",
                                               sort="downloads", limit=20)]
    except Exception as error:  # connection errors come in many types
        return f"cannot reach the Hugging Face hub ({type(error).__name__}): type a local folder instead", gr.update()
    if not found:
        return f"no text-generation model on the hub matches '{query}'", gr.update()
    return (f"{len(found)} models: pick them in the list above", gr.update(choices=found))


def recipe_from_controls(models: list[str], base: Optional[str], method_name: str, values: dict) -> str:
    """YAML for the picked models, base, method and parameter values."""
    method = get_method(method_name)
    if method.base == "required" and not base:
        raise MergeError(f"{method_name} needs a base model: pick one")
    entries = []
    for model in models_with_parameters(method, models, base):
        parameters = {p.name: values[f"{model}/{p.name}"] for p in method.model_parameters
                      if values.get(f"{model}/{p.name}") is not None}
        entries.append(InputModel(model, parameters or None))
    global_values = {p.name: values[p.name] for p in method.global_parameters if values.get(p.name) is not None}
    config = MergeConfig(method_name, models=entries, base_model=base if method.base != "ignored" else None,
                         parameters=global_values or None, dtype="float32")
    config.check()
    return config.to_yaml()


def short_name(name: Optional[str]) -> str:
    return (name or "?").rstrip("/").split("/")[-1]


def _label(parameter: str, method: str, models: Optional[list[str]], base: Optional[str]) -> str:
    """slerp's and nearswap's t say which model each end is."""
    others = [m for m in models or [] if m != base]
    if parameter == "t" and method == "slerp":
        return f"t (0 = {short_name(base)}, 1 = {short_name(others[0] if others else None)})"
    return parameter


def _control(parameter, label: str, key: str):
    default = None if parameter.required else parameter.default
    if parameter.kind is bool:
        return gr.Checkbox(bool(default), label=label, info=parameter.help, key=key, interactive=True)
    if parameter.kind is str:
        return gr.Dropdown(list(parameter.choices or [default]), value=default, label=label, info=parameter.help,
                           key=key, interactive=True)
    low = parameter.low if parameter.low is not None else 0.0
    high = parameter.high if parameter.high is not None else max(2.0, (default or 0) * 2 or 1.0)
    value = default if default is not None else (low + high) / 2 if parameter.name != "weight" else 1.0
    step = 1 if parameter.kind is int else 0.01
    return gr.Slider(low, high, value=value, step=step, label=label, info=parameter.help, key=key, interactive=True)


def build_builder(recipe: gr.Code, family: Optional[dict]) -> None:
    # short names shown, the folders as values (a hub id or folder typed in stays as typed)
    choices = [(short_name(folder), folder) for folder in family.values()] if family else []
    # the Lab's own recipe (json as the base, reverse merged into it), so the defaults merge as they are
    default_base = family.get("json") if family else None
    default_models = [family["reverse"]] if family and "reverse" in family else [v for _, v in choices[1:]]
    with gr.Accordion("Build a recipe: models, base, method and parameters", open=False):
        with gr.Row():
            models = gr.Dropdown(choices, value=default_models, multiselect=True, allow_custom_value=True,
                                 label="models (demo family, a local folder or a hub id: type to add)", scale=3)
            base = gr.Dropdown(choices, value=default_base or (choices[0][1] if choices else None),
                               allow_custom_value=True, label="base model", scale=2)
        with gr.Row():
            query = gr.Textbox(label="search the hub for text-generation models", scale=4)
            search = gr.Button("Search", scale=1)
        found = gr.Markdown()
        check = gr.Button("Check compatibility")
        verdict = gr.Markdown()
        method = gr.Dropdown(METHOD_CHOICES, value="slerp", label="method")

        @gr.render(inputs=[models, base, method])
        def parameter_controls(chosen, base_model, method_name):
            if len(chosen or []) > limit("models"):
                raise gr.Error(f"at most {limit('models')} models can be picked", print_exception=False)
            spec = get_method(method_name)
            controls, keys = [], []
            with gr.Row():
                for parameter in spec.global_parameters:
                    controls.append(_control(parameter, _label(parameter.name, method_name, chosen, base_model),
                                             f"{method_name}/{parameter.name}"))
                    keys.append(parameter.name)
            for model in models_with_parameters(spec, chosen, base_model):
                if not spec.model_parameters:
                    break
                with gr.Row():
                    for parameter in spec.model_parameters:
                        label = f"{parameter.name} of {short_name(model)}"
                        controls.append(_control(parameter, label, f"{method_name}/{model}/{parameter.name}"))
                        keys.append(f"{model}/{parameter.name}")

            @handler
            def write_recipe(chosen_models, base_choice, method_choice, *values):
                return recipe_from_controls(chosen_models, base_choice, method_choice, dict(zip(keys, values)))

            # a mistake goes to the note under the button; the recipe editor stays as it was
            page_and_api(write.click, write_recipe, inputs=[models, base, method, *controls], outputs=recipe,
                         status=written, api_name="write_recipe")
            for control in controls:  # each change writes the recipe at once, as the button does
                in_page(control.input, write_recipe, inputs=[models, base, method, *controls], outputs=recipe,
                        status=written, trigger_mode="always_last", api_visibility="private")

        write = gr.Button("Write the recipe", variant="primary")
        written = gr.Markdown()
    check.click(compatibility, inputs=[models, base], outputs=verdict, api_name="compatibility")
    search.click(search_hub, inputs=query, outputs=[found, models], api_name="search_hub")
