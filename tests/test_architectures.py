"""Every architecture transformers 5 builds, merged five ways: every output of ours loads in
transformers with no missing or unexpected keys and runs a forward pass, and equals mergekit
0.1.5's wherever mergekit runs and is right (outputs named otherwise, such as fused experts,
are compared as the models transformers loads from them, and so are the tensors mergekit did
write where it left others out: the vision towers' gradient positions included).

Where mergekit fails or is wrong on these transformers-5-saved models, the cell is listed in
MERGEKIT_FAILS with the reason (and must still fail), and ours gets independent evidence:
mergekit run on a copy renamed to the names its architecture file expects, and the recipe
recomputed tensor by tensor from the formulas. README.md's compatibility table is this
matrix. The families are built once per session (conftest.py, tests/arch_models.py); the
architecture model itself is checked on what it reads from each family.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from arch_models import HIDDEN, LAYERS, MULTIMODAL, VOCAB, forward_inputs, image_inputs, loader_class
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
# mergekit 0.1.5 on models saved by transformers 5, cell by cell where it does not give a
# right answer. Each listed cell must still fail in mergekit (its verdict must show the
# symptom below), so a cell mergekit starts to get right has to leave the table; and each
# gets its own evidence that ours is right (_evidence).
LAYER_TYPES = "does not cut layer_types to the new depth; transformers refuses the config"
SIGLIP_NAMES = "expects vision_tower.vision_model.* (transformers 4 names)"
NEOX_BUFFERS = "expects the attention.bias/masked_bias buffers transformers 5 no longer saves"
FALCON_LAYOUT = "knows only new_decoder_architecture (ln_attn, ln_mlp), not Falcon-7B's layout"
COHERE_QK_NORM = "expects q_norm/k_norm, which only use_qk_norm models have"
QWEN3_MOE_DENSE = "expects fused experts in every layer; mlp_only_layers are dense"
QWEN2_VL_CONFIG = "reads num_hidden_layers at the top of the config; transformers 5 nests it in text_config"
MODULES_SYNTAX = "slices over a multimodal model need its `modules:` syntax"
QWEN2_MOE_EXPERTS = "drops every routed expert; its output does not load"
QWEN2_MOE_DEPTH = ("drops every routed expert, leaves the depth at 4 (layers 4-5 do not load) and takes the "
                   "final norm from the first slice")
LLAVA_TEXT = "drops the language model; its output does not load"
MIXTRAL_FUSED = ("merges all experts of a layer as one fused tensor (slerp's angle and TIES' top-k over every "
                 "expert at once); ours merges each expert's stored tensor, so every expert keeps its own density "
                 "and its own angle, as the files store them and as mergekit did before transformers 5")
RECIPE_KINDS = tuple(RECIPES)
MERGEKIT_FAILS: dict[tuple[str, str], str] = {
    **{(a, "passthrough"): LAYER_TYPES for a in ("qwen2", "qwen3", "gemma2", "gemma3", "gemma3_sliding")},
    **{("gemma3_multimodal", r): SIGLIP_NAMES for r in RECIPE_KINDS if r != "passthrough"},
    **{(a, "passthrough"): MODULES_SYNTAX for a in ("gemma3_multimodal", "qwen2_vl", "llava")},
    **{("gpt_neox", r): NEOX_BUFFERS for r in RECIPE_KINDS},
    **{("falcon", r): FALCON_LAYOUT for r in RECIPE_KINDS},
    **{("cohere", r): COHERE_QK_NORM for r in RECIPE_KINDS},
    **{("qwen3_moe", r): QWEN3_MOE_DENSE for r in RECIPE_KINDS},
    **{("qwen2_vl", r): QWEN2_VL_CONFIG for r in RECIPE_KINDS if r != "passthrough"},
    **{("qwen2_moe", r): QWEN2_MOE_EXPERTS for r in RECIPE_KINDS if r != "passthrough"},
    ("qwen2_moe", "passthrough"): QWEN2_MOE_DEPTH,
    **{("llava", r): LLAVA_TEXT for r in RECIPE_KINDS if r != "passthrough"},
    **{("mixtral", r): MIXTRAL_FUSED for r in ("slerp_gradient", "ties")},
}
# Cells where OUR output is wrong (none today); each must still be wrong, so a fixed cell leaves.
OURS_WRONG: dict = {}
# what mergekit's verdict on a listed cell must contain
SYMPTOMS = {
    LAYER_TYPES: "validate_layer_type",
    SIGLIP_NAMES: "vision_tower.vision_model.",
    NEOX_BUFFERS: "attention.bias required",
    FALCON_LAYOUT: ".ln_attn.",
    COHERE_QK_NORM: "_norm.weight required",
    QWEN3_MOE_DENSE: "required but not present",
    QWEN2_VL_CONFIG: "has no attribute num_hidden_layers",
    MODULES_SYNTAX: "must use modules: config syntax",
    QWEN2_MOE_EXPERTS: "missing",
    QWEN2_MOE_DEPTH: "unexpected_keys",
    LLAVA_TEXT: "missing",
    MIXTRAL_FUSED: "experts.gate_up_proj: relative error",
}


@dataclass(frozen=True)
class MergekitNames:
    """A family copied under the tensor names (and config keys) mergekit's architecture file
    expects, so that mergekit can be compared on its math: `renames` (stored -> mergekit's)
    are undone on its output; `extra` tensors (per text layer, `{i}` the index) are added as
    constants and `copies` (new name, stored name) as copies, both dropped from its output;
    `config` entries are added to config.json."""
    renames: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()
    copies: tuple[tuple[str, str], ...] = ()
    config: tuple[tuple[str, object], ...] = ()
    positions_differ: tuple[str, ...] = ()  # gradients put these elsewhere: not compared


MERGEKIT_NAMES = {
    "gemma3_multimodal": MergekitNames(renames=(("vision_tower.", "vision_tower.vision_model."),)),
    "gpt_neox": MergekitNames(extra=("gpt_neox.layers.{i}.attention.bias", "gpt_neox.layers.{i}.attention.masked_bias",
                                     "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq")),
    "falcon": MergekitNames(renames=((".input_layernorm.", ".ln_attn."),),
                            extra=("transformer.h.{i}.ln_mlp.weight", "transformer.h.{i}.ln_mlp.bias"),
                            copies=(("lm_head.weight", "transformer.word_embeddings.weight"),)),
    "cohere": MergekitNames(extra=("model.layers.{i}.self_attn.q_norm.weight",
                                   "model.layers.{i}.self_attn.k_norm.weight")),
    # mergekit makes the patch merger's MLP a module of 2 layers and gives both t at
    # position 1; ours evaluates them at 0, as every tensor outside a stack
    "qwen2_vl": MergekitNames(config=(("num_hidden_layers", LAYERS), ("vocab_size", VOCAB)),
                              positions_differ=("visual.merger.mlp.",)),
}


@pytest.fixture(scope="module")
def families(arch_families):
    return arch_families  # built once per session (conftest.py)


def _recipe(name: str, family: dict) -> str:
    return RECIPES[name].format(**{k: str(v) for k, v in family.items()})


def _load(architecture: str, folder: Path):
    model, info = loader_class(architecture).from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    return model, problems


def _loads_and_runs(architecture: str, folder: Path):
    model, problems = _load(architecture, folder)
    assert not problems, f"{architecture} at {folder}: {problems}"
    inputs = image_inputs(architecture, model.config) if architecture in MULTIMODAL else \
        forward_inputs(architecture, model.config)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    return model


def test_every_architecture_every_recipe_loads_and_equals_mergekit(families, tmp_path):
    """One test over the whole matrix (one process, families built once): a failure lists
    every cell that is wrong, not only the first. A cell is right when our output loads
    and runs, and either equals mergekit's, or mergekit is listed as failing there (and
    still does) and the cell's independent evidence holds."""
    from merging import merge

    wrong = []
    for architecture, family in families.items():
        for recipe in RECIPES:
            problems = _cell_problems(architecture, recipe, family, tmp_path, merge)
            if (architecture, recipe) in OURS_WRONG:
                problems = [] if problems else ["ours is right here now; take the cell out of OURS_WRONG"]
            wrong.extend(f"{architecture}/{recipe}: {problem}" for problem in problems)
    assert not wrong, "\n".join(wrong)


