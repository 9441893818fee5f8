"""The shipped architecture table (merging/architectures.json) is what transformers says.

Planning reads the table so that a merge does not import transformers; these tests keep the
table equal to what the architecture model learns from transformers itself, and the table's
replay of transformers' weight renaming equal to transformers' own.
"""

from __future__ import annotations

import json

from merging import architecture as arch


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_the_table_equals_what_transformers_says(arch_families):
    for name, family in arch_families.items():
        config = _config(family["base"])
        shipped = arch._shipped().get(arch.structure_key(config))
        assert shipped is not None, f"{name}: not in the table; run python -m merging.architecture on it"
        learned = arch._learn_structure(config, name)
        assert shipped == learned and shipped.mapping == learned.mapping, name


def test_renaming_replays_transformers_own(arch_families):
    """Every stored name of every family maps to the module name transformers loads it into."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    checked = 0
    for name, family in arch_families.items():
        config = _config(family["base"])
        structure = arch.structure_of(config, name)
        model = arch._meta_model(config, name)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        for file in family["base"].glob("*.safetensors"):
            with safe_open(file, "pt") as handle:
                for stored in handle.keys():
                    expected = rename_source_key(stored, renamings, converters)[0]
                    assert structure.module_name(stored) == expected, (name, stored)
                    checked += 1
    assert checked > 1000


def test_planning_a_known_architecture_does_not_import_transformers(arch_families, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    family = arch_families["gpt2"]
    code = ("import sys; from merging import MergeConfig, plan_stages; "
            f"plan = plan_stages(MergeConfig.from_yaml('models:\\n  - model: {family['base']}\\n  - model: "
            f"{family['child_1']}\\nmerge_method: linear\\nparameters: {{weight: 0.5}}\\n'))[0]; "
            "print(plan.num_layers, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.split() == ["4", "False"], result.stderr[-2000:]


def test_a_config_claiming_a_billion_layers_is_read_without_building_them():
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 10**9,
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 100}
    structure = arch._learn_structure(config, "huge")
    assert [(s.module, s.depth_key) for s in structure.stacks] == [("model.layers", ("num_hidden_layers",))]
    mixtral = dict(config, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=10**6)
    assert arch._learn_structure(mixtral, "many experts").stacks[0].module == "model.layers"


def test_an_architecture_transformers_lacks_is_read_from_its_names():
    """One layers/h/blocks stack; embeddings and head found by their names (Bloom's
    word_embeddings_layernorm is a norm, not a second embedding)."""
    from merging.architecture import UnknownArchitecture, structure_from_names

    names = ["transformer.word_embeddings.weight", "transformer.word_embeddings_layernorm.weight",
             "transformer.h.0.mlp.dense_4h_to_h.weight", "transformer.h.1.mlp.dense_4h_to_h.weight",
             "transformer.ln_f.weight", "lm_head.weight"]
    structure = structure_from_names({"model_type": "custom", "n_layer": 2}, names,
                                     UnknownArchitecture("custom has no transformers class"))
    assert structure.input_embeddings == ("transformer.word_embeddings.weight",)
    assert structure.output_head == "lm_head.weight"
    assert structure.text.module == "transformer.h" and structure.text.depth_key == ("n_layer",)
