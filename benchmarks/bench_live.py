"""How fast a LiveMerge follows a slider: full and one-layer updates on SmolLM2-135M.

    python benchmarks/bench_live.py [--runs 7] [--cache DIR] [--skip-mergekit]

Builds the SmolLM2-135M pair (smollm2.py), opens a LiveMerge with the seed recipe's
gradient SLERP written out as one t per layer (30 values each for self_attn, mlp and the
rest), then times, as medians over `--runs`:
- a full update: every layer's t changes, so every tensor is recomputed;
- a one-layer update: one layer's three values change (its 9 tensors);
beside the memory-bandwidth floor for the bytes those updates must touch (inputs read
once, outputs written once; the bandwidth measured here by copying a 512 MiB tensor), and
beside what the same change costs with mergekit: `mergekit-yaml` plus loading its output
with transformers. Also reports the session's resident memory, and both updates again with
1 and 2 threads, with and without another process keeping a core busy. Prints Markdown.
(TIES and the other sparse methods: bench_sparse.py.)
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from merging.live import LiveMerge  # noqa: E402
from merging.parameters import gradient_value  # noqa: E402

LAYERS = 30
SEED_T = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], None: [0.5]}


def recipe(base: str, child: str, values: dict) -> str:
    def flow(numbers):
        return "[" + ", ".join(f"{v:.6g}" for v in numbers) + "]"
    return (f"slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, {LAYERS}]\n"
            f"      - model: {child}\n        layer_range: [0, {LAYERS}]\nmerge_method: slerp\n"
            f"base_model: {base}\nparameters:\n  t:\n"
            f"    - filter: self_attn\n      value: {flow(values['self_attn'])}\n"
            f"    - filter: mlp\n      value: {flow(values['mlp'])}\n"
            f"    - value: {flow(values[None])}\ndtype: bfloat16\n")


def per_layer(gradient: list) -> list[float]:
    return [gradient_value(gradient, j / (LAYERS - 1)) for j in range(LAYERS)]


def median_seconds(function, runs: int) -> float:
    times = []
    for run in range(runs):
        started = time.perf_counter()
        function(run)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second moved (read + written) by a large tensor copy."""
    source = torch.ones(128 * 2**20)  # 512 MiB of float32
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = median_seconds(lambda run: target.copy_(source), 7)
    return 2 * source.numel() * 4 / seconds


def touched_bytes(live: LiveMerge, names: set) -> int:
    """Inputs read once and outputs written once, for the tensors in `names`."""
    total = 0
    for task in live.plan.tasks:
        if task.name in names:
            total += sum(live.plan.checkpoints[m].tensors[n].nbytes for m, n in task.inputs)
            total += live.model.state_dict()[task.name].numel() * live.model.state_dict()[task.name].element_size()
    return total


def resident() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def mergekit_and_load(config: Path, work: Path) -> float:
    from transformers import AutoModelForCausalLM

    out = work / "mergekit-out"
    started = time.perf_counter()
    subprocess.run(["mergekit-yaml", str(config), str(out), "--device", "cpu"], check=True,
                   capture_output=True)
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return seconds


