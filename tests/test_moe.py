"""Mixture of experts from dense models: exact identities, routing, mergekit-moe equality,
and errors before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_tensors, run_cli
from merging import MergeError, load_config
from merging.moe import build_moe, plan_moe
from merging.moe_config import MoEConfig
from merging.routing import hidden_states, prompt_ids, trace_routing

# Prompts within one list have equal token counts: mergekit-moe pads a list without
# position ids, which shifts a shorter prompt's positions; equal lengths need no padding.
PROMPTS = {
    "c1": ["the cat sat on the mat", "a cat sat on a mat"],
    "c2": ["red blue red blue", "blue red blue red"],
    "c3": ["merge model layer merge", "layer model merge layer"],
}


def moe_yaml(tiny, gate_mode="hidden", experts=("c1", "c2", "c3"), per_token=2, base="base", **extra) -> str:
    config = {"base_model": tiny.path(base), "gate_mode": gate_mode, "experts_per_token": per_token,
              "experts": [{"source_model": tiny.path(name), "positive_prompts": PROMPTS.get(name, ["the cat"])}
                          for name in experts], **extra}
    return yaml.safe_dump(config, sort_keys=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "moe.yml"
    path.write_text(text)
    return path


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 4, 5, 6, 7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("gate_mode", ["random", "hidden"])
def test_identical_experts_compute_the_dense_model(tiny, tmp_path, gate_mode):
    """Mixtral renormalizes the top-k routing weights to 1, so copies of one MLP sum back
    to that MLP whatever the router chose."""
    config = MoEConfig.from_dict(yaml.safe_load(moe_yaml(tiny, gate_mode, per_token=2)))
    for expert in config.experts:
        expert.source_model = tiny.path("base")
    out = build_moe(config, tmp_path / "moe", allow_identical_experts=True)
    moe, dense = logits(out, IDS), logits(tiny["base"], IDS)
    assert (moe - dense).abs().max().item() < 1e-5
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_tied_embeddings_stay_tied(tiny, tmp_path):
    text = yaml.safe_dump({"base_model": tiny.path("tied"), "gate_mode": "random", "experts": [
        {"source_model": tiny.path("tied")}, {"source_model": tiny.path("tied_child")}]})
    out = build_moe(load_config(text), tmp_path / "moe", seed=3)
    assert "lm_head.weight" not in load_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert logits(out, IDS).isfinite().all()


def test_hidden_gates_route_each_experts_prompts_to_it(tiny, tmp_path):
    out = build_moe(load_config(moe_yaml(tiny, "hidden", per_token=1)), tmp_path / "moe")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    hits = total = 0
    for index, name in enumerate(("c1", "c2", "c3")):
        for prompt in PROMPTS[name]:
            trace = trace_routing(model, prompt_ids(tokenizer, prompt))
            chosen = trace.weights[:, -1].argmax(-1)  # each layer's expert for the last token
            hits += int((chosen == index).sum())
            total += chosen.numel()
            assert (chosen == index).float().mean() >= 0.5, (prompt, chosen.tolist())
    assert hits / total >= 0.75  # measured: 22 of 24 (prompt, layer) pairs
    assert trace.weights.sum(-1).allclose(torch.ones(()))  # top-k weights renormalized per token


def test_the_output_loads_and_generates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli(write(tmp_path, moe_yaml(tiny, "cheap_embed")), tmp_path / "moe")
    assert result.returncode == 0, result.stderr
    assert "tensors" in result.stderr and "router prompts" in result.stderr  # the progress bars
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
    assert "gate_mode: cheap_embed" in (tmp_path / "moe" / "mergekit_moe_config.yml").read_text()


def run_mergekit_moe(text: str, out: Path) -> dict:
    """mergekit-moe 0.1.5 in this process; its fused expert tensors split back into the
    per-expert Mixtral layout we write."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(yaml.safe_load(text)), str(out),
          MergeOptions(device="cpu", quiet=True, copy_tokenizer=True), device="cpu")
    tensors = {}
    for name, tensor in load_tensors(out).items():
        prefix, _, rest = name.partition(".mlp.")
        if rest == "gate.weight":
            tensors[f"{prefix}.block_sparse_moe.gate.weight"] = tensor
        elif rest == "experts.gate_up_proj":
            for expert, fused in enumerate(tensor):
                gate, up = fused.chunk(2)
                tensors[f"{prefix}.block_sparse_moe.experts.{expert}.w1.weight"] = gate
                tensors[f"{prefix}.block_sparse_moe.experts.{expert}.w3.weight"] = up
        elif rest == "experts.down_proj":
            for expert, down in enumerate(tensor):
                tensors[f"{prefix}.block_sparse_moe.experts.{expert}.w2.weight"] = down
        else:
            tensors[name] = tensor
    return tensors


