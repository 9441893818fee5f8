"""Latency and memory of a public MergeLab server under 1, 4 and 8 concurrent visitors.

    python benchmarks/bench_load.py [--cache DIR] [--levels 1 4 8] [--asks 3] [--busy]

Starts `python app.py` as a public deployment (MERGELAB_PUBLIC=1) on the demo family, then,
for each level N, lets N visitors arrive together. Each merges the Lab's slerp recipe (its own
t, so its own first build; merges share one heavy queue, so they wait for each other), asks the
three panes `--asks` times (12 new tokens at temperature 0.8, its own seed) and, once, moves t
and merges again (an in-place update). Reported per level: p50/p95 of the first build, of the
update and of the first token (the time from the ask to the first piece of text), and the
server's RSS over time (sampled every 0.5 s), with its baseline, its peak and where it settles
after the sessions expire. `--busy` keeps one core busy with another process meanwhile, as on a
shared machine. Prints Markdown (docs/benchmarks.md holds the results).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from visitors import RawVisitor, lab_recipe, launch_app, pane_text, percentile  # noqa: E402

IDLE_SECONDS = 10
PROMPT = "Reverse the words: red lamp quiet"


def busy_loop() -> None:
    while True:
        pass


def one_visitor(url: str, family: dict, index: int, asks: int, timings: dict, lock: threading.Lock) -> None:
    visitor = RawVisitor(url)
    t = round(0.2 + 0.07 * index, 2)
    started = time.perf_counter()
    visitor.call("merge", lab_recipe(family, t), False)
    build = time.perf_counter() - started
    firsts = []
    for ask in range(asks):
        events = visitor.call_stream("ask", PROMPT, 12, 0.8, 100 * index + ask, False)
        first = next((seconds for seconds, outputs in events if pane_text(outputs[0])), events[-1][0])
        firsts.append(first)
    started = time.perf_counter()
    visitor.call("merge", lab_recipe(family, round(1 - t, 2)), False)
    update = time.perf_counter() - started
    with lock:
        timings["build"].append(build)
        timings["update"].append(update)
        timings["first token"].extend(firsts)


def run_level(server, family: dict, visitors: int, asks: int, sessions: Path) -> dict:
    timings = {"build": [], "update": [], "first token": []}
    lock = threading.Lock()
    threads = [threading.Thread(target=one_visitor, args=(server.url, family, i, asks, timings, lock))
               for i in range(visitors)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    timings["wall"] = time.perf_counter() - started
    return timings


def sessions_left(sessions: Path) -> int:
    return sum(1 for instance in sessions.iterdir() if instance.is_dir() for f in instance.iterdir() if f.is_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="MERGELAB_CACHE holding (or to hold) the demo family")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--asks", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    args = parser.parse_args()

    from merging.demo import build_family

    cache = Path(args.cache or tempfile.mkdtemp(prefix="mergelab-load-"))
    family = {k: str(v) for k, v in build_family(cache / "demo").items()}
    sessions = Path(tempfile.mkdtemp(prefix="mergelab-load-sessions-"))
    server = launch_app(cache, env={"MERGELAB_PUBLIC": "1", "MERGELAB_SESSIONS": str(sessions),
                                    "MERGELAB_MAX_SESSION_IDLE_SECONDS": str(IDLE_SECONDS)})
    busy = multiprocessing.Process(target=busy_loop, daemon=True) if args.busy else None
    samples: list[tuple[float, int, str]] = []
    phase = ["start"]
    stop = threading.Event()
    origin = time.perf_counter()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append((time.perf_counter() - origin, server.rss_bytes(), phase[0]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if busy:
            busy.start()
        phase[0] = "warm-up"
        run_level(server, family, 1, 1, sessions)  # imports and first loads, not counted
        results = {}
        for level in args.levels:
            phase[0] = f"idle before {level}"
            while sessions_left(sessions):
                time.sleep(0.5)
            time.sleep(2)
            phase[0] = f"{level} visitors"
            results[level] = run_level(server, family, level, args.asks, sessions)
        phase[0] = "after"
        while sessions_left(sessions):
            time.sleep(0.5)
        time.sleep(3)
    finally:
        stop.set()
        sampler.join()
        if busy:
            busy.terminate()
        server.stop()

    def rss(phase_name: str, pick) -> float:
        values = [r for _, r, p in samples if p == phase_name]
        return pick(values) / 1e6 if values else float("nan")

    condition = "one core kept busy by another process" if args.busy else "a quiet machine"
    print(f"## Load: a public server, 2 CPU cores, {condition}\n")
    print(f"Each visitor: first build of the demo slerp (float32, 135M), {args.asks} asks of 12 tokens to three "
          "panes, one update. Seconds, p50 / p95 over the visitors (first token: over every ask).\n")
    print("| visitors | first build | update | first token | wall time | RSS peak |")
    print("|---|---|---|---|---|---|")
    for level, timing in results.items():
        cells = [f"{percentile(timing[k], 0.5):.1f} / {percentile(timing[k], 0.95):.1f}"
                 for k in ("build", "update", "first token")]
        print(f"| {level} | " + " | ".join(cells) + f" | {timing['wall']:.0f} | "
              f"{rss(f'{level} visitors', max):.0f} MB |")
    baseline = rss(f"idle before {args.levels[0]}", lambda values: values[-1])  # its sessions expired
    print(f"\nRSS: {baseline:.0f} MB idle after the warm-up, {max(r for _, r, _ in samples) / 1e6:.0f} MB at the "
          f"peak, {rss('after', lambda values: values[-1]):.0f} MB once every session had expired "
          f"({IDLE_SECONDS} s idle limit).\n")
    print("RSS over time (MB, every 5 s):\n")
    print("| s | MB | phase |\n|---|---|---|")
    for seconds, value, name in samples[::10]:
        print(f"| {seconds:.0f} | {value / 1e6:.0f} | {name} |")


if __name__ == "__main__":
    main()
