"""The command line as a user meets it: checks, errors, dry runs, outputs that load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import load_tensors, run_cli
from merging import MergeConfig, merge

SLERP = """
models:
  - model: {c1}
merge_method: slerp
base_model: {base}
parameters:
  t: [0, 0.5, 1]
"""


def write_config(tmp_path: Path, text: str, tiny) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text.format(**{k: tiny.path(k) for k in tiny}))
    return path


def test_merged_model_loads_and_generates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli(write_config(tmp_path, SLERP, tiny), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "merging" in result.stderr  # the tqdm bar
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "slerp" in card and tiny.path("c1") in card and "merge_method: slerp" in card


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path):
    result = run_cli(write_config(tmp_path, SLERP, tiny), tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "output: 4 layers, 39 tensors" in result.stdout
    assert "estimated peak memory" in result.stdout
    assert not (tmp_path / "out").exists()


def test_out_shard_size_writes_an_index(tiny, tmp_path):
    result = run_cli(write_config(tmp_path, SLERP, tiny), tmp_path / "out", "--out-shard-size", "50KB")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and all((tmp_path / "out" / s).stat().st_size <= 50_000 + 4096 for s in shards)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


BAD_CONFIGS = {
    "missing model": ("models:\n  - model: /nonexistent/model\nmerge_method: linear\n",
                      "'/nonexistent/model' is neither a local folder nor a hub id"),
    "unknown method": ("models:\n  - model: {c1}\nmerge_method: slurp\n", "unknown merge_method 'slurp'"),
    "slerp with two others": ("models:\n  - model: {c1}\n  - model: {c2}\nmerge_method: slerp\n"
                              "base_model: {base}\nparameters: {{t: 0.5}}\n",
                              "slerp takes exactly 1 model besides the base, got 2"),
    "slerp without t": ("models:\n  - model: {c1}\nmerge_method: slerp\nbase_model: {base}\n",
                        "slerp needs parameter 't'"),
    "t out of range": ("models:\n  - model: {c1}\nmerge_method: slerp\nbase_model: {base}\n"
                       "parameters: {{t: [0, 1.5]}}\n", "t=1.5 in the top-level parameters is above its maximum 1"),
    "della epsilon": ("models:\n  - model: {c1}\n    parameters: {{weight: 1, density: 0.9, epsilon: 0.2}}\n"
                      "merge_method: della\nbase_model: {base}\n", "della needs 0 < density-epsilon"),
    "missing weight": ("models:\n  - model: {c1}\nmerge_method: ties\nbase_model: {base}\n",
                       "ties needs parameter 'weight' of model"),
    "layer range past the end": ("slices:\n  - sources:\n      - model: {c1}\n        layer_range: [0, 9]\n"
                                 "merge_method: passthrough\n", "goes past its 4 layers"),
    "different widths": ("models:\n  - model: {c1}\n    parameters: {{weight: 1}}\n  - model: {wide}\n"
                         "    parameters: {{weight: 1}}\nmerge_method: linear\n", "has hidden size 64"),
    "different depths": ("models:\n  - model: {c1}\n    parameters: {{weight: 1}}\n  - model: {deep}\n"
                         "    parameters: {{weight: 1}}\nmerge_method: linear\n", "use slices"),
    "yaml syntax": ("models: [\nmerge_method: linear\n", "not valid YAML"),
    "both models and slices": ("merge_method: linear\n", "exactly one of 'models', 'slices' or 'modules'"),
    "bad dtype": ("models:\n  - model: {c1}\nmerge_method: passthrough\ndtype: float8\n",
                  "dtype must be one of"),
    "unequal slice sources": ("slices:\n  - sources:\n      - model: {c1}\n        layer_range: [0, 2]\n"
                              "      - model: {c2}\n        layer_range: [0, 3]\nmerge_method: linear\n",
                              "same number of layers"),
    "tokenizer overrides": ("models:\n  - model: {c1}\n    parameters: {{weight: 1}}\nmerge_method: linear\n"
                            "tokenizer:\n  source: union\n  tokens: {{x: {{source: {c1}}}}}\n",
                            "tokenizer.tokens is not supported yet"),
    "stage cycle": ("name: a\nmodels:\n  - model: b\nmerge_method: passthrough\n---\nname: b\nmodels:\n"
                    "  - model: a\nmerge_method: passthrough\n", "cycle"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_input_gets_one_line_and_no_output(case, tiny, tmp_path):
    text, message = BAD_CONFIGS[case]
    result = run_cli(write_config(tmp_path, text, tiny), tmp_path / "out")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_misspelt_parameter_is_a_warning_and_an_error_with_strict(tiny, tmp_path):
    """mergekit ignores a parameter its method does not take; so do we, saying so."""
    text = ("models:\n  - model: {c1}\n    parameters: {{weight: 1, desnity: 0.5}}\n"
            "merge_method: ties\nbase_model: {base}\n")
    config = write_config(tmp_path, text, tiny)
    result = run_cli(config, tmp_path / "out", "--dry-run")
    assert result.returncode == 0 and "has no effect on ties (mergekit ignores it); did you mean 'density'?" \
        in result.stderr, result.stderr
    result = run_cli(config, tmp_path / "out", "--strict")
    assert result.returncode == 2 and "did you mean 'density'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_traceback(tiny, tmp_path):
    text = BAD_CONFIGS["unknown method"][0]
    result = run_cli(write_config(tmp_path, text, tiny), tmp_path / "out", "--verbose")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_refuses_a_non_empty_output_folder_and_overwrites_when_asked(tiny, tmp_path):
    config = write_config(tmp_path, SLERP, tiny)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = run_cli(config, tmp_path / "out")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    result = run_cli(config, tmp_path / "out", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "notes.txt").exists()


def test_a_merge_that_fails_midway_leaves_nothing(tiny, tmp_path):
    config = MergeConfig.from_yaml(SLERP.format(**{k: tiny.path(k) for k in tiny}))

    def explode(done, total, name):
        if done == 10:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        merge(config, tmp_path / "out", progress=explode)
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_caught_before_merging(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["c1"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    text = SLERP.replace("{c1}", str(broken))
    result = run_cli(write_config(tmp_path, text, tiny), tmp_path / "out")
    assert result.returncode == 2 and "truncated" in result.stderr


def test_vocabulary_mismatch_is_reported_and_cut_to_the_base(tiny, tmp_path):
    text = ("models:\n  - model: {more_vocab}\n    parameters: {{weight: 0.5}}\n  - model: {c1}\n"
            "    parameters: {{weight: 0.5}}\nmerge_method: task_arithmetic\nbase_model: {base}\n")
    result = run_cli(write_config(tmp_path, text, tiny), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "vocabularies differ: embedding and lm_head rows matched by token" in result.stderr
    merged = load_tensors(tmp_path / "out")
    child = load_tensors(tiny["more_vocab"])
    base, c1 = load_tensors(tiny["base"]), load_tensors(tiny["c1"])
    name = "model.embed_tokens.weight"
    assert merged[name].shape[0] == base[name].shape[0] == 96
    expected = base[name] + 0.5 * (child[name][:96] - base[name]) + 0.5 * (c1[name] - base[name])
    assert torch.allclose(merged[name], expected, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 96


def test_help_lists_every_method_with_parameters():
    result = run_cli("--help")
    from merging import METHODS
    for name in METHODS:
        assert f"  {name}: " in result.stdout
    assert "density (per model, default 1.0, range [0, 1])" in result.stdout


def test_cli_does_not_import_transformers_or_gradio(tiny, tmp_path):
    import subprocess
    import sys
    code = ("import sys; from merging.__main__ import main; "
            f"main([{str(write_config(tmp_path, SLERP, tiny))!r}, {str(tmp_path / 'out')!r}]); "
            "print(sorted(m for m in ('transformers', 'gradio') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_cuda_without_a_gpu_is_a_clear_error(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli(write_config(tmp_path, SLERP, tiny), tmp_path / "out", "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --device cuda was asked for, but no CUDA device is available"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_equals_cpu_merge(tiny, tmp_path):
    from helpers import max_relative_error
    text = ("models:\n  - model: {c1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {c2}\n"
            "    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\nbase_model: {base}\n")
    config = write_config(tmp_path, text, tiny)
    for device in ("cpu", "cuda"):
        assert run_cli(config, tmp_path / device, "--device", device).returncode == 0
    assert max_relative_error(load_tensors(tmp_path / "cuda"), load_tensors(tmp_path / "cpu")) < 1e-5


@pytest.mark.parametrize("method, density", [("dare_linear", 0.3), ("dare_ties", 0.6), ("della", 0.5)])
def test_random_methods_end_to_end_keep_about_density(method, density, tiny, tmp_path):
    extra = ", epsilon: 0.1" if method == "della" else ""
    text = (f"models:\n  - model: {{c1}}\n    parameters: {{{{weight: 1.0, density: {density}{extra}}}}}\n"
            f"merge_method: {method}\nbase_model: {{base}}\ndtype: float32\n")
    config = write_config(tmp_path, text, tiny)
    assert run_cli(config, tmp_path / "a", "--seed", "7").returncode == 0
    assert run_cli(config, tmp_path / "b", "--seed", "7").returncode == 0
    merged, base = load_tensors(tmp_path / "a"), load_tensors(tiny["base"])
    assert all(torch.equal(merged[k], v) for k, v in load_tensors(tmp_path / "b").items())  # same seed
    changed = sum(int((merged[k] != base[k]).sum()) for k in base)
    total = sum(v.numel() for v in base.values())
    assert abs(changed / total - density) < 0.01


def test_chat_template_by_name(tiny, tmp_path):
    from transformers import AutoTokenizer
    text = SLERP + "chat_template: chatml\n"
    assert run_cli(write_config(tmp_path, text, tiny), tmp_path / "out").returncode == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_auto_takes_the_inputs_template(tiny, tmp_path):
    text = SLERP + "chat_template: auto\n"
    assert run_cli(write_config(tmp_path, text, tiny), tmp_path / "out").returncode == 0
    assert (tmp_path / "out" / "chat_template.jinja").read_text().strip() == \
        (tiny["base"] / "chat_template.jinja").read_text().strip()


def test_dry_run_of_a_multi_stage_file_checks_every_stage(tiny, tmp_path):
    from test_mergekit_equality import MULTI_STAGE
    config = write_config(tmp_path, MULTI_STAGE, tiny)
    result = run_cli(config, tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("== stage") == 3
    broken = write_config(tmp_path, MULTI_STAGE.replace("model: second", "model: secnd"), tiny)
    result = run_cli(broken, tmp_path / "out", "--dry-run")
    assert result.returncode == 2 and "'secnd' is neither a local folder nor a hub id" in result.stderr