@pytest.mark.parametrize("gate_mode", ["cheap_embed", "hidden"])
def test_equal_to_mergekit_moe(tiny, tmp_path, gate_mode):
    text = moe_yaml(tiny, gate_mode, dtype="float32")
    config = yaml.safe_load(text)
    config["experts"][1]["negative_prompts"] = ["the cat sat on the mat"]
    config["experts"][2]["residual_scale"] = 0.5
    text = yaml.safe_dump(config, sort_keys=False)
    theirs = run_mergekit_moe(text, tmp_path / "mergekit")
    result = run_cli(write(tmp_path, text), tmp_path / "ours")
    assert result.returncode == 0, result.stderr
    ours = load_tensors(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        if ".gate.weight" in name and gate_mode == "hidden":
            # mergekit runs the prompts through a bfloat16 copy of the base; we use float32
            cosine = torch.nn.functional.cosine_similarity(ours[name], expected, dim=-1)
            assert cosine.min() > 0.9999, name
            assert (ours[name] - expected).abs().max() < 2e-2, name
        elif ".gate.weight" in name:
            assert (ours[name] - expected).abs().max() < 1e-6, name
        else:  # copied and residual-scaled tensors: bit for bit
            assert torch.equal(ours[name], expected), name
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    their_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    for key in ("num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_key_value_heads", "vocab_size", "rms_norm_eps", "architectures"):
        assert ours_config[key] == their_config[key], key


def test_padding_does_not_change_hidden_states(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    for average in (False, True):
        alone = hidden_states(model, tokenizer, ["a red dog"], average)
        batched = hidden_states(model, tokenizer, ["a red dog", "the cat sat on the mat with the dog"], average)
        other = hidden_states(model, tokenizer, ["the cat sat on the mat with the dog"], average)
        assert torch.allclose(batched, (alone + other) / 2, atol=1e-5)


def test_noise_is_seeded_and_scaled(tiny, tmp_path):
    text = yaml.safe_dump({"base_model": tiny.path("base"), "gate_mode": "random", "experts": [
        {"source_model": tiny.path("c1"), "noise_scale": 0.01}, {"source_model": tiny.path("c2")}]})
    first = load_tensors(build_moe(load_config(text), tmp_path / "a", seed=1))
    again = load_tensors(build_moe(load_config(text), tmp_path / "b", seed=1))
    other = load_tensors(build_moe(load_config(text), tmp_path / "c", seed=2))
    source = load_tensors(tiny["c1"])
    name = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])
    noise = first[name] - source["model.layers.1.mlp.gate_proj.weight"]
    assert 0.008 < noise.std().item() < 0.012
    untouched = "model.layers.1.block_sparse_moe.experts.1.w1.weight"
    assert torch.equal(first[untouched], load_tensors(tiny["c2"])["model.layers.1.mlp.gate_proj.weight"])


def test_config_round_trips_through_yaml(tiny):
    text = moe_yaml(tiny, "hidden_avg", per_token=1, dtype="bf16")
    config = load_config(text)
    assert isinstance(config, MoEConfig) and config.dtype == "bfloat16"
    assert load_config(config.to_yaml()) == config


def test_dry_run_prints_the_plan(tiny, tmp_path):
    result = run_cli(write(tmp_path, moe_yaml(tiny)), tmp_path / "moe", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "3 experts, 2 per token, 4 layers, gate_mode hidden" in result.stdout
    assert "not a power of two" in result.stderr
    assert not (tmp_path / "moe").exists()


def _qwen(folder: Path) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).save_pretrained(folder)
    return str(folder)


