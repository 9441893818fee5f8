"""The CUDA path checked on a GPU: merges equal to the CPU's, and a live re-merge's speed.

    python benchmarks/bench_gpu.py [--shape 8b|1b|tiny] [--device cuda] [--runs 3]

Skips (exit 0, one line) without a CUDA device; `--device cpu --shape tiny` runs the same
steps on the CPU, to check the script itself. Two parts:

1. Equality: a tiny random Llama pair and a second child; slerp, TIES, DARE-TIES and DELLA
   (seeded) merged with `merge(..., device=DEVICE)` and on the CPU; the largest difference
   relative to each tensor's largest value, against float32's tolerance.
2. Speed: a random pair of the given shape (8b: Llama-3-8B's, 16 GB each in bfloat16) as a
   LiveMerge on DEVICE (slerp), every layer's t changed; the update's time against the
   floors for the bytes it must move: the device's memory bandwidth (measured by a copy on
   the device) and, since the sources stay in host memory, the host-to-device bandwidth
   (measured by a pinned copy). Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging import merge  # noqa: E402
from merging.live import LiveMerge  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocabulary
    "tiny": (64, 128, 4, 4, 2, 256),
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}


def write_model(folder: Path, shape: tuple, seed: int, base_seed=None) -> Path:
    """A random Llama of `shape` (bfloat16, one file per layer); with `base_seed`, that
    base plus a random task vector."""
    from safetensors.torch import save_file

    hidden, intermediate, layers, heads, kv_heads, vocab = shape
    head = hidden // heads
    folder.mkdir(parents=True)

    def make(name, size, layer_seed):
        generator = torch.Generator().manual_seed(layer_seed)
        values = 0.02 * torch.randn(size, generator=generator)
        if base_seed is not None:
            values = make_base(name, size, layer_seed - seed + base_seed) + 0.002 * torch.randn(size, generator=generator)
        return values

    def make_base(name, size, layer_seed):
        return 0.02 * torch.randn(size, generator=torch.Generator().manual_seed(layer_seed))

    weight_map = {}
    groups = {"model-embed.safetensors": {"model.embed_tokens.weight": (vocab, hidden),
                                          "model.norm.weight": (hidden,)}}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        groups[f"model-{layer:03d}.safetensors"] = {
            prefix + "input_layernorm.weight": (hidden,), prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads * head, hidden),
            prefix + "self_attn.k_proj.weight": (kv_heads * head, hidden),
            prefix + "self_attn.v_proj.weight": (kv_heads * head, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head),
            prefix + "mlp.gate_proj.weight": (intermediate, hidden), prefix + "mlp.up_proj.weight": (intermediate, hidden),
            prefix + "mlp.down_proj.weight": (hidden, intermediate)}
    for index, (file, tensors) in enumerate(groups.items()):
        made = {}
        for offset, (name, size) in enumerate(tensors.items()):
            values = make(name, size, seed * 100_003 + index * 101 + offset)
            made[name] = (1 + values if len(size) == 1 else values).bfloat16()
        save_file(made, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in made})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "max_position_embeddings": 4096}))
    return folder


def equality(device: str, work: Path) -> list[str]:
    base = write_model(work / "eq-base", SHAPES["tiny"], 1)
    child = write_model(work / "eq-child", SHAPES["tiny"], 2, base_seed=1)
    child2 = write_model(work / "eq-child2", SHAPES["tiny"], 3, base_seed=1)
    rows = []
    for method, extra in (("slerp", "parameters:\n  t: 0.4\n"), ("ties", ""), ("dare_ties", ""), ("della", "")):
        if method == "slerp":
            models = f"  - model: {base}\n  - model: {child}\n"
        else:
            epsilon = ", epsilon: 0.1" if method == "della" else ""
            models = (f"  - model: {child}\n    parameters: {{weight: 0.6, density: 0.5{epsilon}}}\n"
                      f"  - model: {child2}\n    parameters: {{weight: 0.4, density: 0.5{epsilon}}}\n")
        recipe = f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}{extra}dtype: float32\n"
        from safetensors.torch import load_file

        outputs = {}
        for label, where in (("reference", "cpu"), ("measured", device)):
            folder = work / f"eq-{method}-{label}"
            merge(recipe, folder, device=where, seed=7)
            outputs[label] = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        reference, measured = outputs["reference"], outputs["measured"]
        worst = max(float((reference[k] - measured[k]).abs().max() / reference[k].abs().max().clamp(min=1e-30))
                    for k in reference)
        rows.append(f"| {method} | {worst:.2e} | {'yes' if worst < 1e-5 else 'NO'} |")
    return rows


def bandwidths(device: str) -> tuple[float, float]:
    """(device copy, host-to-device copy) in bytes per second (read + write for the first)."""
    size = 1 << 28  # 1 GiB of float32
    source = torch.ones(size, device=device)
    target = torch.empty_like(source)

    def timed(function) -> float:
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / 5

    on_device = 2 * size * 4 / timed(lambda: target.copy_(source))
    host = torch.ones(size).pin_memory() if device.startswith("cuda") else torch.ones(size)
    to_device = size * 4 / timed(lambda: target.copy_(host, non_blocking=False))
    return on_device, to_device


def speed(device: str, shape_name: str, runs: int, work: Path) -> list[str]:
    shape = SHAPES[shape_name]
    base = write_model(work / "speed-base", shape, 11)
    child = write_model(work / "speed-child", shape, 12, base_seed=11)
    layers = shape[2]

    def recipe(t: float) -> str:
        return (f"slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, {layers}]\n"
                f"      - model: {child}\n        layer_range: [0, {layers}]\nmerge_method: slerp\n"
                f"base_model: {base}\nparameters:\n  t: {t}\ndtype: bfloat16\n")

    started = time.perf_counter()
    live = LiveMerge(recipe(0.3), device=device)
    build = time.perf_counter() - started
    seconds = []
    for run in range(runs):
        began = time.perf_counter()
        live.update(recipe(0.4 + 0.01 * run))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    update = statistics.median(seconds)
    on_device, to_device = bandwidths(device)
    model_bytes = sum(p.numel() * p.element_size() for p in live.model.parameters())
    source_bytes = 2 * model_bytes
    device_floor = (source_bytes + model_bytes) / on_device
    transfer_floor = source_bytes / to_device
    return [f"| {shape_name} pair, every tensor's t | {update:.2f} s | {device_floor:.3f} s "
            f"({update / device_floor:.1f}x) | {transfer_floor:.2f} s ({update / transfer_floor:.1f}x) | "
            f"{build:.1f} s |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run with --device cpu --shape tiny to check the script)")
        return
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    with tempfile.TemporaryDirectory(prefix="mergelab-gpu-") as work:
        print(f"{name}, torch {torch.__version__}\n")
        print("| method | largest difference from the CPU (relative) | within float32 tolerance |")
        print("|---|---|---|")
        print("\n".join(equality(args.device, Path(work))))
        print()
        print("| live update | seconds (median) | device-memory floor | host-to-device floor | first build |")
        print("|---|---|---|---|---|")
        print("\n".join(speed(args.device, args.shape, args.runs, Path(work))))


if __name__ == "__main__":
    main()
