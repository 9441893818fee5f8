"""More model sources: PyTorch .bin checkpoints (safely), LoRA adapters applied on the fly,
and LoRA extraction."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from helpers import load_tensors, run_cli
from merging import MergeError, merge
from merging.sources import open_model


def _copy_small_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, target / file.name)


@pytest.fixture(scope="module")
def bin_model(tiny, tmp_path_factory) -> Path:
    """The tiny c1 child saved as a .bin checkpoint (zip format) instead of safetensors."""
    folder = tmp_path_factory.mktemp("bin") / "c1-bin"
    _copy_small_files(tiny["c1"], folder)
    torch.save(load_tensors(tiny["c1"]), folder / "pytorch_model.bin")
    return folder


def slerp(a, b, t=0.3) -> str:
    return f"models:\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\nparameters:\n  t: {t}\ndtype: float32\n"


def _sharded_bin(tiny, folder: Path) -> Path:
    """c1 as two .bin shards and their index, as older checkpoints on the hub are."""
    import json

    _copy_small_files(tiny["c1"], folder)
    tensors = load_tensors(tiny["c1"])
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in shards.items():
        torch.save({n: tensors[n] for n in part}, folder / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_a_bin_checkpoint_merges_as_its_safetensors_twin(tiny, bin_model, tmp_path):
    from_safetensors = load_tensors(merge(slerp(tiny.path("base"), tiny.path("c1")), tmp_path / "b"))
    for index, model in enumerate((bin_model, _sharded_bin(tiny, tmp_path / "sharded"))):
        from_bin = load_tensors(merge(slerp(tiny.path("base"), model), tmp_path / f"a{index}"))
        assert from_bin.keys() == from_safetensors.keys()
        assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {Path(os.environ['PAYLOAD_MARKER'])}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_bin_that_needs_arbitrary_unpickling_is_refused_and_never_run(tiny, tmp_path, monkeypatch, writer):
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    folder = tmp_path / "evil"
    _copy_small_files(tiny["c1"], folder)
    state = {"model.norm.weight": Payload()}
    if writer == "pickle":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(state))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    result = run_cli(write_config(tmp_path, slerp(tiny.path("base"), folder)), tmp_path / "out")
    assert result.returncode == 2
    assert "holds Python objects besides tensors; loading it could run arbitrary code, so it is refused" \
        in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A LoRA adapter made with peft on the tiny base (random B, per-module rank and alpha,
    an embedding LoRA and lm_head saved whole), and the base with it merged by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                        modules_to_save=["lm_head"], rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6})
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "peft-merged")
    return root / "adapter", root / "peft-merged"


def test_an_adapter_on_the_fly_equals_the_model_peft_merged(tiny, adapter, tmp_path):
    folder, peft_merged = adapter
    expected = load_tensors(peft_merged)
    for reference in (f"{tiny.path('base')}+{folder}", str(folder)):  # mergekit's syntax, and the folder alone
        checkpoint = open_model(reference)
        assert len(checkpoint.updates) == 13 and sorted(checkpoint.replacements) == ["lm_head.weight",
                                                                                        "model.embed_tokens.weight"]
        for name, tensor in expected.items():
            assert torch.allclose(checkpoint.read(name).float(), tensor, atol=1e-6), name
    # in a merge: slerp between the base and the adapted model at t=1 is the adapted model
    ours = load_tensors(merge(slerp(tiny.path("base"), f"{tiny.path('base')}+{folder}", t=1.0), tmp_path / "m"))
    assert all(torch.allclose(ours[k], expected[k], atol=1e-6) for k in expected)
    assert not list(tmp_path.glob("m/*adapter*"))  # nothing of the adapter materialized on disk


def test_an_adapter_for_another_model_is_refused_when_opened(tiny, adapter):
    """The adapter was trained on a 32-wide base; on the 64-wide model B @ A has the wrong
    shape, and that is said when the model is opened, before any merge work."""
    from merging import MergeError

    folder, _ = adapter
    with pytest.raises(MergeError, match=r"does not give the base's shape \[64, 64\]|replaces .* with shape"):
        open_model(f"{tiny.path('wide')}+{folder}")


def test_an_adapter_over_a_base_known_by_its_headers_fetches_the_base(tiny, adapter):
    """A base+adapter planned before the base's weights are down (a hub base, without
    download_weights) opens the base again with weights when fetched."""
    from dataclasses import replace

    from merging.sources import Checkpoint, open_folder
    from merging.sources.lora import open_lora

    folder, peft_merged = adapter
    opened = []

    def open_base(reference, download_weights):
        opened.append(download_weights)
        full = open_folder(Path(reference))
        if download_weights:
            return full
        headers = {name: replace(info, file=None) for name, info in full.tensors.items()}
        return Checkpoint(reference, full.folder, full.config, headers)

    planned = open_lora(f"{tiny.path('base')}+{folder}", open_base, download_weights=False)
    assert not planned.has_weights and opened == [False]
    fetched = planned.fetched()
    assert fetched.has_weights and opened == [False, True] and fetched.fetched() is fetched
    expected = load_tensors(peft_merged)
    assert all(torch.allclose(fetched.read(n).float(), expected[n], atol=1e-6) for n in expected)


def test_adapter_errors_name_the_problem(tiny, adapter, tmp_path):
    folder, _ = adapter
    with pytest.raises(MergeError, match="is not a LoRA adapter folder"):
        open_model(f"{tiny.path('base')}+{tiny.path('c1')}")
    with pytest.raises(MergeError, match="which its base model does not have"):
        open_model(f"{tiny.path('tied')}+{folder}")  # a tied model has no lm_head to replace


def test_extract_lora_recovers_a_low_rank_fine_tune(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_cli("extract-lora", tiny.path("c2"), tiny.path("base"), tmp_path / "lora", "--rank", "2")
    assert result.returncode == 0, result.stderr
    assert "keeping 100.0% of their difference's energy" in result.stderr
    assert "not in the adapter" in result.stderr  # c2 also changed its norms and embeddings
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    restored = dict(PeftModel.from_pretrained(base, tmp_path / "lora").merge_and_unload().named_parameters())
    target = dict(AutoModelForCausalLM.from_pretrained(tiny["c2"]).named_parameters())
    linear = [n for n in target if n.endswith("_proj.weight")]
    assert len(linear) == 28
    assert max((restored[n] - target[n]).abs().max().item() for n in linear) < 1e-5
    one = run_cli("extract-lora", tiny.path("c1"), tiny.path("base"), tmp_path / "lora1", "--rank", "1")
    assert one.returncode == 0 and "keeping" in one.stderr  # a full-rank delta: part of its energy
    wrong = run_cli("extract-lora", tiny.path("wide"), tiny.path("base"), tmp_path / "bad", "--rank", "2")
    assert wrong.returncode == 2 and "is not a fine-tune of this base" in wrong.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("quantization,tolerance", [("F32", 0.0), ("F16", 1e-3), ("Q8_0", 2e-2)])
def test_a_gguf_merges_like_its_original_within_the_quantization_error(tiny, tmp_path, monkeypatch,
                                                                       quantization, tolerance):
    from tiny_models import write_gguf

    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    gguf_path = write_gguf(tiny["c1"], tmp_path / f"c1.{quantization}.gguf", quantization)
    result = run_cli(write_config(tmp_path, slerp(tiny.path("base"), gguf_path, t=0.5)), tmp_path / "from-gguf")
    assert result.returncode == 0, result.stderr
    assert ("carries its quantization error" in result.stderr) == (quantization == "Q8_0")
    ours = load_tensors(tmp_path / "from-gguf")
    reference = load_tensors(merge(slerp(tiny.path("base"), tiny.path("c1"), t=0.5), tmp_path / "from-original"))
    assert ours.keys() == reference.keys()
    worst = max(((ours[k] - reference[k]).abs().max() / reference[k].abs().max()).item() for k in reference)
    assert worst <= tolerance, worst
    checkpoint = open_model(str(gguf_path))
    assert checkpoint.config["num_hidden_layers"] == 4 and checkpoint.config["model_type"] == "llama"


def _with_added_tokens(base: Path, folder: Path, tokens: list[str], seed: int) -> Path:
    """The base with `tokens` added to its tokenizer and seeded rows for them (and all
    weights nudged), as fine-tunes that add tokens are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(tokens)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def token_family(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return (tiny["base"], _with_added_tokens(tiny["base"], root / "x", ["<tool>", "<think>"], seed=11),
            _with_added_tokens(tiny["base"], root / "y", ["<think>", "<code>"], seed=12))


def test_vocabulary_union_maps_every_models_rows_by_token(token_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, x, y = token_family
    recipe = (f"models:\n  - model: {base}\n  - model: {x}\n  - model: {y}\nmerge_method: linear\n"
              f"parameters: {{weight: 1}}\nbase_model: {base}\ntokenizer_source: union\ndtype: float32\n")
    result = run_cli(write_config(tmp_path, recipe), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "3 tokens added" in result.stderr
    merged = load_tensors(tmp_path / "out")["model.embed_tokens.weight"]
    b, ex, ey = (load_tensors(m)["model.embed_tokens.weight"] for m in (base, x, y))
    assert merged.shape[0] == 99  # 96 + <tool> and <think> (from x) + <code> (from y)
    assert torch.allclose(merged[:96], (b + ex[:96] + ey[:96]) / 3, atol=1e-6)
    # <tool>: only x has it, so the base and y take x's row
    assert torch.allclose(merged[96], ex[96], atol=1e-6)
    # <think>: x (row 97) and y (row 96) have it, the base does not: the base takes their mean
    assert torch.allclose(merged[97], (ex[97] + ey[96] + (ex[97] + ey[96]) / 2) / 3, atol=1e-6)
    # <code>: only y has it (row 97)
    assert torch.allclose(merged[98], ey[97], atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids(["<tool>", "<think>", "<code>"]) == [96, 97, 98]
    assert tokenizer("the <code> cat")["input_ids"][-2:] == [98, tokenizer.convert_tokens_to_ids("cat")]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 99 and model.lm_head.weight.shape[0] == 99
    with torch.no_grad():
        assert model(torch.tensor([[1, 96, 97, 98]])).logits.shape == (1, 4, 99)


def test_a_models_vocabulary_is_matched_by_token_not_by_position(token_family, tmp_path):
    base, x, y = token_family
    recipe = (f"models:\n  - model: {x}\n  - model: {y}\nmerge_method: linear\nparameters: {{weight: 1}}\n"
              f"tokenizer:\n  source: {y}\ndtype: float32\n")
    result = run_cli(write_config(tmp_path, recipe), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged = load_tensors(tmp_path / "out")["model.embed_tokens.weight"]
    ex, ey = (load_tensors(m)["model.embed_tokens.weight"] for m in (x, y))
    assert merged.shape[0] == 98  # y's vocabulary: <think> at 96, <code> at 97
    assert torch.allclose(merged[96], (ex[97] + ey[96]) / 2, atol=1e-6)  # x's <think> is its row 97
    assert torch.allclose(merged[97], ey[97], atol=1e-6)  # x lacks <code>: y's row, the only one


def test_public_deployments_check_both_sides_of_base_plus_adapter(tiny, adapter, monkeypatch):
    from merging.sources import open_model

    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergeError, match="hub is offline"):  # hub ids on both sides: the hub's
        open_model("org/base+org/adapter")
    for reference in (f"org/base+{adapter[0]}", f"{tiny.path('base')}+{adapter[0]}", tiny.path("base")):
        with pytest.raises(MergeError, match="local paths are disabled on a public deployment"):
            open_model(reference)


def test_the_app_merges_adapters_and_gguf_files(server, tiny, adapter, tmp_path):
    """The lab takes the new sources as the command line does: a LoRA adapter and a GGUF
    file, merged live (in the app's process) and answering in the arena."""
    from gradio_client import Client
    from tiny_models import write_gguf

    gguf_path = write_gguf(tiny["c1"], tmp_path / "c1.gguf", "Q8_0")
    recipe = (f"models:\n  - model: {tiny.path('base')}+{adapter[0]}\n  - model: {gguf_path}\n"
              f"merge_method: linear\nparameters: {{weight: 0.5}}\ndtype: float32\n")
    client = Client(server, verbose=False)
    plan = client.predict(recipe, api_name="/check_recipe")
    assert "output: 4 layers, 39 tensors" in plan and "carries its quantization error" in plan
    assert "history #" in client.predict(recipe, api_name="/merge")
