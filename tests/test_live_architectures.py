"""A live merge of every architecture is the model a written merge loads into: the same
logits, after the first build and after an update in place (renamed stored names, fused
experts, vision towers all land where transformers puts them)."""

from __future__ import annotations

import torch

from arch_models import MULTIMODAL, forward_inputs, image_inputs, loader_class

RECIPE = """
models:
  - model: {base}
  - model: {child_1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: mlp
      value: [0, 1]
    - value: {t}
dtype: float32
"""


def _logits(architecture: str, model) -> torch.Tensor:
    inputs = image_inputs(architecture, model.config) if architecture in MULTIMODAL else \
        forward_inputs(architecture, model.config)
    with torch.no_grad():
        return model(**inputs).logits


def test_live_equals_the_written_merge_for_every_architecture(arch_families, tmp_path):
    from merging import LiveMerge, merge

    wrong = []
    for architecture, family in arch_families.items():
        folders = {k: str(v) for k, v in family.items()}
        live = LiveMerge(RECIPE.format(t=0.3, **folders), device="cpu")
        for step, t in enumerate((0.3, 0.8)):
            text = RECIPE.format(t=t, **folders)
            if step:
                live.update(text)
            written = merge(text, tmp_path / architecture / str(step), device="cpu")
            expected = _logits(architecture, loader_class(architecture).from_pretrained(written, dtype=torch.float32))
            actual = _logits(architecture, live.model)
            if not torch.allclose(actual, expected, atol=1e-5, rtol=1e-4):
                wrong.append(f"{architecture} t={t}: max difference {(actual - expected).abs().max():.2e}")
    assert not wrong, "\n".join(wrong)
