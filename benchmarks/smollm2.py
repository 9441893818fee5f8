"""SmolLM2-135M-Instruct (the demo family's base, see merging/demo.py) and children with
random low-rank task vectors, for benchmarks. Folders are cached under `cache_dir`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from merging import demo  # noqa: E402


def build_base(cache_dir: Path) -> Path:
    """The base model, dequantized from the GGUF file: the demo family's base."""
    return demo.build_base(cache_dir)


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
    children = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    base = build_base(cache)
    print(base)
    for seed in range(1, children + 1):
        print(build_child(base, cache, seed=seed))