def _cell_problems(architecture: str, recipe: str, family: dict, tmp_path: Path, merge) -> list[str]:
    ours = tmp_path / architecture / recipe / "ours"
    try:
        merge(_recipe(recipe, family), ours, device="cpu")
        model = _loads_and_runs(architecture, ours)
    except Exception as error:  # noqa: BLE001 - collected, reported together
        return [f"ours: {str(error).splitlines()[0][:300]}"]
    verdict = _mergekit_verdict(architecture, _recipe(recipe, family), ours, model,
                                tmp_path / architecture / recipe / "mergekit")
    listed = MERGEKIT_FAILS.get((architecture, recipe))
    if listed is None:
        return [verdict] if verdict else []
    problems = []
    if not verdict:
        problems.append("mergekit is right here now; take the cell out of MERGEKIT_FAILS")
    elif SYMPTOMS[listed] not in verdict:
        problems.append(f"mergekit fails otherwise than listed ({listed}): {verdict}")
    elif WRITTEN_DIFFERS in verdict and listed != QWEN2_MOE_DEPTH:  # what mergekit did write must agree
        problems.append(verdict)
    return problems + _evidence(architecture, recipe, family, ours, tmp_path)


def _mergekit_verdict(architecture: str, text: str, ours: Path, our_model, theirs: Path) -> str:
    """'' where mergekit's output equals ours; else what mergekit got wrong: an error, an
    output transformers does not load, or different numbers. Outputs named alike are
    compared tensor by tensor (and by their depth config); outputs named otherwise (fused
    experts, transformers 5 prefixes) are loaded and compared by the models' state dicts."""
    try:
        run_mergekit(text, theirs)
    except Exception as error:  # noqa: BLE001 - the verdict is the message
        return f"mergekit fails: {_first_and_last_line(error)}"
    our_tensors, their_tensors = load_tensors(ours), load_tensors(theirs)
    if set(our_tensors) == set(their_tensors):
        return _difference(our_tensors, their_tensors) or _depth_difference(ours, theirs)
    try:
        their_model, problems = _load(architecture, theirs)
    except Exception as error:  # noqa: BLE001
        return f"mergekit's output does not load: {str(error).splitlines()[0][:200]}"
    our_state, their_state = our_model.state_dict(), their_model.state_dict()
    if problems:  # what mergekit did write (and its model has) must agree with ours
        missing = set(problems.get("missing_keys", ()))
        shared = (set(our_state) & set(their_state)) - missing
        our_state, their_state = ({k: v for k, v in state.items() if k in shared} for state in (our_state, their_state))
    difference = _difference(our_state, their_state)
    if problems:
        described = "; ".join(f"{len(v)} {k} (e.g. {sorted(v)[0]})" for k, v in problems.items())
        written = f"; {WRITTEN_DIFFERS}{difference}" if difference else ""
        return f"mergekit's output does not load: {described}{written}"
    return difference and f"loaded, differs from mergekit: {difference}"


