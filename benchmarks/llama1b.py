"""Random Llama-3.2-1B-shaped checkpoints (1.24B parameters, bfloat16, sharded) for benchmarks
at a realistic size: a base and children (base plus a dense random task vector), seeded, in
`cache_dir`. No tokenizer: the merges measured here are the tensors.

    python benchmarks/llama1b.py [CACHE_DIR] [CHILDREN]    # prints the folders
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 8192, 16, 32, 8, 128256
SHARD_BYTES = 1 << 30

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS, "vocab_size": VOCAB,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001,
}


def shapes() -> dict[str, tuple]:
    """Every tensor of the model, in file order."""
    head = HIDDEN // HEADS
    found = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        found.update({
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "self_attn.q_proj.weight": (HEADS * head, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * head),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
            prefix + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    found["model.norm.weight"] = (HIDDEN,)
    return found


def tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """The base's tensor `name`: norms near 1, matrices N(0, 0.02^2); its own seed."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 131 + len(name))
    if len(shape) == 1:
        return (1 + 0.05 * torch.randn(shape, generator=generator)).bfloat16()
    return (0.02 * torch.randn(shape, generator=generator)).bfloat16()


def write(folder: Path, make) -> Path:
    """Write the model whose tensor `name` is make(name, shape), in about 1 GiB shards."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    shards, shard, size = [], {}, 0
    for name, shape in shapes().items():
        shard[name] = make(name, shape)
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    weight_map = {}
    for index, tensors in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, partial / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (partial / "config.json").write_text(json.dumps(CONFIG, indent=1))
    partial.rename(folder)
    return folder


def build_base(cache_dir: Path, seed: int = 0) -> Path:
    return write(cache_dir / f"llama1b-random-seed{seed}", lambda name, shape: tensor(name, shape, seed))


def build_child(base_seed: int, cache_dir: Path, seed: int, scale: float = 0.1) -> Path:
    """The base plus a dense random task vector of `scale` times the weight's spread."""
    def make(name, shape):
        base = tensor(name, shape, base_seed).float()
        return (base + scale * base.std() * tensor(name, shape, seed).float() / 0.02).bfloat16() \
            if len(shape) == 2 else base.bfloat16()
    return write(cache_dir / f"llama1b-random-seed{base_seed}-child{seed}", make)


if __name__ == "__main__":
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.home() / ".cache" / "mergelab" / "bench"
    children = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    base = build_base(cache)
    print(base)
    for child in range(1, children + 1):
        print(build_child(0, cache, seed=100 + child))
