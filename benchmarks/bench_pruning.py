"""TIES pruning by selection against pruning by sorting, side by side in one run.

    python benchmarks/bench_pruning.py [--runs 3] [--threads 1]

On the demo family (SmolLM2-135M: the JSON and the reverse child over their base, built in
the MergeLab cache on first use), a LiveMerge of TIES with both children (density 0.5,
bfloat16): the first build, an update after a weight change (pruned task vectors from the
cache) and after a density change (pruning again), once with TIES's cut found by selection
(merging.methods.sparsify.rank_window, what MergeLab does) and once by a full argsort (what
it did before, and what mergekit does). Also checks that both keep the same entries wherever
no two magnitudes tie at the cut. Prints Markdown; ratios are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging.live import LiveMerge  # noqa: E402
from merging.methods import sparsify  # noqa: E402


def magnitude_by_sorting(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """The reference: top k by |d| from a full descending argsort."""
    if density >= 1:
        return task_vector
    if density <= 0 or task_vector.numel() == 0:
        return torch.zeros_like(task_vector)
    k = max(1, int(density * task_vector.numel()))
    order = torch.argsort(task_vector.abs().reshape(-1), descending=True)
    mask = torch.zeros(task_vector.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return task_vector * mask.reshape(task_vector.shape)


@contextmanager
def pruning(kind: str):
    selected = sparsify.magnitude
    if kind == "sorting":
        sparsify.magnitude = magnitude_by_sorting
    try:
        yield
    finally:
        sparsify.magnitude = selected


def recipe(family: dict, weight: float, density: float) -> str:
    return (f"models:\n  - model: {family['json']}\n    parameters: {{weight: {weight}, density: {density}}}\n"
            f"  - model: {family['reverse']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"merge_method: ties\nbase_model: {family['base']}\ndtype: bfloat16\n")


def live_times(family: dict, runs: int) -> dict:
    started = time.perf_counter()
    live = LiveMerge(recipe(family, 0.5, 0.5), device="cpu", cache_budget_bytes=4 << 30)
    build = time.perf_counter() - started

    def median(change) -> float:
        seconds = []
        for run in range(runs):
            began = time.perf_counter()
            live.update(change(run))
            seconds.append(time.perf_counter() - began)
        return statistics.median(seconds)

    weight = median(lambda run: recipe(family, 0.3 + 0.05 * (run % 7), 0.5))
    density = median(lambda run: recipe(family, 0.5, 0.3 + 0.05 * (run % 7)))
    return {"build": build, "weight": weight, "density": density, "model": live.model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from merging.demo import build_family

    family = {name: str(path) for name, path in build_family().items()}
    results = {}
    for kind in ("sorting", "selection"):
        with pruning(kind):
            results[kind] = live_times(family, args.runs)
    differing = sum(int((a != b).sum()) for a, b in zip(results["sorting"]["model"].state_dict().values(),
                                                        results["selection"]["model"].state_dict().values()))
    print(f"TIES live on the demo pair (SmolLM2-135M, two children, bfloat16), {args.threads} thread(s), "
          f"medians of {args.runs}\n")
    print("| | pruning by sorting (before; mergekit) | by selection (now) | ratio |")
    print("|---|---|---|---|")
    for key, label in (("build", "first build"), ("weight", "update after a weight change"),
                       ("density", "update after a density change")):
        before, now = results["sorting"][key], results["selection"][key]
        print(f"| {label} | {before:.2f} s | {now:.2f} s | {now / before:.2f} |")
    print(f"\nAfter the same updates the two live models differ in {differing} entries (equal magnitudes at "
          "a cut: argsort keeps an unspecified one of them, selection the lower index).")


if __name__ == "__main__":
    main()