WRITTEN_DIFFERS = "and what it wrote differs from ours: "


def _first_and_last_line(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:200] + (f" ... {lines[-1][:200]}" if len(lines) > 1 else "")


def _difference(ours: dict, theirs: dict) -> str:
    if set(ours) != set(theirs):
        return f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:6]}"
    for name, expected in theirs.items():
        actual = ours[name]
        if actual.shape != expected.shape:
            return f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
        error = _relative_error(actual, expected)
        if error > TOLERANCE:
            return f"{name}: relative error {error:.2e}"
    return ""


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().item() or 1.0
    return (actual.float() - expected.float()).abs().max().item() / scale


def _text_scope(config: dict) -> dict:
    return config.get("text_config") or config


def _depth_difference(ours: Path, theirs: Path) -> str:
    mine, other = (_text_scope(json.loads((folder / "config.json").read_text())) for folder in (ours, theirs))
    for key in ("num_hidden_layers", "layer_types", "max_window_layers", "mlp_only_layers"):
        if mine.get(key) != other.get(key):
            return f"config {key}: {mine.get(key)} vs mergekit's {other.get(key)}"
    return ""


# ------------------------------------------------------------------ evidence for ours
# Independent of merging/: stacks are read from the stored names, the math from the
# formulas in /work/shared/reference/merge-methods.md.
STACK = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<rest>.+)$")


