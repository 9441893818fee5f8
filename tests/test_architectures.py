"""Every architecture transformers 5 builds, merged five ways: equal to mergekit 0.1.5
wherever mergekit runs and is right, and every output loads in transformers with no
missing or unexpected keys and runs a forward pass.

The matrix runs in one process over families built once (tests/arch_models.py); the
architecture model itself is checked on what it reads from each family.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arch_models import ARCHITECTURES, MULTIMODAL, forward_inputs, image_inputs, loader_class, make_family
from helpers import load_tensors, run_mergekit

TOLERANCE = 1e-5
RECIPES = {
    "linear": """
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {child_1}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: float32
""",
    "slerp_gradient": """
models:
  - model: {base}
  - model: {child_1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "ties": """
models:
  - model: {child_1}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {child_2}
    parameters: {{density: 0.7, weight: 0.4}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true}}
dtype: float32
""",
    "passthrough": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
  - sources:
      - model: {child_1}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""",
    "task_arithmetic_tokenizer": """
models:
  - model: {child_1}
    parameters: {{weight: 0.7}}
  - model: {child_2}
    parameters: {{weight: 0.3}}
merge_method: task_arithmetic
base_model: {base}
tokenizer:
  source: union
dtype: float32
""",
}
# mergekit 0.1.5 on models saved by transformers 5, where it does not give a right answer;
# each is an answer of its own (checked below): what mergekit says or does wrong.
MERGEKIT_FAILS = {
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {name: make_family(name, root / name) for name in ARCHITECTURES}


def _recipe(name: str, family: dict) -> str:
    return RECIPES[name].format(**{k: str(v) for k, v in family.items()})


def _loads_and_runs(architecture: str, folder: Path) -> torch.Tensor:
    model, info = loader_class(architecture).from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"{architecture} at {folder}: {problems}"
    inputs = image_inputs(architecture, model.config) if architecture in MULTIMODAL else \
        forward_inputs(architecture, model.config)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    return logits


def test_every_architecture_every_recipe_loads_and_equals_mergekit(families, tmp_path):
    """One test over the whole matrix (one process, families built once): a failure lists
    every cell that is wrong, not only the first."""
    from merging import merge

    wrong = []
    for architecture, family in families.items():
        for recipe in RECIPES:
            text = _recipe(recipe, family)
            ours = tmp_path / architecture / recipe / "ours"
            try:
                merge(text, ours, device="cpu")
                _loads_and_runs(architecture, ours)
            except Exception as error:  # noqa: BLE001 - collected, reported together
                wrong.append(f"{architecture}/{recipe}: ours: {str(error).splitlines()[0][:300]}")
                continue
            theirs = tmp_path / architecture / recipe / "mergekit"
            try:
                run_mergekit(text, theirs)
            except Exception as error:  # noqa: BLE001
                if (architecture, recipe) not in MERGEKIT_FAILS:
                    wrong.append(f"{architecture}/{recipe}: mergekit failed unexpectedly: "
                                 f"{str(error).splitlines()[0][:200]}")
                continue
            if (architecture, recipe) in MERGEKIT_FAILS:
                continue
            difference = _difference(load_tensors(ours), load_tensors(theirs))
            if difference:
                wrong.append(f"{architecture}/{recipe}: differs from mergekit: {difference}")
    assert not wrong, "\n".join(wrong)


def _difference(ours: dict, theirs: dict) -> str:
    if set(ours) != set(theirs):
        return f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:6]}"
    for name, expected in theirs.items():
        actual = ours[name]
        if actual.shape != expected.shape:
            return f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
        scale = expected.float().abs().max().item() or 1.0
        error = (actual.float() - expected.float()).abs().max().item() / scale
        if error > TOLERANCE:
            return f"{name}: relative error {error:.2e}"
    return ""


# What the architecture model must read from each family's files: the stacks (role, the
# config key of their depth) and how many per-layer config lists follow the text stack.
EXPECTED_STACKS = {
    "gpt2": [("text_decoder", ("n_layer",))],
    "falcon": [("text_decoder", ("num_hidden_layers",))],
    "gemma3_multimodal": [("text_decoder", ("text_config", "num_hidden_layers")),
                          ("vision_tower", ("vision_config", "num_hidden_layers"))],
    "qwen2_vl": [("text_decoder", ("text_config", "num_hidden_layers")), ("vision_tower", ("vision_config", "depth"))],
    "llava": [("text_decoder", ("text_config", "num_hidden_layers")),
              ("vision_tower", ("vision_config", "num_hidden_layers"))],
}


def test_architecture_model_reads_every_family(families):
    from merging.architecture import layout_of
    from merging.sources import open_model

    for architecture, family in families.items():
        checkpoint = open_model(str(family["base"]))
        layout = layout_of(checkpoint)
        stacks = [(stack.role, stack.depth_key) for stack in layout.stacks]
        assert stacks == EXPECTED_STACKS.get(architecture, [("text_decoder", ("num_hidden_layers",))]), architecture
        for stack in layout.stacks:
            depth = layout.depth(stack)
            assert depth >= 2 and all(layout.layer_tensors(i, stack) for i in range(depth)), (architecture, stack)
        embeddings = [n for n in checkpoint.tensors if layout.is_input_embedding(n)]
        assert len(embeddings) == 1 and layout.comes_before(embeddings[0]), architecture
        heads = [n for n in checkpoint.tensors if layout.is_output_head(n)]
        config = json.loads((family["base"] / "config.json").read_text())
        tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings"))
        assert len(heads) == (0 if tied else 1), (architecture, heads)
        for head in heads:
            assert not layout.comes_before(head), architecture
    neox = layout_of(open_model(str(families["gpt_neox"]["base"])))
    assert neox.is_output_head("embed_out.weight") and not neox.is_input_embedding("embed_out.weight")
    mixtral = layout_of(open_model(str(families["mixtral"]["base"])))
    router = next(n for n in mixtral.layer_tensors(0) if n.endswith("block_sparse_moe.gate.weight"))
    assert any("mlp" in name for name in mixtral.match_names(router))  # `filter: mlp` finds experts and router
