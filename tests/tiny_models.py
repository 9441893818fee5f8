"""Tiny Llama models for tests: a base and children that are the base plus a task vector.

Seeded, so every test run sees the same numbers. Each model is a real transformers
folder (config.json, safetensors, tokenizer) that AutoModelForCausalLM loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

VOCAB = 96
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "merge", "model", "layer"]


def tiny_tokenizer(vocab_size: int = VOCAB, extra_tokens: Optional[list[str]] = None):
    """A word-level fast tokenizer with exactly `vocab_size` entries and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocabulary = specials + WORDS + (extra_tokens or [])
    vocabulary += [f"w{i}" for i in range(vocab_size - len(vocabulary))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return tokenizer


def make_base(folder: Path, *, hidden: int = 32, layers: int = 4, vocab: int = VOCAB, seed: int = 0,
              tied: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A randomly initialised tiny Llama saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         tie_word_embeddings=tied, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tiny_tokenizer(vocab).save_pretrained(folder)
    return Path(folder)


def make_child(base: Path, folder: Path, *, seed: int, scale: float = 0.02, rank: Optional[int] = None,
               max_shard_size: Optional[str] = None, extra_rows: int = 0) -> Path:
    """The base plus a seeded task vector (low-rank when `rank` is given)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if rank is not None and parameter.dim() == 2:
                left = torch.randn(parameter.shape[0], rank, generator=generator)
                right = torch.randn(rank, parameter.shape[1], generator=generator)
                delta = (left @ right) / rank**0.5
            else:
                delta = torch.randn(parameter.shape, generator=generator)
            parameter.add_((scale * delta).to(parameter.dtype))
        if extra_rows:
            model.resize_token_embeddings(model.config.vocab_size + extra_rows)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def make_trained(base: Path, folder: Path, texts: list[str], steps: int = 30, seed: int = 0,
                 learning_rate: float = 1e-3) -> Path:
    """The base fine-tuned (all weights, Adam) on `texts` until it knows them: a model with
    a domain of its own, for tests where perplexity must move the way theory says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def write_gguf(model_folder: Path, path: Path, quantization: str = "F32") -> Path:
    """A tiny Llama folder written as a GGUF file with the gguf package's writer, as
    llama.cpp's converter lays it out (GGUF names, q/k rows permuted for its rotary
    layout); every matrix stored as `quantization` (F32, F16 or Q8_0), vectors as F32."""
    import json

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    config = json.loads((Path(model_folder) / "config.json").read_text())
    layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config["vocab_size"])])
    writer.add_token_types([1] * config["vocab_size"])
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    def permute(weights, n_head):
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    for name, tensor in load_file(Path(model_folder) / "model.safetensors").items():
        data = tensor.float().numpy()
        if "q_proj" in name:
            data = permute(data, heads)
        elif "k_proj" in name:
            data = permute(data, kv_heads)
        gguf_name = names.get_name(name.removesuffix(".weight")) + ".weight"
        if data.ndim == 1 or quantization == "F32":
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif quantization == "F16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType[quantization]
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