def _evidence(architecture: str, recipe: str, family: dict, ours: Path, tmp_path: Path) -> list[str]:
    """Why our output is right where mergekit's is not: mergekit on a renamed copy of the
    family where that is simple, and always the recipe recomputed tensor by tensor."""
    problems = []
    if architecture in MERGEKIT_NAMES and recipe != "passthrough":
        copy = _mergekit_named_family(architecture, family, tmp_path / "mergekit_names" / architecture)
        theirs = tmp_path / architecture / recipe / "mergekit_renamed"
        try:
            run_mergekit(_recipe(recipe, copy), theirs)
            written = _from_mergekit_names(architecture, load_tensors(theirs))
            mine = load_tensors(ours)
            # mergekit may leave out what its file does not list (SigLIP's pooling head);
            # those tensors have the recomputation below
            if recipe == "slerp_gradient":
                written = {k: v for k, v in written.items()
                           if not any(part in k for part in MERGEKIT_NAMES[architecture].positions_differ)}
            difference = _difference({k: mine[k] for k in written if k in mine}, written)
            if difference:
                problems.append(f"differs from mergekit on renamed copy: {difference}")
        except Exception as error:  # noqa: BLE001
            problems.append(f"mergekit fails on renamed copy: {_first_and_last_line(error)}")
    inputs = {member: load_tensors(folder) for member, folder in family.items()}
    output = load_tensors(ours)
    check = {"linear": _check_linear, "slerp_gradient": _check_slerp, "ties": _check_ties,
             "passthrough": _check_passthrough, "task_arithmetic_tokenizer": _check_task_arithmetic}[recipe]
    problems.extend(check(inputs, output, family, ours))
    return problems


def _mergekit_named_family(architecture: str, family: dict, folder: Path) -> dict:
    if folder.exists():
        return json.loads((folder / "family.json").read_text())
    names = MERGEKIT_NAMES[architecture]
    copy = {}
    for member, source in family.items():
        target = folder / member
        shutil.copytree(source, target)
        for file in target.glob("*.safetensors"):
            file.unlink()
        tensors = {}
        for name, tensor in load_tensors(source).items():
            for old, new in names.renames:
                name = name.replace(old, new)
            tensors[name] = tensor
        for template in names.extra:
            for index in range(LAYERS):
                tensors[template.format(i=index)] = torch.ones(HIDDEN)
        for new, stored in names.copies:
            tensors[new] = tensors[stored].clone()
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((target / "config.json").read_text())
        config.update(dict(names.config))
        (target / "config.json").write_text(json.dumps(config))
        copy[member] = str(target)
    (folder / "family.json").write_text(json.dumps(copy))
    return copy


def _from_mergekit_names(architecture: str, tensors: dict) -> dict:
    names = MERGEKIT_NAMES[architecture]
    extra = {template.format(i=index) for template in names.extra for index in range(2 * LAYERS)}
    extra |= {new for new, _ in names.copies}
    renamed = {}
    for name, tensor in tensors.items():
        if name in extra:
            continue
        for old, new in names.renames:
            name = name.replace(new, old)
        renamed[name] = tensor
    return renamed


def _stack_of(name: str):
    """(prefix, index) of a block tensor, None outside the stacks."""
    match = STACK.match(name)
    return (match["prefix"], int(match["index"])) if match else None


def _is_text_stack(prefix: str) -> bool:
    return "vision" not in prefix and "visual" not in prefix


def _depths(names) -> dict[str, int]:
    indices: dict[str, set] = {}
    for name in names:
        if (found := _stack_of(name)):
            indices.setdefault(found[0], set()).add(found[1])
    return {prefix: len(values) for prefix, values in indices.items()}


def _same_names(inputs: dict, output: dict) -> list[str]:
    if set(output) != set(inputs["base"]):
        return [f"output tensors are not the base's: {sorted(set(output) ^ set(inputs['base']))[:4]}"]
    return []


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, what: str) -> list[str]:
    if actual.shape != expected.shape:
        return [f"{what}: {name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"]
    error = _relative_error(actual, expected)
    return [f"{what}: {name} off by {error:.2e}"] if error > TOLERANCE else []


def _check_linear(inputs, output, family, ours) -> list[str]:
    """0.5 base + 0.5 child_1, normalized by the weights' sum (1)."""
    problems = _same_names(inputs, output)
    for name, tensor in output.items():
        expected = (0.5 * inputs["base"][name] + 0.5 * inputs["child_1"][name]) / (0.5 + 0.5)
        problems += _compare(name, tensor, expected, "weighted mean")
    return problems


