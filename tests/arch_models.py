"""Tiny, seeded, random models of many architectures: test material for the architecture model.

`ARCHITECTURES` maps a short name to a function giving a tiny config (hidden 32, 4 layers,
4 heads, vocabulary 128, vision towers of 2 blocks); `make_family` saves a base and children
(the base plus seeded small noise) as real Hugging Face folders that `loader_class(name)`
loads; `forward_inputs` gives inputs for one forward pass. Everything is float32 and built
in well under a second per model on a CPU.

Per-layer config lists are set where an architecture has them (layer_types, sliding window
patterns, max_window_layers, mlp_only_layers), so that a merge which changes the depth
(a passthrough with overlapping slices) has something to get wrong.

    from arch_models import ARCHITECTURES, make_family, loader_class, forward_inputs, image_inputs
    family = make_family("gemma3", tmp_path)          # {"base": Path, "child_1": Path, ...}
    model = loader_class("gemma3").from_pretrained(family["base"])
    model(**forward_inputs("gemma3", model.config))
    llava = loader_class("llava").from_pretrained(make_family("llava", tmp_path / "llava")["base"])
    llava(**image_inputs("llava", llava.config))        # multimodal: the vision tower runs too
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from tiny_models import tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

VOCAB = 128
HIDDEN = 32
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
IMAGE_TOKEN = 127  # the last token of the shared vocabulary stands for an image patch
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)  # as tiny_tokenizer numbers them
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, **TOKENS)
# The multimodal architectures, loaded with AutoModelForImageTextToText; the rest are causal LMs.
MULTIMODAL = {"gemma3_multimodal", "qwen2_vl", "llava"}


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**COMMON)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**COMMON, sliding_window=16)


def _qwen2():
    # sliding window from layer 2 on: layer_types = [full, full, sliding, sliding]
    from transformers import Qwen2Config
    return Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=16, max_window_layers=2)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**COMMON, head_dim=HEAD_DIM, use_sliding_window=True, sliding_window=16,
                       max_window_layers=2)


def _gemma():
    from transformers import GemmaConfig
    return GemmaConfig(**COMMON, head_dim=HEAD_DIM)


def _gemma2():
    # layer_types alternate sliding/full (Gemma 2's own default pattern)
    from transformers import Gemma2Config
    return Gemma2Config(**COMMON, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16)


def _gemma3_text_config(**overrides):
    from transformers import Gemma3TextConfig
    settings = dict(COMMON, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16,
                    sliding_window_pattern=2)  # [sliding, full, sliding, full]
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


def _gemma3():
    return _gemma3_text_config()


def _gemma3_sliding():
    # an irregular explicit pattern, so that a layer's type cannot be guessed from its index
    return _gemma3_text_config(layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"])


def _gemma3_multimodal():
    from transformers import Gemma3Config, SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                                num_attention_heads=HEADS, image_size=16, patch_size=4)  # 4x4 patches
    # mm_tokens_per_image 4: the 4x4 patches pooled to 2x2 soft tokens
    return Gemma3Config(text_config=_gemma3_text_config(), vision_config=vision, mm_tokens_per_image=4,
                        boi_token_index=125, eoi_token_index=126, image_token_index=IMAGE_TOKEN, **TOKENS)


def _phi():
    from transformers import PhiConfig
    return PhiConfig(**COMMON, partial_rotary_factor=0.5)


def _phi3():
    from transformers import Phi3Config
    return Phi3Config(**COMMON)


def _phi3_partial_rotary():
    # Phi-4-mini's shape: rotary on part of each head
    from transformers import Phi3Config
    return Phi3Config(**COMMON, partial_rotary_factor=0.5)


def _gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                      n_inner=2 * HIDDEN, **TOKENS)


def _gpt_neox():
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64,
                         rotary_pct=0.25, **TOKENS)


def _falcon():
    # Falcon-7B's layout: multi-query attention, attention and MLP in parallel, tied embeddings
    from transformers import FalconConfig
    return FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        ffn_hidden_size=2 * HIDDEN, max_position_embeddings=64, **TOKENS)


def _stablelm():
    from transformers import StableLmConfig
    return StableLmConfig(**COMMON, partial_rotary_factor=0.25)


def _starcoder2():
    from transformers import Starcoder2Config
    return Starcoder2Config(**COMMON, sliding_window=16)


def _olmo2():
    from transformers import Olmo2Config
    return Olmo2Config(**COMMON)


def _cohere():
    from transformers import CohereConfig
    return CohereConfig(**COMMON)


def _granite():
    from transformers import GraniteConfig
    return GraniteConfig(**COMMON, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
                         logits_scaling=2.0)


def _mixtral():
    from transformers import MixtralConfig
    return MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def _qwen3_moe():
    # layer 0 dense (mlp_only_layers), layers 1-3 sparse
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(**COMMON, head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=HIDDEN, decoder_sparse_step=1, mlp_only_layers=[0])


def _qwen2_moe():
    # routed experts plus a gated shared expert in layers 1 and 3 (decoder_sparse_step 2), dense
    # MLPs in layers 0 and 2; layer_types [sliding, full, sliding, full]
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN,
                          shared_expert_intermediate_size=2 * HIDDEN, decoder_sparse_step=2,
                          use_sliding_window=True, sliding_window=16, max_window_layers=3)


def _qwen2_vl():
    from transformers import Qwen2VLConfig
    text = dict(COMMON, use_sliding_window=False,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    # patch 4, merge 2: the vision stack's `hidden_size` is the width it hands to the language model
    vision = dict(depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=126,
                         vision_start_token_id=124, vision_end_token_id=125, **TOKENS)


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                              num_attention_heads=HEADS, image_size=16, patch_size=4, projection_dim=HIDDEN)
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**COMMON), image_token_index=IMAGE_TOKEN,
                       image_seq_length=16)


ARCHITECTURES: dict[str, Callable[[], "PretrainedConfig"]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gemma3_sliding": _gemma3_sliding,
    "gemma3_multimodal": _gemma3_multimodal,
    "phi": _phi,
    "phi3": _phi3,
    "phi3_partial_rotary": _phi3_partial_rotary,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "falcon": _falcon,
    "stablelm": _stablelm,
    "starcoder2": _starcoder2,
    "olmo2": _olmo2,
    "cohere": _cohere,
    "granite": _granite,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "qwen2_vl": _qwen2_vl,
    "llava": _llava,
}


def loader_class(name: str):
    """The Auto class that loads a saved folder of this architecture."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    _known(name)
    return AutoModelForImageTextToText if name in MULTIMODAL else AutoModelForCausalLM