BAD = {
    "too few experts": (lambda t, tiny: moe_yaml(tiny, experts=("c1", "c2"), per_token=3),
                        "experts_per_token is 3 but there are only 2 experts"),
    "misspelt key": (lambda t, tiny: moe_yaml(tiny).replace("positive_prompts", "positive_promts"),
                     "unknown key 'positive_promts' in expert (experts[0]) (did you mean 'positive_prompts'?)"),
    "missing prompts": (lambda t, tiny: yaml.safe_dump({"base_model": tiny.path("base"), "experts": [
        {"source_model": tiny.path("c1"), "positive_prompts": ["the cat"]}, {"source_model": tiny.path("c2")}]}),
        "has no positive_prompts; gate_mode hidden builds its router from them"),
    "same prompts": (lambda t, tiny: yaml.safe_dump({"base_model": tiny.path("base"), "experts": [
        {"source_model": tiny.path(n), "positive_prompts": ["the cat"]} for n in ("c1", "c2")]}),
        "every expert has the same prompts"),
    "identical experts": (lambda t, tiny: yaml.safe_dump({"base_model": tiny.path("base"), "gate_mode": "random",
                                                          "experts": [{"source_model": tiny.path("c1")}] * 2}),
                          "every expert is"),
    "another width": (lambda t, tiny: moe_yaml(tiny, experts=("c1", "wide")),
                      "('{wide}') has hidden size 64, the base has 32"),
    "another depth": (lambda t, tiny: moe_yaml(tiny, experts=("c1", "deep")),
                      "('{deep}') has layer count 6, the base has 4"),
    "not llama": (lambda t, tiny: yaml.safe_dump({"base_model": tiny.path("base"), "gate_mode": "random",
                                                  "experts": [tiny.path("c1"), _qwen(t / "qwen")]}),
                  "is a 'qwen2' model; a Mixtral MoE is built from Llama or Mistral models"),
    "gate mode": (lambda t, tiny: moe_yaml(tiny, "hiden"), "unknown gate_mode 'hiden' (did you mean 'hidden'?)"),
    "missing model": (lambda t, tiny: moe_yaml(tiny).replace(tiny.path("c2"), str(t / "nowhere")),
                      "is neither a local folder nor a hub id"),
    "shared experts": (lambda t, tiny: moe_yaml(tiny, shared_experts=[{"source_model": tiny.path("c1")}]),
                       "shared_experts need a Qwen2-MoE output"),
    "noise": (lambda t, tiny: moe_yaml(tiny).replace("positive_prompts", "noise_scale: -1\n  positive_prompts", 1),
              "noise_scale (experts[0]) must be at least 0, got -1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_fail_before_work_with_one_line(case, tiny, tmp_path, capsys):
    from merging.__main__ import main  # the command line's entry point, in this process for speed

    make, expected = BAD[case]
    assert main([str(write(tmp_path, make(tmp_path, tiny))), str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    message = [line for line in lines if line.startswith("error:")]
    assert len(message) == 1 and all(not line.startswith("Traceback") for line in lines), lines
    assert expected.format(**{k: tiny.path(k) for k in tiny}) in message[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_library_errors_name_the_problem(tiny):
    with pytest.raises(MergeError, match="this is a merge recipe"):
        plan_moe(f"models:\n  - model: {tiny.path('c1')}\nmerge_method: linear\n")
    with pytest.raises(MergeError, match="one YAML document"):
        load_config(moe_yaml(tiny) + "---\n" + moe_yaml(tiny))


def test_streamed_routed_answer_equals_the_whole_one(tiny, tmp_path):
    """The MoE tab streams its answer: the pieces join to the text generate_routed gives,
    and the final RoutedAnswer has the same tokens and routing."""
    from merging.generation import Sampling, load_model
    from merging.routing import RoutedAnswer, generate_routed, stream_routed

    result = run_cli(write(tmp_path, moe_yaml(tiny, "cheap_embed")), tmp_path / "moe")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_model(tmp_path / "moe")
    sampling = Sampling(max_new_tokens=12, temperature=0.8, seed=5)
    whole = generate_routed(model, tokenizer, "the cat", sampling)
    pieces = list(stream_routed(model, tokenizer, "the cat", sampling))
    assert isinstance(pieces[-1], RoutedAnswer) and all(isinstance(p, str) for p in pieces[:-1])
    streamed = pieces[-1]
    assert len(pieces) > 2 and "".join(pieces[:-1]).strip() == whole.text.strip() == streamed.text.strip()
    assert streamed.tokens == whole.tokens and torch.equal(streamed.trace.weights, whole.trace.weights)
    early = stream_routed(model, tokenizer, "the cat", sampling)
    next(early)
    early.close()  # a cancelled request: the generation thread stops and is joined
    import threading

    from merging.generation import THREAD_NAME
    assert not any(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())
