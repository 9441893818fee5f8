"""Side by side: building a mixture of experts with our CLI and with mergekit-moe.

    python benchmarks/bench_moe.py [--runs 3] [--cache DIR] [--gate-mode hidden]

Four SmolLM2-135M experts (the base and three low-rank children, see smollm2.py) with
two prompts each, the base's attention: `python -m merging` and `mergekit-moe` run
alternately on the same config, `--runs` times each after one warm-up each, as whole
processes (wall time, peak RSS from wait4). Prints a Markdown table of medians and
ratios, and how far apart the outputs are (mergekit writes the fused transformers-5
expert layout; it is split back into per-expert tensors to compare).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_merge import REPO, ratio_table, run_alternately  # no torch here: see bench_merge.py

PROMPTS = [
    ["Write a Python function that sorts a list", "Fix this bug in my JavaScript code"],
    ["Tell me a story about a dragon", "Write a poem about the sea"],
    ["What is 17 times 23?", "Solve for x: 3x + 5 = 20"],
    ["Translate 'good morning' into French", "How do you say thank you in Japanese?"],
]


def config_text(base: str, experts: list[str], gate_mode: str) -> str:
    import json  # a JSON document is YAML, and no yaml import is needed here

    return json.dumps({"base_model": base, "gate_mode": gate_mode, "dtype": "bfloat16", "experts_per_token": 2,
                       "experts": [{"source_model": model, "positive_prompts": prompts}
                                   for model, prompts in zip(experts, PROMPTS)]}, indent=2)


def compare_outputs(ours: Path, theirs: Path) -> str:
    import torch
    from safetensors.torch import load_file

    a = {k: v for f in ours.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in theirs.glob("*.safetensors") for k, v in load_file(f).items()}
    copied = identical = 0
    router_cosine = 1.0
    for name, tensor in b.items():
        prefix, _, rest = name.partition(".mlp.")
        if rest == "gate.weight":
            ours_router = a[f"{prefix}.block_sparse_moe.gate.weight"].float()
            cosine = torch.nn.functional.cosine_similarity(ours_router, tensor.float(), dim=-1).min().item()
            router_cosine = min(router_cosine, cosine)
            continue
        if rest in ("experts.gate_up_proj", "experts.down_proj"):
            for expert, fused in enumerate(tensor):
                if rest == "experts.down_proj":
                    mine = a[f"{prefix}.block_sparse_moe.experts.{expert}.w2.weight"]
                else:
                    mine = torch.cat([a[f"{prefix}.block_sparse_moe.experts.{expert}.w1.weight"],
                                      a[f"{prefix}.block_sparse_moe.experts.{expert}.w3.weight"]])
                copied += 1
                identical += int(torch.equal(mine, fused))
        else:
            copied += 1
            identical += int(torch.equal(a[name], tensor))
    return (f"{identical} of {copied} copied tensors bitwise identical; routers: smallest cosine between "
            f"our router rows and mergekit's {router_cosine:.6f} (mergekit runs the prompts in bfloat16, "
            "we in float32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mergelab" / "bench")
    parser.add_argument("--gate-mode", default="hidden", choices=["hidden", "cheap_embed", "random"])
    args = parser.parse_args()

    built = subprocess.run([sys.executable, str(Path(__file__).parent / "smollm2.py"), str(args.cache), "3"],
                           check=True, capture_output=True, text=True)
    base, *children = built.stdout.split()
    work = Path(tempfile.mkdtemp(prefix="mergelab-bench-moe-"))
    config = work / "moe.yml"
    config.write_text(config_text(base, [base, *children], args.gate_mode))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    commands = {
        "mergelab": lambda out: [sys.executable, "-m", "merging", str(config), str(out)],
        "mergekit": lambda out: ["mergekit-moe", str(config), str(out), "--device", "cpu"],
    }
    try:
        results = run_alternately(commands, args.runs, work, env)
        comparison = compare_outputs(work / f"mergelab-{args.runs}", work / f"mergekit-{args.runs}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from importlib.metadata import version
    print(f"MoE: 4 SmolLM2-135M experts, 2 per token, gate_mode {args.gate_mode}, bfloat16; {args.runs} runs "
          f"each, {os.cpu_count()} CPU cores, torch {version('torch')}, mergekit {version('mergekit')}")
    print()
    print(ratio_table(results, "`mergekit-moe`"))
    print()
    print(f"outputs: {comparison}")


if __name__ == "__main__":
    main()
