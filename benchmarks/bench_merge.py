"""Side by side: our CLI and mergekit-yaml on the same config, whole processes.

    python benchmarks/bench_merge.py [--runs 5] [--cache DIR] [--config gradient_slerp]
                                     [--model smollm2|llama1b]

Builds the SmolLM2-135M pair (base and a low-rank child; see smollm2.py), or a random
1.24B Llama-3.2-1B-shaped base and children (llama1b.py), then runs
`python -m merging` and `mergekit-yaml` alternately, `--runs` times each after one
warm-up each, measuring wall time and peak resident memory (the child's max RSS from
wait4). Prints a Markdown table of medians and ratios, and checks the outputs are
equal. Needs mergekit installed (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This process stays small (no torch until the end): a child's peak RSS as reported by
# wait4 starts from its parent's size at fork time.
REPO = Path(__file__).resolve().parent.parent

CONFIGS = {
    # LazyMergekit's seed recipe: per-module gradients over the layers.
    "gradient_slerp": """\
slices:
  - sources:
      - model: {base}
        layer_range: [0, {layers}]
      - model: {child}
        layer_range: [0, {layers}]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
out_dtype: bfloat16
""",
    "ties": """\
models:
  - model: {child}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {child2}
    parameters: {{weight: 0.4, density: 0.5}}
