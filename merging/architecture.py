"""Architecture facts read from tensor names and config.json, for decoder-only models.

Transformers' causal LMs (Llama, Mistral, Qwen2, Gemma, Phi-3, ...) keep their blocks
under `<prefix>layers.<i>.`; everything else is outside the layer stack: embeddings
before it, the final norm and lm_head after it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
MODULE_TYPES = (  # substring -> short module kind; the first match wins
    ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
    ("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"),
    ("embed_tokens", "embed"), ("lm_head", "lm_head"), ("norm", "norm"),
)
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim")


@lru_cache(maxsize=None)  # names repeat across every plan of a live session
def split_layer_name(name: str) -> Optional[tuple[str, int, str]]:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.', 3, 'mlp.up_proj.weight')."""
    match = LAYER_NAME.match(name)
    if match is None:
        return None
    return match["prefix"], int(match["index"]), match["rest"]


def layer_tensor_name(prefix: str, index: int, rest: str) -> str:
    return f"{prefix}{index}.{rest}"


def layer_count(checkpoint) -> int:
    for key in LAYER_COUNT_KEYS:
        value = checkpoint.config.get(key)
        if isinstance(value, int):
            return value
    indices = [parts[1] for n in checkpoint.tensors if (parts := split_layer_name(n))]
    return max(indices) + 1 if indices else 0


def is_vocabulary_tensor(name: str) -> bool:
    """Tensors with one row per token: input embeddings and the output head."""
    return "embed_tokens" in name or name.startswith("lm_head") or name.endswith("wte.weight")


def is_before_layers(name: str) -> bool:
    """Non-layer tensors that come before the stack (embeddings); the rest come after."""
    return "embed" in name or name.endswith("wte.weight") or name.endswith("wpe.weight")


def tied_alternative(name: str, names) -> Optional[str]:
    """For a missing lm_head in a model with tied embeddings: the embedding it reuses."""
    if not name.startswith("lm_head"):
        return None
    return next((n for n in names if "embed_tokens" in n and n.endswith(".weight")), None)


def module_type(name: str) -> str:
    """q, k, v, o, gate, up, down, norm, embed, lm_head, or other."""
    for needle, kind in MODULE_TYPES:
        if needle in name:
            return kind
    return "other"


def vocabulary_size(checkpoint) -> Optional[int]:
    for name, info in checkpoint.tensors.items():
        if "embed_tokens" in name and info.shape:
            return info.shape[0]
    return checkpoint.config.get("vocab_size")
