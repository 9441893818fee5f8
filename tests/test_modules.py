"""mergekit's `modules:` recipes: every part of a multimodal model (text_decoder,
vision_tower, multi_modal_projector) merged by its own models or slices and parameters.

Qwen2-VL is saved by transformers 5 in the names mergekit 0.1.5 expects (`model.layers.`,
`visual.blocks.`, `visual.merger.`); mergekit reads its text depth from a top-level
`num_hidden_layers` that transformers 5 keeps only in text_config, so the family here gets
that key copied up, and there our merges equal mergekit's tensor for tensor. Gemma 3 and
LLaVA are saved in names mergekit's tables do not know (or it has no table), so there the
outputs are compared with expectations computed here, by tensor name prefix.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arch_models import image_inputs, loader_class, make_family  # noqa: E402
from helpers import load_tensors, max_relative_error, run_mergekit  # noqa: E402

from merging import MergeConfig, MergeError, merge, plan_stages  # noqa: E402


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    family = make_family("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))
    for folder in family.values():  # where mergekit's qwen2_vl table reads the text depth
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config["num_hidden_layers"] = config["text_config"]["num_hidden_layers"]
        path.write_text(json.dumps(config, indent=2))
    return family


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return make_family("gemma3_multimodal", tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_family("llava", tmp_path_factory.mktemp("llava"))


def assert_loads_and_runs(name: str, folder: Path):
    model, info = loader_class(name).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model.eval()(**image_inputs(name, model.config)).logits
    assert torch.isfinite(logits).all()
    return model


SLERP = """
modules:
  text_decoder:
    slices:
      - sources:
          - {{model: {base}, layer_range: [0, 2]}}
          - {{model: {a}, layer_range: [0, 2]}}
        parameters: {{t: [0.1, 0.9]}}
      - sources:
          - {{model: {base}, layer_range: [2, 4]}}
          - {{model: {a}, layer_range: [2, 4]}}
    parameters: {{t: [0, 1]}}
  vision_tower:
    models:
      - model: {base}
      - model: {a}
  multi_modal_projector:
    models: [{{model: {base}}}, {{model: {a}}}]
    parameters: {{t: 0.25}}
merge_method: slerp
base_model: {base}
parameters: {{t: 0.6}}
"""

LINEAR = """
modules:
  text_decoder:
    models:
      - {{model: {base}, parameters: {{weight: 0.2}}}}
      - {{model: {a}}}
      - {{model: {b}}}
    parameters: {{weight: 0.4}}
  vision_tower:
    slices:
      - sources:
          - {{model: {a}, layer_range: [0, 2], parameters: {{weight: [1, 0]}}}}
          - {{model: {b}, layer_range: [0, 2]}}
  multi_modal_projector:
    models: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 3}}}}]
merge_method: linear
parameters: {{weight: 1}}
"""


def recipe(template: str, family: dict) -> str:
    return template.format(base=family["base"], a=family["child_1"], b=family["child_2"])


@pytest.mark.parametrize("template", [SLERP, LINEAR], ids=["slerp", "linear"])
def test_qwen2_vl_modules_equal_mergekit(qwen2_vl, tmp_path, template):
    text = recipe(template, qwen2_vl)
    ours = merge(text, tmp_path / "ours", device="cpu")
    theirs = run_mergekit(text, tmp_path / "theirs")
    ours_tensors, their_tensors = load_tensors(ours), load_tensors(theirs)
    assert max_relative_error(ours_tensors, their_tensors) < 1e-5
    if template is SLERP:  # each part with its own t: the module's, a slice's, or the top level's
        base, child = load_tensors(qwen2_vl["base"]), load_tensors(qwen2_vl["child_1"])
        for name, t in (("visual.merger.mlp.0.weight", 0.25), ("visual.merger.mlp.2.weight", 0.25),
                        ("visual.blocks.1.mlp.fc1.weight", 0.6), ("visual.patch_embed.proj.weight", 0.6),
                        ("model.layers.0.mlp.up_proj.weight", 0.1), ("model.layers.1.mlp.up_proj.weight", 0.9),
                        ("model.layers.3.mlp.up_proj.weight", 1.0), ("model.embed_tokens.weight", 0.1),
                        ("lm_head.weight", 0.0)):
            expected = _slerp(t, base[name], child[name])
            assert torch.allclose(ours_tensors[name], expected, atol=1e-6), (name, t)
    assert_loads_and_runs("qwen2_vl", ours)


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as vectors (linear when nearly parallel)."""
    a, b = v0.double(), v1.double()
    cos = torch.dot((a / a.norm()).flatten(), (b / b.norm()).flatten()).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * a + t * b).float()
    theta = torch.arccos(cos)
    return ((torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)).float()


