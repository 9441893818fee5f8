"""What a mixture of experts of the demo family keeps of its two skills: held-out probe
scores for MoE variants (gate mode, experts per token, which model gives the attention).

    python benchmarks/demo_moe.py [--probes 20]

Builds (or reuses) the demo family, then for each variant builds the MoE with
merging.moe.build_moe (experts: the JSON child and the reverse child, each routed by four
training prompts of its skill) and scores both skills' probes. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from merging.demo import build_family  # noqa: E402
from merging.demo_skills import moe_recipe, probes  # noqa: E402
from merging.evaluate import probe_accuracy  # noqa: E402
from merging.generation import load_model  # noqa: E402
from merging.moe import build_moe  # noqa: E402

VARIANTS = [  # (attention from, gate_mode, experts per token)
    ("base", "hidden", 1), ("base", "hidden", 2), ("base", "hidden_avg", 2), ("base", "cheap_embed", 1),
    ("reverse", "hidden", 1), ("reverse", "hidden", 2), ("json", "hidden", 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    family = build_family()
    skills = {skill: probes(skill, args.probes) for skill in ("json", "reverse")}
    print(f"{args.probes} held-out probes per skill, greedy decoding; experts: the JSON child and the reverse "
          "child, four training prompts each")
    print()
    print("| attention from | gate_mode | experts per token | json | reverse | build |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for attention, gate_mode, per_token in VARIANTS:
            recipe = yaml.safe_load(moe_recipe(family))
            recipe.update(base_model=str(family[attention]), gate_mode=gate_mode, experts_per_token=per_token)
            started = time.perf_counter()
            out = build_moe(recipe, Path(work) / "moe", overwrite=True)
            seconds = time.perf_counter() - started
            model, tokenizer = load_model(out, dtype="float32")
            scores = {skill: probe_accuracy(model, tokenizer, items) for skill, items in skills.items()}
            print(f"| {attention} | {gate_mode} | {per_token} | {scores['json']:.0%} | {scores['reverse']:.0%} | "
                  f"{seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