def _check_task_arithmetic(inputs, output, family, ours) -> list[str]:
    """base + 0.7 (child_1 - base) + 0.3 (child_2 - base); the union of identical
    vocabularies is the vocabulary itself."""
    problems = _same_names(inputs, output)
    for name, tensor in output.items():
        base = inputs["base"][name]
        expected = base + 0.7 * (inputs["child_1"][name] - base) + 0.3 * (inputs["child_2"][name] - base)
        problems += _compare(name, tensor, expected, "task arithmetic")
    return problems


def _check_ties(inputs, output, family, ours) -> list[str]:
    """Each task vector pruned to its int(density N) largest magnitudes, weighted, a sign
    elected by the weighted sum (0 counts as +), the agreeing entries summed and divided
    by the agreeing weights (a zero divisor is 1)."""
    problems = _same_names(inputs, output)
    weights, densities = (0.6, 0.4), (0.5, 0.7)
    for name, tensor in output.items():
        base = inputs["base"][name]
        pruned = []
        for member, weight, density in zip(("child_1", "child_2"), weights, densities):
            delta = inputs[member][name] - base
            keep = torch.zeros(delta.numel())
            keep[delta.abs().flatten().argsort(descending=True)[:max(1, int(density * delta.numel()))]] = 1
            pruned.append(weight * delta * keep.view_as(delta))
        pruned = torch.stack(pruned)
        elected = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
        agree = pruned.sign() == elected
        divisor = (torch.tensor(weights).view(-1, *[1] * base.dim()) * agree).sum(0)
        divisor[divisor.abs() < 1e-8] = 1
        problems += _compare(name, tensor, base + (pruned * agree).sum(0) / divisor, "ties")
    return problems


