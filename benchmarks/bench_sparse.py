"""The task-vector family live: fused kernels against whole-tensor torch, in one run.

    python benchmarks/bench_sparse.py [--runs 3] [--threads 2] [--methods ties,dare_ties]
                                      [--busy] [--skip-reference]

On the demo family (SmolLM2-135M: the JSON and the reverse child over their base, built in
the MergeLab cache on first use), a LiveMerge of each method with both children (density
0.5, bfloat16 model): the first build, an update after a weight change and one after a
density change, and the cache the session holds; once with the fused CPU kernels
(merging/methods/fused.py, what MergeLab runs on a CPU) and once with the whole-tensor
torch reference (what it ran before, and what runs on a GPU). Checks that both give the
same model. `--busy` keeps one core busy with another process meanwhile. Prints Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging.live import LiveMerge  # noqa: E402
from merging.methods import fused  # noqa: E402

METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della")


@contextmanager
def kernels(kind: str):
    """Run the family on the fused kernels, or force the whole-tensor reference."""
    available = fused.available
    if kind == "reference":
        fused.available = lambda tensor: False
    try:
        yield
    finally:
        fused.available = available


def recipe(family: dict, method: str, weight: float, density: float) -> str:
    extra = ", epsilon: 0.1" if method.startswith("della") else ""
    return (f"models:\n  - model: {family['json']}\n    parameters: {{weight: {weight}, density: {density}{extra}}}\n"
            f"  - model: {family['reverse']}\n    parameters: {{weight: 0.5, density: 0.5{extra}}}\n"
            f"merge_method: {method}\nbase_model: {family['base']}\ndtype: bfloat16\n")


def live_times(family: dict, method: str, runs: int) -> dict:
    started = time.perf_counter()
    live = LiveMerge(recipe(family, method, 0.5, 0.5), device="cpu")
    build = time.perf_counter() - started

    def median(change) -> float:
        seconds = []
        for run in range(runs):
            began = time.perf_counter()
            live.update(change(run))
            seconds.append(time.perf_counter() - began)
        return statistics.median(seconds)

    weight = median(lambda run: recipe(family, method, 0.3 + 0.05 * (run % 7), 0.5))
    density = median(lambda run: recipe(family, method, 0.5, 0.3 + 0.05 * (run % 7)))
    return {"build": build, "weight": weight, "density": density, "cache": live.cache_bytes,
            "state": {k: v.clone() for k, v in live.model.state_dict().items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from merging.demo import build_family

    family = {name: str(path) for name, path in build_family().items()}
    # a running server has imported transformers' model code already: so does this process
    LiveMerge(recipe(family, "task_arithmetic", 0.5, 0.5), device="cpu")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        kinds = ("fused",) if args.skip_reference else ("reference", "fused")
        results = {}
        for method in args.methods.split(","):
            for kind in kinds:
                with kernels(kind):
                    results[method, kind] = live_times(family, method, args.runs)
    finally:
        if busy is not None:
            busy.kill()
    load = ", another process keeping one core busy" if args.busy else ""
    print(f"Task-vector methods live on the demo pair (SmolLM2-135M, two children, density 0.5, bfloat16), "
          f"{args.threads} thread(s){load}, medians of {args.runs}\n")
    print("| method | change | whole-tensor torch | fused kernels | ratio |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        fast = results[method, "fused"]
        slow = results.get((method, "reference"))
        for key, label in (("build", "first build"), ("weight", "weight change"), ("density", "density change")):
            before = f"{slow[key]:.2f} s" if slow else "not run"
            ratio = f"{fast[key] / slow[key]:.2f}" if slow else ""
            print(f"| {method} | {label} | {before} | {fast[key]:.2f} s | {ratio} |")
        before = f"{slow['cache'] / 2**20:.0f} MiB" if slow else "not run"
        print(f"| {method} | cache held | {before} | {fast['cache'] / 2**20:.0f} MiB | |")
        if slow:
            differing = sum(int((a != slow["state"][k]).sum()) for k, a in fast["state"].items())
            print(f"| {method} | entries that differ between the two models | | {differing} | |")


if __name__ == "__main__":
    main()