def busy_core():
    """Another process keeping one core busy (a shared machine, a Space's neighbours)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mergelab" / "bench")
    parser.add_argument("--skip-mergekit", action="store_true")
    args = parser.parse_args()

    import smollm2
    base = smollm2.build_base(args.cache)
    child = smollm2.build_child(base, args.cache, seed=1)
    values = {key: per_layer(gradient) for key, gradient in SEED_T.items()}

    started = time.perf_counter()
    live = LiveMerge(recipe(str(base), str(child), values), device="cpu")
    build_seconds = time.perf_counter() - started
    memory = resident()
    model_bytes = sum(p.numel() * p.element_size() for p in live.model.parameters())
    source_bytes = sum(info.nbytes for ckpt in live.checkpoints.values() for info in ckpt.tensors.values())

    def full(run):
        scale = 0.9 + 0.01 * (run % 5)
        changed = {key: [min(1.0, v * scale + 0.001 * (run + 1)) for v in vals] for key, vals in values.items()}
        stats = live.update(recipe(str(base), str(child), changed))
        assert stats.recomputed == len(live.plan.tasks), stats

    current = {key: list(vals) for key, vals in values.items()}

    edits = itertools.count()

    def one_layer(run):
        edit = next(edits)  # never a value a layer had before
        # layers 1-8: a 30-value list read as a gradient puts layer 15 at 15/29 * 29 = 14.999...,
        # so an edit of layer 16 also moves layer 15 by a rounding error (as in mergekit)
        layer = 1 + edit % 8
        for key in current:
            current[key][layer] = (0.123 + 0.001 * edit) % 1
        stats = live.update(recipe(str(base), str(child), current))
        assert stats.recomputed == 9, stats  # q, k, v, o, gate, up, down and 2 norms

    full(0)
    live.update(recipe(str(base), str(child), current))
    one_layer(100)  # warm-up, on values the timed runs do not repeat
    one_seconds = median_seconds(one_layer, args.runs)
    full_seconds = median_seconds(full, args.runs)
    bandwidth = copy_bandwidth()
    all_names = {t.name for t in live.plan.tasks}
    layer_names = {t.name for t in live.plan.tasks if t.layer == 5}
    full_floor = touched_bytes(live, all_names) / bandwidth
    one_floor = touched_bytes(live, layer_names) / bandwidth
    after = resident()

    mergekit_seconds = None
    if not args.skip_mergekit:
        work = Path(tempfile.mkdtemp(prefix="mergelab-live-bench-"))
        try:
            config = work / "config.yml"
            config.write_text(recipe(str(base), str(child), values))
            mergekit_seconds = statistics.median(mergekit_and_load(config, work) for _ in range(3))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    mib = 2**20
    print(f"SmolLM2-135M pair, gradient SLERP with one t per layer, bfloat16 model, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, medians of {args.runs} runs")
    print()
    print("| change | LiveMerge.update | bandwidth floor | update / floor | mergekit-yaml + load |")
    print("|---|---|---|---|---|")
    mk = f"{mergekit_seconds:.2f} s" if mergekit_seconds else "not run"
    print(f"| every layer's t (272 tensors) | {full_seconds * 1000:.0f} ms | {full_floor * 1000:.0f} ms | "
          f"{full_seconds / full_floor:.1f}x | {mk} |")
    print(f"| one layer's t (9 tensors) | {one_seconds * 1000:.1f} ms | {one_floor * 1000:.2f} ms | "
          f"{one_seconds / one_floor:.1f}x | {mk} |")
    print()
    print(f"copy bandwidth measured in this run: {bandwidth / 1e9:.1f} GB/s (read + write); "
          f"first build: {build_seconds:.2f} s")
    print()
    print("| resident memory of the session | MiB |")
    print("|---|---|")
    print(f"| sources, mapped (file size) | {source_bytes / mib:.0f} |")
    print(f"| merged model (bfloat16) | {model_bytes / mib:.0f} |")
    print(f"| caches, as LiveMerge reports them | {live.cache_bytes / mib:.3f} |")
    print(f"| RSS after build: anonymous / file-backed | {memory['RssAnon'] / mib:.0f} / "
          f"{memory['RssFile'] / mib:.0f} |")
    print(f"| RSS after the updates: anonymous / file-backed | {after['RssAnon'] / mib:.0f} / "
          f"{after['RssFile'] / mib:.0f} |")
    print()
    print()
    print("| threads | another process busy | every layer's t | one layer's t |")
    print("|---|---|---|---|")
    threads = torch.get_num_threads()
    for count, busy in ((1, False), (2, False), (1, True), (2, True)):
        torch.set_num_threads(count)
        neighbour = busy_core() if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            every = median_seconds(full, args.runs)
            live.update(recipe(str(base), str(child), current))  # back to the values one_layer edits
            seconds = every, median_seconds(one_layer, args.runs)
        finally:
            if neighbour is not None:
                neighbour.kill()
        print(f"| {count} | {'yes' if busy else 'no'} | {seconds[0] * 1000:.0f} ms | {seconds[1] * 1000:.1f} ms |")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
