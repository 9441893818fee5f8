"""Merge search on the demo family: what CMA-ES finds against a t sweep, and how many
candidates a minute a live search scores against writing each one to disk and loading it.

    python benchmarks/bench_search.py [--budget 30] [--probes 20] [--seed 0] [--plot docs/search.png]

On the demo family (SmolLM2-135M children that answer in a JSON record and reverse words,
built in the MergeLab cache on first use), bfloat16 slerp from the JSON child (t=0) to the
reverse child (t=1), scored on both skills' held-out probes:
1. a t sweep (0, 0.1, ..., 1): the best point for both skills at once (its worse skill);
2. a search of `t@points:3` (a three-point gradient over the layers) maximizing the worse
   skill (`combine="min"`), `--budget` evaluations;
3. evaluations a minute, the same four candidates each way: re-merged in place in one
   LiveMerge (the search), and written by merge() then loaded with from_pretrained (how
   mergekit-evolve works without its in-memory mode).
Prints Markdown; --plot draws every evaluation and the sweep (plotly, rendered by Chromium).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging import merge  # noqa: E402
from merging.demo import build_family  # noqa: E402
from merging.demo_skills import probes  # noqa: E402
from merging.evaluate import probe_scorer  # noqa: E402
from merging.live import LiveMerge  # noqa: E402
from merging.search import Budget, Objective, parse_space, search  # noqa: E402

RECIPE = ("models:\n  - model: {reverse}\nmerge_method: slerp\nbase_model: {json}\n"
          "parameters:\n  t: {t}\ndtype: bfloat16\n")


def scores(objectives, model, tokenizer) -> dict:
    return {o.name: o.scorer(model, tokenizer) for o in objectives}


def disk_round_trip(candidate: str, objectives, work: Path) -> tuple[dict, float]:
    """How a search without a live model scores a candidate: write it, load it, score it.
    Returns the scores and the seconds spent making the model (writing and loading)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "candidate"
    started = time.perf_counter()
    merge(candidate, out, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    making = time.perf_counter() - started
    result = scores(objectives, model, tokenizer)
    shutil.rmtree(out)
    return result, making


def plot(sweep_rows, result, path: Path) -> None:
    import plotly.graph_objects as go

    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[e.scores["json probes"] for e in result.evaluations],
                                y=[e.scores["reverse probes"] for e in result.evaluations], mode="markers",
                                name="search evaluations", marker={"color": "#9aa5b1", "size": 9},
                                text=[f"#{e.index} {e.values}" for e in result.evaluations]))
    front = sorted(result.front, key=lambda e: e.scores["json probes"])
    figure.add_trace(go.Scatter(x=[e.scores["json probes"] for e in front], y=[e.scores["reverse probes"] for e in front],
                                mode="lines+markers", name="Pareto front", marker={"color": "#d1495b", "size": 11}))
    labels, seen = [], {}  # sweep points with equal scores share one label: "t=0-0.3"
    for row in sweep_rows:
        seen.setdefault((row["json probes"], row["reverse probes"]), []).append(row["t"])
    for row in sweep_rows:
        ts = seen[row["json probes"], row["reverse probes"]]
        first = row["t"] == ts[0]
        labels.append(("t=" + (f"{ts[0]:g}" if len(ts) == 1 else f"{ts[0]:g}-{ts[-1]:g}")) if first else "")
    figure.add_trace(go.Scatter(x=[r["json probes"] for r in sweep_rows], y=[r["reverse probes"] for r in sweep_rows],
                                mode="lines+markers+text", name="t sweep", text=labels,
                                textposition="top right", marker={"color": "#00798c", "size": 8}))
    best = result.best
    figure.add_trace(go.Scatter(x=[best.scores["json probes"]], y=[best.scores["reverse probes"]], mode="markers",
                                name="search's best (worse skill)", marker={"symbol": "star", "size": 18,
                                                                            "color": "#edae49"}))
    figure.update_layout(title="Demo family: slerp json -> reverse, held-out probe accuracy",
                         xaxis_title="json probes", yaxis_title="reverse probes", width=900, height=620,
                         xaxis_range=[-0.05, 1.15],  # room for the labels of the points at 1
                         template="plotly_white")
    html = path.with_suffix(".html")
    figure.write_html(html, include_plotlyjs=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        page = browser.new_page(viewport={"width": 920, "height": 640})
        page.goto(html.resolve().as_uri())
        page.wait_for_selector(".main-svg")
        page.screenshot(path=str(path))
        browser.close()
    html.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    family = {name: str(path) for name, path in build_family().items()}
    objectives = [Objective(f"{skill} probes", probe_scorer(probes(skill, args.probes)))
                  for skill in ("json", "reverse")]

    started = time.perf_counter()
    live = None
    sweep_rows = []
    for step in range(11):
        t = step / 10
        text = RECIPE.format(**family, t=t)
        if live is None:
            live = LiveMerge(text, device="cpu")
        else:
            live.update(text)
        sweep_rows.append({"t": t, **scores(objectives, live.model, live.tokenizer)})
    sweep_seconds = time.perf_counter() - started
    best_sweep = max(sweep_rows, key=lambda r: (min(r["json probes"], r["reverse probes"]),
                                                 r["json probes"] + r["reverse probes"]))

    space = parse_space(RECIPE.format(**family, t=0.5), ["t@points:3"])
    result = search(space, objectives, Budget(evaluations=args.budget), seed=args.seed, combine="min", device="cpu")
    best = max(result.evaluations, key=lambda e: (e.fitness, sum(e.scores.values())))

    candidates = [space.recipe(space.values(point)).to_yaml()
                  for point in ([0.2, 0.5, 0.8], [0.6, 0.6, 0.6], [0.4, 0.7, 0.5], [0.9, 0.3, 0.6])]
    work = Path(tempfile.mkdtemp(prefix="mergelab-search-bench-"))
    try:
        started = time.perf_counter()
        round_trips = [disk_round_trip(candidate, objectives, work) for candidate in candidates]
        disk_seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    on_disk = [scores_ for scores_, _ in round_trips]
    disk_making = sum(making for _, making in round_trips)
    started = time.perf_counter()
    in_place, live_making = [], 0.0
    for candidate in candidates:
        began = time.perf_counter()
        live.update(candidate)
        live_making += time.perf_counter() - began
        in_place.append(scores(objectives, live.model, live.tokenizer))
    live_seconds = time.perf_counter() - started
    assert in_place == on_disk, (in_place, on_disk)

    print(f"Demo family, bfloat16 slerp json (t=0) -> reverse (t=1), {args.probes} held-out probes per skill\n")
    print("| | json probes | reverse probes | worse skill | evaluations | wall time |")
    print("|---|---|---|---|---|---|")
    print(f"| best point of the t sweep (t={best_sweep['t']:g}) | {best_sweep['json probes']:.2f} | "
          f"{best_sweep['reverse probes']:.2f} | {min(best_sweep['json probes'], best_sweep['reverse probes']):.2f} | "
          f"11 | {sweep_seconds:.0f} s |")
    values = ", ".join(f"{v:g}" for v in best.values["t@points:3"])
    print(f"| best of the search (t gradient [{values}], #{best.index}) | {best.scores['json probes']:.2f} | "
          f"{best.scores['reverse probes']:.2f} | {best.fitness:.2f} | {len(result.evaluations)} | "
          f"{result.seconds:.0f} s |")
    print(f"\nPareto front: {len(result.front)} evaluations: " + "; ".join(
        f"#{e.index} ({e.scores['json probes']:.2f}, {e.scores['reverse probes']:.2f})" for e in result.front))
    print("\n| how each candidate is made | 4 candidates | of which making the models | evaluations a minute |")
    print("|---|---|---|---|")
    print(f"| re-merged in place (MergeLab's search) | {live_seconds:.1f} s | {live_making:.2f} s | "
          f"{4 * 60 / live_seconds:.1f} |")
    print(f"| written by merge(), loaded with from_pretrained | {disk_seconds:.1f} s | {disk_making:.2f} s | "
          f"{4 * 60 / disk_seconds:.1f} |")
    print("\nthe same scores both ways; the sweep's rows: " + ", ".join(
        f"t={r['t']:g}: {r['json probes']:.2f}/{r['reverse probes']:.2f}" for r in sweep_rows))
    if args.plot:
        plot(sweep_rows, result, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
