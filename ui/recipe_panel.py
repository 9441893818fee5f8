"""The recipe panel: paste mergekit YAML, check it against the models, see the plan.

Until the full app lands this is MergeLab's start page; it already runs every check
the command line runs (`python -m merging CONFIG OUT --dry-run`) without merging.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import gradio as gr

from merging import MergeError, load_config, plan_stages
from merging.checkpoint import HUB_ID

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


def is_public_deployment() -> bool:
    """A Hugging Face Space, or a server whose operator says it is public."""
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("MERGELAB_PUBLIC", "") == "1"


def allowed_folder() -> Path:
    """The one local folder a public deployment may read models from: the demo cache."""
    from merging.demo import default_cache

    return default_cache().resolve()


def refuse_local_paths(config) -> None:
    """On a public deployment only hub ids, stage names and the demo models may be named."""
    stages = getattr(config, "stages", [config])
    names = {s.name for s in stages if s.name}
    allowed = allowed_folder()
    for stage in stages:
        for model in stage.referenced_models():
            for part in model.split("+"):  # base+adapter: each side on its own
                local = Path(part).expanduser()
                if part in names or (HUB_ID.match(part) and not local.exists()):
                    continue
                if not local.resolve().is_relative_to(allowed):
                    raise MergeError(f"model '{model}': local paths are disabled on a public deployment")


def default_recipe(family: Optional[dict]) -> str:
    """The demo family's SLERP when its models are built, else a hub example."""
    return DEMO_RECIPE.format(**family) if family else EXAMPLE


def check_recipe(yaml_text: str) -> str:
    """The merge plan for a recipe, or a readable error (never a traceback)."""
    try:
        config = load_config(yaml_text)
        if is_public_deployment():
            refuse_local_paths(config)
        plans = plan_stages(config)
    except MergeError as error:
        raise gr.Error(str(error)) from None
    parts = []
    for plan in plans:
        title = f"### Stage {plan.config.name}\n" if len(plans) > 1 else ""
        parts.append(f"{title}```\n{plan.summary()}\n```")
    return "\n\n".join(parts)


def build_recipe_panel(family: Optional[dict] = None) -> None:
    recipe = gr.Code(default_recipe(family), language="yaml", label="Recipe (mergekit YAML)")
    check = gr.Button("Check recipe", variant="primary")
    plan = gr.Markdown()
    check.click(check_recipe, inputs=recipe, outputs=plan, api_name="check_recipe")