def make_config(name: str):
    _known(name)
    config = ARCHITECTURES[name]()
    config.dtype = torch.float32
    return config


def build_model(name: str, seed: int = 0, config=None):
    """A freshly initialised float32 model; the global random state is left as it was."""
    config = config if config is not None else make_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = loader_class(name).from_config(config, dtype=torch.float32)
    return model.eval()


def make_family(name: str, folder, n_children: int = 2, seed: int = 0, scale: float = 0.02) -> dict[str, Path]:
    """{'base': folder/base, 'child_1': ..., ...}: the base and children that are the base plus
    seeded noise of `scale` on every parameter (tied weights move together), each saved with
    save_pretrained and a word-level tokenizer of the model's vocabulary."""
    folder = Path(folder)
    model = build_model(name, seed)
    vocab = text_config(model.config).vocab_size
    tokenizer = tiny_tokenizer(vocab)
    family = {"base": folder / "base"}
    model.save_pretrained(family["base"])
    tokenizer.save_pretrained(family["base"])
    originals = [parameter.detach().clone() for parameter in model.parameters()]
    for child in range(1, n_children + 1):
        generator = torch.Generator().manual_seed(seed * 1000 + child)
        with torch.no_grad():
            for parameter, original in zip(model.parameters(), originals):
                noise = torch.randn(original.shape, generator=generator)
                parameter.copy_(original + scale * noise)
        family[f"child_{child}"] = folder / f"child_{child}"
        model.save_pretrained(family[f"child_{child}"])
        tokenizer.save_pretrained(family[f"child_{child}"])
    return family


def text_config(config):
    """The language model's config: `text_config` of a multimodal config, else the config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def forward_inputs(name: str, config) -> dict:
    """Text-only inputs for one forward pass (every multimodal model here accepts them):
    8 ordinary tokens, none of them an image or special token."""
    _known(name)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 120, (1, 8), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _known(name: str) -> None:
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture '{name}'; known: {', '.join(ARCHITECTURES)}")


def image_inputs(name: str, config) -> dict:
    """Inputs with one 16x16 image for a multimodal architecture, so the vision tower runs too:
    3 text tokens, the image's placeholder tokens (IMAGE_TOKEN), 3 text tokens."""
    if name not in MULTIMODAL:
        raise KeyError(f"'{name}' has no vision tower; multimodal: {', '.join(sorted(MULTIMODAL))}")
    generator = torch.Generator().manual_seed(0)
    if name == "qwen2_vl":
        vision = config.vision_config
        grid = 16 // vision.patch_size  # patches per side
        placeholders = grid * grid // vision.spatial_merge_size**2
        patch = 3 * vision.temporal_patch_size * vision.patch_size**2
        input_ids = _around_image(placeholders)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.randn(grid * grid, patch, generator=generator),
                "image_grid_thw": torch.tensor([[1, grid, grid]]),
                "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long()}
    placeholders = config.mm_tokens_per_image if name == "gemma3_multimodal" else config.image_seq_length
    input_ids = _around_image(placeholders)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(1, 3, 16, 16, generator=generator)}


def _around_image(placeholders: int) -> torch.Tensor:
    return torch.tensor([[5, 6, 7] + [IMAGE_TOKEN] * placeholders + [8, 9, 10]])
