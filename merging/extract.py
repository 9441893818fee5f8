"""LoRA extraction from a fine-tune: for every linear weight of the decoder layers,
delta = W_model - W_base ~ U_r S_r V_r^T (truncated SVD), saved as B = U_r S_r,
A = V_r^T with lora_alpha = r (s = 1), in the PEFT layout that peft loads (and that
merging.sources.lora reads back as a model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import MergeError
from .sources import Checkpoint, open_model
from .sources.lora import ADAPTER_CONFIG, PEFT_PREFIX
from .writer import atomic_folder


def linear_weights(checkpoint: Checkpoint) -> list[str]:
    """The 2-D `*_proj.weight` tensors of the decoder layers (attention and MLP linears)."""
    layout = checkpoint.layout
    return [n for n, info in checkpoint.tensors.items()
            if len(info.shape) == 2 and layout.split(n) and n.endswith("_proj.weight")]


def extract_lora(model: str, base: str, out_dir, rank: int, progress: Optional[Callable[[int, int], None]] = None
                 ) -> dict:
    """Write a rank-`rank` LoRA adapter that turns `base` into (approximately) `model`.
    Returns a report: modules adapted, the share of the delta's energy (squared Frobenius
    norm) the rank keeps, and tensors that differ but are not linear weights."""
    from safetensors.torch import save_file

    if rank < 1:
        raise MergeError(f"--rank must be at least 1, got {rank}")
    tuned, original = open_model(model), open_model(base)
    names = linear_weights(original)
    if not names:
        raise MergeError(f"base '{base}' has no linear layer weights (*_proj.weight) to adapt")
    for name in names:
        if name not in tuned.tensors or tuned.tensors[name].shape != original.tensors[name].shape:
            raise MergeError(f"model '{model}' has no tensor '{name}' of the base's shape "
                             f"{original.tensors[name].shape}: it is not a fine-tune of this base")
    tensors, kept, total, modules = {}, 0.0, 0.0, set()
    for index, name in enumerate(names, 1):
        delta = tuned.read(name).float() - original.read(name).float()
        energy = float(delta.pow(2).sum())
        if energy > 0:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, s.numel())
            module = name.removesuffix(".weight")
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = vh[:r].contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (u[:, :r] * s[:r]).contiguous()
            kept += float(s[:r].pow(2).sum())
            total += energy
            modules.add(module.rsplit(".", 1)[-1])
        tuned.release(name)
        original.release(name)
        if progress:
            progress(index, len(names))
    others = sorted(n for n in original.tensors if n not in set(names) and n in tuned.tensors
                    and tuned.tensors[n].shape == original.tensors[n].shape
                    and not torch.equal(tuned.read(n), original.read(n)))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "target_modules": sorted(modules), "base_model_name_or_path": base}
    with atomic_folder(Path(out_dir)) as temporary:
        save_file(tensors, temporary / "adapter_model.safetensors", metadata={"format": "pt"})
        (temporary / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {"modules": len(tensors) // 2, "energy_kept": kept / total if total else 1.0, "not_extracted": others}