def _gradient(values: list, position: float) -> float:
    scaled = position * (len(values) - 1)
    low = min(int(scaled), len(values) - 1)
    high = min(len(values) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * values[low] + fraction * values[high]


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    unit_a, unit_b = (v.flatten() / v.norm() if v.norm() > 1e-8 else v.flatten() for v in (a, b))
    dot = torch.dot(unit_a, unit_b).item()
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def _check_slerp(inputs, output, family, ours) -> list[str]:
    """slerp(t, base, child_1) with t from the recipe's gradients at each block's position
    in its own stack (layer i of d at i/(d-1): text and vision alike), 0 outside stacks."""
    problems = _same_names(inputs, output)
    depths = _depths(inputs["base"])
    gradients = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
    checked_vision = False
    for name, tensor in output.items():
        found = _stack_of(name)
        position = found[1] / (depths[found[0]] - 1) if found else 0.0
        # Mixtral stores its experts and router under block_sparse_moe; mergekit's mixtral.json (and
        # transformers) name them mlp.*, so `filter: mlp` is meant for them too
        matched = name.replace(".block_sparse_moe.", ".mlp.")
        t = next((_gradient(values, position) for key, values in gradients.items() if key in matched), 0.5)
        problems += _compare(name, tensor, _slerp(t, inputs["base"][name], inputs["child_1"][name]), f"slerp t={t}")
        checked_vision |= bool(found) and not _is_text_stack(found[0]) and t not in (0.5,)
    if any(not _is_text_stack(prefix) for prefix in depths) and not checked_vision:
        problems.append("slerp: no vision block with a gradient t was checked")
    return problems


def _check_passthrough(inputs, output, family, ours) -> list[str]:
    """base layers 0-2 then child_1 layers 1-3: every text block the source block exactly,
    its per-layer config entries with it; everything else (embeddings, final norm, head,
    the other towers whole) exactly the base's or child_1's tensor."""
    problems = []
    origins = [("base", i) for i in range(0, 3)] + [("child_1", i) for i in range(1, 4)]
    expected_names = set()
    for name in inputs["base"]:
        found = _stack_of(name)
        if found and _is_text_stack(found[0]):
            for out_index, (member, index) in enumerate(origins):
                if found[1] == index:
                    source = name.replace(f"{found[0]}{index}.", f"{found[0]}{out_index}.", 1)
                    expected_names.add(source)
                    if source in output and not torch.equal(output[source], inputs[member][name]):
                        problems.append(f"passthrough: {source} is not {member}'s {name}")
        else:
            expected_names.add(name)
            if name in output and not any(torch.equal(output[name], inputs[m][name]) for m in ("base", "child_1")):
                problems.append(f"passthrough: {name} is neither the base's nor child_1's")
    if set(output) != expected_names:
        problems.append(f"passthrough: tensor names {sorted(set(output) ^ expected_names)[:4]}")
    config = _text_scope(json.loads((ours / "config.json").read_text()))
    sources = {m: _text_scope(json.loads((family[m] / "config.json").read_text())) for m in ("base", "child_1")}
    if config["num_hidden_layers"] != len(origins):
        problems.append(f"passthrough: num_hidden_layers {config['num_hidden_layers']}")
    if "layer_types" in sources["base"]:
        expected = [sources[m]["layer_types"][i] for m, i in origins]
        if config.get("layer_types") != expected:
            problems.append(f"passthrough: layer_types {config.get('layer_types')}, expected {expected}")
    if sources["base"].get("mlp_only_layers"):
        expected = [j for j, (m, i) in enumerate(origins) if i in sources[m]["mlp_only_layers"]]
        if config.get("mlp_only_layers") != expected:
            problems.append(f"passthrough: mlp_only_layers {config.get('mlp_only_layers')}, expected {expected}")
    return problems


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


def test_a_frankenmerge_keeps_each_layers_experts_or_dense_mlp(arch_families, tmp_path):
    """Qwen2-MoE's layers alternate dense and sparse (decoder_sparse_step 2: layers 1 and 3
    have experts). Slices that break the alternation get step 1 and the dense layers listed,
    so every output layer loads with the MLP its source layer had."""
    from merging import merge

    family = arch_families["qwen2_moe"]
    text = f"""
slices:
  - sources:
      - model: {family['base']}
        layer_range: [1, 3]
  - sources:
      - model: {family['child_1']}
        layer_range: [0, 2]
merge_method: passthrough
dtype: float32
"""
    out = merge(text, tmp_path / "out", device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == (1, [1, 2])
    _loads_and_runs("qwen2_moe", out)
    tensors = load_tensors(out)
    assert any(".layers.0.mlp.experts." in name for name in tensors)  # base layer 1: sparse
    assert not any(".layers.1.mlp.experts." in name for name in tensors)  # base layer 2: dense


def test_per_layer_values_reach_every_architectures_attention(arch_families):
    """The app's per-layer controls and layer-range sweeps write filters that match the
    model's own names: GPT-2's attn, Falcon's self_attention, GPT-NeoX's attention."""
    from merging import MergeConfig, plan_stages
    from merging.evaluate import with_parameter

    for architecture, attention in (("gpt2", "attn"), ("falcon", "self_attention"), ("gpt_neox", "attention"),
                                    ("llama", "self_attn")):
        family = arch_families[architecture]
        config = MergeConfig.from_yaml(f"models:\n  - model: {family['base']}\n  - model: {family['child_1']}\n"
                                       f"merge_method: slerp\nbase_model: {family['base']}\nparameters: {{t: 0.5}}\n")
        plan = plan_stages(with_parameter(config, "t@layers:1-2", 0.9))[0]
        changed = [t for t in plan.tasks if t.params["t"] == 0.9]
        assert changed and all(t.layer in (1, 2) for t in changed), architecture
        assert any(attention in t.name for t in changed) and any("mlp" in t.name for t in changed), architecture


def test_a_frankenmerge_keeps_each_layers_attention_window(tmp_path):
    """A Qwen2 config of transformers 4 (no layer_types): with use_sliding_window, layers from
    max_window_layers up slide. The output's layers keep their sources' kinds: a new count when
    the full layers still come first, else the kinds written out as layer_types."""
    from merging.architecture import Layout, structure_of
    from merging.plan import output_config

    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 4,
              "use_sliding_window": True, "max_window_layers": 2, "sliding_window": 16, "hidden_size": 32,
              "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
    layout = Layout(structure_of(config), [], config)
    stacked = output_config(config, layout, [("a", 0), ("a", 1), ("a", 1), ("a", 2), ("a", 3)], {"a": config})
    assert stacked["max_window_layers"] == 3 and "layer_types" not in stacked
    mixed = output_config(config, layout, [("a", 2), ("a", 0), ("a", 3)], {"a": config})
    assert mixed["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    from transformers import Qwen2Config
    assert Qwen2Config(**mixed).layer_types == mixed["layer_types"]
