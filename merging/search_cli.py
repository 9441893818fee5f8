"""`python -m merging search RECIPE.yml --param ... --objective ... --budget N`: the command line
of merging.search, with a progress bar and a table of the best recipes at the end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MergeError

SHOWN = 5  # best recipes in the final table (and written with --out-dir)


def search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m merging search",
        description="Search a recipe's numeric parameters with CMA-ES: every candidate is merged in place "
                    "in memory and scored; the best recipes are printed (and written with --out-dir) as "
                    "mergekit YAML. Re-running the same search reads back the evaluations it already "
                    "recorded in the history.",
        epilog="parameters: NAME (top level), NAME@MODEL (a model's own), NAME@layers:A-B (layers A..B), "
               "NAME@points:K (a gradient of K control points), each with =LOW:HIGH bounds where the method "
               "has none of its own. objectives: probes:json[:N], probes:reverse[:N] (the demo skills' "
               "held-out probes), perplexity:FILE (one text a line; lower is better).")
    parser.add_argument("config", help="the mergekit YAML recipe to search around")
    parser.add_argument("--param", action="append", required=True, metavar="SPEC", help="a parameter to search")
    parser.add_argument("--objective", action="append", required=True, metavar="SPEC", help="a score to maximize")
    parser.add_argument("--budget", type=int, help="evaluations (default 40 unless --seconds is given)")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seeds CMA-ES: the same seed, the same search")
    parser.add_argument("--combine", choices=["sum", "min"], default="sum",
                        help="several objectives: maximize their sum, or their worst (default sum)")
    parser.add_argument("--population", type=int, help="candidates per CMA-ES generation (default: CMA-ES's own)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out-dir", help="write the best recipes here as best-1.yml, best-2.yml, ...")
    parser.add_argument("--history", help="the SQLite history to record in and resume from "
                                          "(default ~/.cache/mergelab/history.sqlite)")
    parser.add_argument("--no-history", action="store_true", help="record nothing, read nothing back")
    parser.add_argument("--ray-address", help="spread the evaluations over the Ray cluster at HOST:PORT")
    parser.add_argument("--ray-workers", type=int,
                        help="Ray workers, each holding a live model: without --ray-address, N workers on this "
                             "machine; with it, N on the cluster (default: one per GPU, else 2)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    return parser


def run_search(args) -> int:
    from tqdm import tqdm

    from .search import Budget, parse_objective, parse_space, search

    budget = Budget(args.budget if args.budget is not None or args.seconds is not None else 40, args.seconds)
    budget.check()
    space = parse_space(args.config, args.param)
    objectives = [parse_objective(spec) for spec in args.objective]
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"--out-dir {out_dir} is a file")
    history = None
    if not args.no_history:
        from .history import History

        history = History(args.history)
    evaluator = None
    if args.ray_address or args.ray_workers:
        from .search_ray import RayEvaluator

        evaluator = RayEvaluator(objectives, address=args.ray_address, workers=args.ray_workers)
    total = budget.evaluations
    bar = tqdm(total=total, unit="eval", desc="searching", file=sys.stderr, dynamic_ncols=True)

    def progress(evaluation, result):
        bar.update(1)
        bar.set_postfix_str(f"best {result.best.fitness:.4g}" + (" (recorded)" if evaluation.recorded else ""),
                            refresh=False)

    try:
        result = search(space, objectives, budget, seed=args.seed, combine=args.combine,
                        population=args.population, evaluator=evaluator, device=args.device, history=history,
                        user="local", progress=progress)
    finally:
        bar.close()
        if evaluator is not None:
            evaluator.close()
    print(table(result, args.combine))
    recorded = sum(e.recorded for e in result.evaluations)
    print(f"{len(result.evaluations)} evaluations ({recorded} read back from the history) in "
          f"{result.seconds:.1f} s; {result.stopped}", file=sys.stderr)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for rank, evaluation in enumerate(result.ranked()[:SHOWN], 1):
            (out_dir / f"best-{rank}.yml").write_text(evaluation.recipe)
        print(f"wrote the best {min(SHOWN, len(result.evaluations))} recipes to {out_dir}", file=sys.stderr)
    return 0


def table(result, combine: str) -> str:
    """The best evaluations as a Markdown table (and the Pareto front's size)."""
    names = result.objectives
    lines = ["| rank | # | " + " | ".join(names) + f" | {combine} | parameters |",
             "|---" * (len(names) + 4) + "|"]
    for rank, evaluation in enumerate(result.ranked()[:SHOWN], 1):
        values = ", ".join(f"{k}={_short(v)}" for k, v in evaluation.values.items())
        scores = " | ".join(f"{evaluation.scores[n]:.4g}" for n in names)
        lines.append(f"| {rank} | {evaluation.index} | {scores} | {evaluation.fitness:.4g} | {values} |")
    if len(names) > 1:
        lines.append(f"\nPareto front: {len(result.front)} of {len(result.evaluations)} evaluations "
                     f"(#{', #'.join(str(e.index) for e in result.front)})")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}"
