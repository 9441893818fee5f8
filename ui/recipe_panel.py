"""The recipe panel: paste mergekit YAML, check it against the models, see the plan.

Until the full app lands this is MergeLab's start page; it already runs every check
the command line runs (`python -m merging CONFIG OUT --dry-run`) without merging.
"""

from __future__ import annotations

from typing import Optional

import gradio as gr

from merging import plan_stages
from merging.config import check_strict, recipe_from_text

from .common import handler, page_and_api

DEMO_RECIPE = """\
models:
  - model: {reverse}
merge_method: slerp
base_model: {json}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

EXAMPLE = """\
models:
  - model: HuggingFaceTB/SmolLM2-135M-Instruct
  - model: your-org/your-finetune
merge_method: slerp
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def default_recipe(family: Optional[dict]) -> str:
    """The demo family's SLERP when its models are built, else a hub example."""
    return DEMO_RECIPE.format(**family) if family else EXAMPLE


@handler
def check_recipe(yaml_text: str, strict: bool = False, request: gr.Request = None) -> str:
    """The merge plan for a recipe, or a readable error (never a traceback). On a public
    deployment the models' access is the visitor's own (see merging.access). `strict`: a
    key that has no effect (mergekit ignores it) is an error, as with the CLI's --strict."""
    config = recipe_from_text(yaml_text or "")
    if strict:
        check_strict(config)
    plans = plan_stages(config)
    parts = []
    for plan in plans:
        title = f"### Stage {plan.config.name}\n" if len(plans) > 1 else ""
        parts.append(f"{title}```\n{plan.summary()}\n```")
    return "\n\n".join(parts)


def build_recipe_panel(family: Optional[dict] = None) -> None:
    recipe = gr.Code(default_recipe(family), language="yaml", label="Recipe (mergekit YAML)")
    with gr.Row():
        check = gr.Button("Check recipe", variant="primary")
        strict = gr.Checkbox(False, label="strict: keys that have no effect (mergekit ignores them) are errors")
    plan = gr.Markdown()
    page_and_api(check.click, check_recipe, inputs=[recipe, strict], outputs=plan, api_name="check_recipe")