def test_qwen2_vl_passthrough_text_layers_load_and_equal_mergekit(qwen2_vl, tmp_path):
    text = f"""
modules:
  text_decoder:
    slices:
      - sources: [{{model: {qwen2_vl['base']}, layer_range: [0, 3]}}]
      - sources: [{{model: {qwen2_vl['child_1']}, layer_range: [1, 4]}}]
  vision_tower:
    models: [{{model: {qwen2_vl['child_2']}}}]
  multi_modal_projector:
    models: [{{model: {qwen2_vl['child_1']}}}]
merge_method: passthrough
"""
    ours = merge(text, tmp_path / "ours", device="cpu")
    theirs = run_mergekit(text, tmp_path / "theirs")
    assert max_relative_error(load_tensors(ours), load_tensors(theirs)) == 0
    config = json.loads((ours / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6 and len(config["text_config"]["layer_types"]) == 6
    model = assert_loads_and_runs("qwen2_vl", ours)
    assert len(model.model.language_model.layers) == 6


def _by_prefix(name: str) -> str:
    """The module of a Gemma 3 or LLaVA tensor, by its saved name (independent of the library)."""
    for prefix, module in (("language_model.", "text_decoder"), ("vision_tower.", "vision_tower"),
                           ("multi_modal_projector.", "multi_modal_projector")):
        if name.startswith(prefix):
            return module
    raise AssertionError(f"tensor {name} belongs to no module")


def test_gemma3_linear_modules_equal_weighted_means(gemma3, tmp_path):
    base, a, b = (load_tensors(gemma3[k]) for k in ("base", "child_1", "child_2"))
    text = f"""
modules:
  text_decoder:
    models:
      - {{model: {gemma3['base']}, parameters: {{weight: 0.25}}}}
      - {{model: {gemma3['child_1']}}}
    parameters: {{weight: 0.75}}
  vision_tower:
    models: [{{model: {gemma3['base']}}}, {{model: {gemma3['child_2']}}}]
  multi_modal_projector:
    models: [{{model: {gemma3['child_1']}}}]
merge_method: linear
parameters: {{weight: 2}}
"""
    out = merge(text, tmp_path / "out", device="cpu")
    merged = load_tensors(out)
    expected_by_module = {
        "text_decoder": lambda n: 0.25 * base[n] + 0.75 * a[n],
        "vision_tower": lambda n: 0.5 * base[n] + 0.5 * b[n],
        "multi_modal_projector": lambda n: a[n],
    }
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        expected = expected_by_module[_by_prefix(name)](name)
        assert torch.allclose(tensor, expected, atol=1e-6), name
    assert_loads_and_runs("gemma3_multimodal", out)


def test_llava_passthrough_modules_cut_the_towers(llava, tmp_path):
    base, a, b = (load_tensors(llava[k]) for k in ("base", "child_1", "child_2"))
    text = f"""
modules:
  text_decoder:
    slices:
      - sources: [{{model: {llava['base']}, layer_range: [0, 3]}}]
      - sources: [{{model: {llava['child_1']}, layer_range: [1, 4]}}]
  vision_tower:
    slices:
      - sources: [{{model: {llava['child_2']}, layer_range: [1, 2]}}]
  multi_modal_projector:
    models: [{{model: {llava['child_1']}}}]
merge_method: passthrough
"""
    out = merge(text, tmp_path / "out", device="cpu")
    merged = load_tensors(out)
    text_origin = [(base, 0), (base, 1), (base, 2), (a, 1), (a, 2), (a, 3)]
    layer = re.compile(r"^(.*\.layers\.)(\d+)\.(.*)$")
    expected_names = set()
    for name in base:
        module, match = _by_prefix(name), layer.match(name)
        if match is None:
            # outside the blocks: the first slice's model before them, the last's after (the same
            # model here but for the text decoder, whose embeddings come from the base)
            source = {"text_decoder": base if "embed" in name else a, "vision_tower": b,
                      "multi_modal_projector": a}[module]
            expected_names.add(name)
            assert torch.equal(merged[name], source[name]), name
            continue
        origins = text_origin if module == "text_decoder" else [(b, 1)]
        for out_index, (source, index) in enumerate(origins):
            if int(match[2]) == index:
                out_name = f"{match[1]}{out_index}.{match[3]}"
                expected_names.add(out_name)
                assert torch.equal(merged[out_name], source[name]), out_name
    assert set(merged) == expected_names
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6
    assert config["vision_config"]["num_hidden_layers"] == 1
    assert_loads_and_runs("llava", out)


def test_a_text_only_model_takes_mergekits_default_module(tmp_path):
    family = make_family("llama", tmp_path / "llama", n_children=1)
    text = f"""
modules:
  default:
    models: [{{model: {family['base']}}}, {{model: {family['child_1']}, parameters: {{weight: 3}}}}]
merge_method: linear
parameters: {{weight: 1}}
"""
    ours = load_tensors(merge(text, tmp_path / "ours", device="cpu"))
    theirs = load_tensors(run_mergekit(text, tmp_path / "theirs"))
    assert max_relative_error(ours, theirs) < 1e-6
    base, child = load_tensors(family["base"]), load_tensors(family["child_1"])
    for name, tensor in ours.items():
        assert torch.allclose(tensor, 0.25 * base[name] + 0.75 * child[name], atol=1e-6), name


# ---- the recipe itself ----------------------------------------------------------------
def test_modules_round_trip_and_name_their_models():
    text = recipe(SLERP, {"base": "org/base", "child_1": "org/a", "child_2": "org/b"})
    config = MergeConfig.from_yaml(text)
    assert list(config.modules) == ["text_decoder", "vision_tower", "multi_modal_projector"]
    assert config.referenced_models() == ["org/base", "org/a"]
    assert MergeConfig.from_yaml(config.to_yaml()) == config
    assert config.modules["multi_modal_projector"].parameters == {"t": 0.25}
    renamed = config.with_models_renamed({"org/a": "/models/a"})
    assert "org/a" not in renamed.referenced_models() and "/models/a" in renamed.referenced_models()


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodules:\n  vision_tower:\n    models: [{model: a/b}]\n"
     "    slices: [{sources: [{model: a/b, layer_range: [0, 2]}]}]\n",
     "modules.vision_tower: give either 'models' (the module whole) or 'slices' (layer ranges), not both"),
    ("merge_method: linear\nmodules:\n  vision_tower: {parameters: {weight: 1}}\n",
     "modules.vision_tower: needs 'models' (the module whole) or 'slices' (layer ranges)"),
    ("merge_method: linear\nmodules: [text_decoder]\n", "modules must be a mapping of module name"),
    ("merge_method: slerp\nmodules:\n  vision_tower:\n    models: [{model: a/b}, {model: a/c}]\n",
     "slerp needs a base_model (modules.vision_tower)"),
    ("merge_method: linear\nmodules:\n  vision_tower:\n    slices: [{sources: [{model: a/b, layer_range: [2, 1]}]}]\n",
     "layer_range (modules.vision_tower.slices[0]) source 0 must satisfy 0 <= start < end"),
])
def test_module_errors_in_the_recipe(text, message):
    with pytest.raises(MergeError, match=re.escape(message)):
        MergeConfig.from_yaml(text)


