"""What merging the demo family does to its two skills: probe scores along merge settings.

    python benchmarks/demo_sweep.py [--probes 20] [--plot docs/demo-sweep.png]

Builds (or reuses) the demo family (python -m merging.demo build), then scores the held-out
probes of both skills for: SLERP from the JSON child (t=0) to the reverse child (t=1), and
TIES and DARE-TIES of both children over the base at several densities. Prints a Markdown
table; with --plot, draws the SLERP sweep (needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging import LiveMerge  # noqa: E402
from merging.demo import build_family  # noqa: E402
from merging.demo_skills import probes  # noqa: E402
from merging.evaluate import probe_accuracy  # noqa: E402

SLERP = """
models:
  - model: {reverse}
merge_method: slerp
base_model: {json}
parameters: {{t: {t}}}
dtype: float32
"""
TASK_VECTORS = """
models:
  - model: {json}
    parameters: {{weight: {weight}, density: {density}}}
  - model: {reverse}
    parameters: {{weight: {weight}, density: {density}}}
merge_method: {method}
base_model: {base}
dtype: float32
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    family = {name: str(path) for name, path in build_family(args.cache).items()}
    probe_sets = {skill: probes(skill, args.probes) for skill in ("json", "reverse")}

    def score(model, tokenizer) -> dict:
        return {skill: probe_accuracy(model, tokenizer, probe_sets[skill]) for skill in probe_sets}

    rows = []
    live = None
    started = time.perf_counter()
    for name in ("base", "json", "reverse"):
        from merging.generation import load_model
        rows.append({"setting": f"{name} model", **score(*load_model(family[name], dtype="float32"))})
    for t in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0):
        recipe = SLERP.format(t=t, **family)
        live = LiveMerge(recipe, device="cpu") if live is None else live
        live.update(recipe)
        rows.append({"setting": f"slerp t={t}", "t": t, **score(live.model, live.tokenizer)})
    for method, weight in (("ties", 1.0), ("dare_ties", 1.0)):
        for density in (0.2, 0.5, 0.8):
            recipe = TASK_VECTORS.format(method=method, weight=weight, density=density, **family)
            live.update(recipe)
            rows.append({"setting": f"{method} density={density} weight={weight}",
                         **score(live.model, live.tokenizer)})
    print(f"{args.probes} held-out probes per skill, exact match, greedy decoding; "
          f"{time.perf_counter() - started:.0f} s in all")
    print()
    print("| model or merge | json skill | reverse skill |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['json']:.0%} | {row['reverse']:.0%} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        slerp = [r for r in rows if "t" in r]
        figure, axis = plt.subplots(figsize=(6, 3.6), dpi=120)
        axis.plot([r["t"] for r in slerp], [r["json"] for r in slerp], "o-", label="json skill")
        axis.plot([r["t"] for r in slerp], [r["reverse"] for r in slerp], "s-", label="reverse skill")
        axis.set_xlabel("SLERP t (0 = json child, 1 = reverse child)")
        axis.set_ylabel("held-out probes correct")
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
        axis.legend()
        axis.set_title("Merging the demo family's two skills")
        figure.tight_layout()
        figure.savefig(args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