merge_method: ties
base_model: {base}
dtype: float32
out_dtype: bfloat16
""",
}


def run_measured(command: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one whole process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {process.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def run_alternately(commands: dict, runs: int, work: Path, env: dict) -> dict[str, list[tuple[float, int]]]:
    """Each command `runs` times, alternating, after one warm-up round each (which fills
    the page cache and is dropped): (seconds, peak RSS) per run. The last run's output
    folders, work/<name>-<runs>, are kept for comparison."""
    results = {name: [] for name in commands}
    for run in range(runs + 1):
        for name, command in commands.items():
            out = work / f"{name}-{run}"
            elapsed, peak = run_measured(command(out), env)
            if run > 0:
                results[name].append((elapsed, peak))
            if run < runs:
                shutil.rmtree(out)
    return results


def ratio_table(results: dict, mergekit_command: str) -> str:
    """Markdown: medians of MergeLab's and mergekit's runs, and their ratios."""
    def median(name, index):
        return statistics.median(r[index] for r in results[name])

    ours_time, theirs_time = median("mergelab", 0), median("mergekit", 0)
    ours_peak, theirs_peak = median("mergelab", 1), median("mergekit", 1)
    return "\n".join([
        "| tool | wall time (median) | peak RSS (median) |", "|---|---|---|",
        f"| MergeLab `python -m merging` | {ours_time:.2f} s | {ours_peak / 2**20:.0f} MiB |",
        f"| mergekit 0.1.5 {mergekit_command} | {theirs_time:.2f} s | {theirs_peak / 2**20:.0f} MiB |",
        f"| ratio (MergeLab / mergekit) | {ours_time / theirs_time:.2f} | {ours_peak / theirs_peak:.2f} |"])


def compare_outputs(ours: Path, theirs: Path) -> str:
    """How far apart the two outputs are: identical entries, and the largest difference in
    units of one rounding step of the storage dtype at the tensor's largest value."""
    import torch
    from safetensors.torch import load_file

    a = {k: v for f in ours.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in theirs.glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    total = differing = 0
    worst_steps = 0.0
    for name, expected in b.items():
        actual = a[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        total += expected.numel()
        differing += int((actual != expected).sum())
        step = torch.finfo(expected.dtype).eps * expected.float().abs().max().clamp(min=1e-30)
        worst_steps = max(worst_steps, float((actual.float() - expected.float()).abs().max() / step))
    dtype = str(next(iter(b.values())).dtype).replace("torch.", "")
    return (f"{total - differing:,} of {total:,} entries bitwise identical; the other {differing:,} "
            f"({differing / total:.2%}) differ by at most {worst_steps:.2f} {dtype} rounding steps "
            "at their tensor's largest value")


def floors(inputs: list[Path], output_bytes: int, work: Path, env: dict) -> dict:
    """What the merge cannot go below on this machine, measured now: starting Python with
    torch, reading the inputs (from the page cache, as the merges do after their warm-up),
    writing the output's bytes, and the merge's arithmetic on tensors already in memory."""
    import torch

    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, safetensors, yaml"], check=True, env=env)
    startup = time.perf_counter() - started
    files = [f for folder in inputs for f in Path(folder).glob("*.safetensors")]
    buffer = memoryview(bytearray(1 << 26))
    started = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    read = time.perf_counter() - started
    chunk = bytes(1 << 26)
    started = time.perf_counter()
    with open(work / "floor.bin", "wb") as handle:
        for _ in range(-(-output_bytes // len(chunk))):
            handle.write(chunk)
    write = time.perf_counter() - started
    (work / "floor.bin").unlink()
    sys.path.insert(0, str(REPO))
    from safetensors.torch import load_file

    from merging.methods import fused
    base, child = ({k: v for f in sorted(Path(m).glob("*.safetensors")) for k, v in load_file(f).items()}
                   for m in inputs[:2])
    outputs = {name: torch.zeros_like(tensor) for name, tensor in base.items()}  # allocated and touched
    started = time.perf_counter()
    for name, tensor in base.items():  # slerp's two passes: the sums, then c0 x0 + c1 x1 rounded to bf16
        fused.dot_products(tensor, child[name])
        fused.weighted_sum([tensor, child[name]], [0.5, 0.5], outputs[name])
    arithmetic = time.perf_counter() - started
    return {"startup": startup, "read": read, "write": write, "arithmetic": arithmetic,
            "bytes_read": sum(f.stat().st_size for f in files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mergelab" / "bench")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="gradient_slerp")
    parser.add_argument("--model", choices=("smollm2", "llama1b"), default="smollm2",
                        help="SmolLM2-135M with rank-8 children, or random Llama-3.2-1B-shaped "
                             "checkpoints (1.24B parameters; llama1b.py)")
    parser.add_argument("--floors", action="store_true",
                        help="also measure the limits: start-up, reading, writing, in-memory arithmetic")
    args = parser.parse_args()

    built = subprocess.run([sys.executable, str(Path(__file__).parent / f"{args.model}.py"), str(args.cache)],
                           check=True, capture_output=True, text=True)
    base, child, child2 = built.stdout.split()
    layers = 16 if args.model == "llama1b" else 30
    work = Path(tempfile.mkdtemp(prefix="mergelab-bench-"))
    config = work / "config.yml"
    config.write_text(CONFIGS[args.config].format(base=base, child=child, child2=child2, layers=layers))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    commands = {
        "mergelab": lambda out: [sys.executable, "-m", "merging", str(config), str(out)],
        "mergekit": lambda out: ["mergekit-yaml", str(config), str(out), "--device", "cpu"],
    }
    try:
        results = run_alternately(commands, args.runs, work, env)
        comparison = compare_outputs(work / f"mergelab-{args.runs}", work / f"mergekit-{args.runs}")
        written = sum(f.stat().st_size for f in (work / f"mergelab-{args.runs}").glob("*.safetensors"))
        limits = floors([Path(base), Path(child)], written, work, env) if args.floors else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from importlib.metadata import version
    described = {"smollm2": "SmolLM2-135M (base + rank-8 children)",
                 "llama1b": "random Llama-3.2-1B-shaped checkpoints (1.24B parameters, bfloat16)"}[args.model]
    print(f"config: {args.config} on {described}, {args.runs} runs each, "
          f"{os.cpu_count()} CPU cores, torch {version('torch')}, mergekit {version('mergekit')}")
    print()
    print(ratio_table(results, "`mergekit-yaml`"))
    print()
    print(f"outputs: {comparison}")
    if limits:
        print()
        print("| the limit, measured in the same run | seconds |")
        print("|---|---|")
        print(f"| start Python and import torch, safetensors, yaml | {limits['startup']:.2f} |")
        print(f"| read the two inputs ({limits['bytes_read'] / 1e9:.1f} GB, page cache) | {limits['read']:.2f} |")
        print(f"| write the output's bytes ({written / 1e9:.1f} GB) | {limits['write']:.2f} |")
        print(f"| the slerp arithmetic on tensors in memory (MergeLab's kernels) | {limits['arithmetic']:.2f} |")
        total = limits["startup"] + limits["read"] + limits["write"]
        print(f"| start + read + write | {total:.2f} |")


if __name__ == "__main__":
    main()
