"""What placing a live model off its device costs: the demo pair whole in memory, and in
160 MB of CPU memory with the rest of its layers offloaded to disk (accelerate), in one run.

    python benchmarks/bench_placement.py [--runs 3] [--tokens 16] [--memory cpu=160MB]

On the demo family (SmolLM2-135M, the JSON and the reverse child, built in the MergeLab cache
on first use), a float32 slerp LiveMerge each way: the first build, an update after a change
of t (every tensor re-merged: into memory, or into the mapped offload files), and greedy
tokens per second for a chat prompt (an offloaded layer's weights are read from its file for
every forward pass). Checks that both answer the same. Prints Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging.generation import Sampling  # noqa: E402
from merging.live import LiveMerge  # noqa: E402

PROMPT = "Reverse the words: red lamp quiet"


def recipe(family: dict, t: float) -> str:
    return (f"models:\n  - model: {family['reverse']}\nmerge_method: slerp\nbase_model: {family['json']}\n"
            f"parameters:\n  t: {t}\ndtype: float32\n")


def measure(family: dict, runs: int, tokens: int, **placement) -> dict:
    started = time.perf_counter()
    live = LiveMerge(recipe(family, 0.3), device="cpu", **placement)
    build = time.perf_counter() - started
    updates = []
    for run in range(runs):
        started = time.perf_counter()
        live.update(recipe(family, 0.4 + 0.1 * run))
        updates.append(time.perf_counter() - started)
    sampling = Sampling(max_new_tokens=tokens)
    generations = [live.generate(PROMPT, sampling) for _ in range(runs)]
    return {"build": build, "update": statistics.median(updates),
            "tokens_per_second": statistics.median(g.tokens_per_second for g in generations),
            "answer": generations[-1].text, "where": str(live.placed) if live.placed else "all on cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--memory", default="cpu=160MB", help="max_memory for the placed model")
    args = parser.parse_args()
    from merging.demo import build_family

    family = {name: str(path) for name, path in build_family().items()}
    LiveMerge(recipe(family, 0.3), device="cpu")  # a running server has its imports done: so does this process
    whole = measure(family, args.runs, args.tokens)
    with tempfile.TemporaryDirectory(prefix="mergelab-offload-") as folder:
        placed = measure(family, args.runs, args.tokens, max_memory=args.memory, offload_folder=folder)
    assert placed["answer"] == whole["answer"], (placed["answer"], whole["answer"])
    print(f"Demo pair (SmolLM2-135M) slerp, float32, medians of {args.runs}; the same answers both ways\n")
    print("| placement | where the blocks went | first build | update (every tensor) | tokens/s |")
    print("|---|---|---|---|---|")
    for label, row in (("whole, in memory", whole), (f"max_memory {args.memory}", placed)):
        print(f"| {label} | {row['where']} | {row['build']:.2f} s | {row['update']:.2f} s | "
              f"{row['tokens_per_second']:.1f} |")


if __name__ == "__main__":
    main()