def test_a_modules_key_mergekit_ignores_is_a_warning():
    config = MergeConfig.from_yaml("merge_method: linear\nmodules:\n  text_decoder:\n    models: [{model: a/b}]\n"
                                   "    weight: 1\n")
    assert len(config.warnings) == 1 and "modules.text_decoder" in config.warnings[0]


def _plan_error(text: str) -> str:
    with pytest.raises(MergeError) as caught:
        plan_stages(text)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_module_the_model_lacks_is_named_with_the_models_modules(qwen2_vl):
    base = qwen2_vl["base"]
    message = _plan_error(f"""
modules:
  text_decoder: {{models: [{{model: {base}}}]}}
  vision_tower: {{models: [{{model: {base}}}]}}
  multi_modal_projector: {{models: [{{model: {base}}}]}}
  audio_tower: {{models: [{{model: {base}}}]}}
merge_method: passthrough
""")
    assert message == (f"modules.audio_tower: model '{base}' has no module 'audio_tower'; its modules are "
                       "text_decoder, vision_tower, multi_modal_projector")


def test_a_module_left_out_is_refused(llava):
    base = llava["base"]
    message = _plan_error(f"""
modules:
  text_decoder: {{models: [{{model: {base}}}]}}
merge_method: passthrough
""")
    assert message.startswith("modules: the recipe leaves out vision_tower, multi_modal_projector of model")


def test_a_layer_range_past_the_modules_depth_is_refused(gemma3):
    base = gemma3["base"]
    message = _plan_error(f"""
modules:
  text_decoder: {{models: [{{model: {base}}}]}}
  vision_tower:
    slices: [{{sources: [{{model: {base}, layer_range: [0, 4]}}]}}]
  multi_modal_projector: {{models: [{{model: {base}}}]}}
merge_method: passthrough
""")
    assert message == f"modules.vision_tower: layer_range [0, 4] of model '{base}' goes past its 2 vision_tower layers"


def test_the_projector_has_no_layers_to_slice(gemma3):
    base = gemma3["base"]
    message = _plan_error(f"""
modules:
  text_decoder: {{models: [{{model: {base}}}]}}
  vision_tower: {{models: [{{model: {base}}}]}}
  multi_modal_projector:
    slices: [{{sources: [{{model: {base}, layer_range: [0, 1]}}]}}]
merge_method: passthrough
""")
    assert message.startswith("modules.multi_modal_projector: it has no stack of layers to cut")
