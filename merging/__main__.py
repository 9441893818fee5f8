"""Command line: python -m merging CONFIG.yml OUT_DIR [options]."""

from __future__ import annotations

import argparse
import errno
import re
import signal
import sys
import threading
import time

from pathlib import Path

from .errors import FolderNotEmpty, MergeError

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
         "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str) -> int:
    """'5GB', '500M', '2GiB' or a byte count."""
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 5GB, 500MB or 1000000")
    unit = (match[2] or "").lower().rstrip("b")
    return int(float(match[1]) * UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    from .methods import describe_methods

    parser = argparse.ArgumentParser(
        prog="python -m merging",
        description="Merge models from a mergekit YAML config into a Hugging Face model folder. "
                    "A config with 'experts' (mergekit-moe's format) builds a Mixtral mixture of experts. "
                    "`python -m merging extract-lora MODEL BASE OUT --rank R` extracts a LoRA adapter; "
                    "`python -m merging search RECIPE.yml --param ... --objective ...` searches a recipe's "
                    "parameters (see python -m merging search --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="merge methods and their parameters:\n" + describe_methods())
    parser.add_argument("config", help="mergekit YAML config (several documents: a multi-stage merge)")
    parser.add_argument("out_dir", help="folder to write the merged model to")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to do the arithmetic (auto: CUDA when present)")
    parser.add_argument("--out-shard-size", type=parse_size, default="5GB",
                        help="largest output shard, e.g. 2GB (default 5GB)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA)")
    parser.add_argument("--intermediate-dir", help="keep the outputs of earlier stages here")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the plan without merging")
    parser.add_argument("--strict", action="store_true",
                        help="a key that has no effect (mergekit ignores it: a mis-indented int8_mask, a "
                             "parameter the method does not take) is an error, not a warning")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it exists (only once the merge has succeeded)")
    parser.add_argument("--allow-identical-experts", "--i-understand-this-is-not-useful-without-training",
                        action="store_true", dest="allow_identical_experts",
                        help="MoE: let every expert be the same model (only useful before further training)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    return parser


def extract_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m merging extract-lora",
        description="Extract a LoRA adapter (PEFT layout) that turns BASE into MODEL: a truncated SVD of "
                    "each linear weight's difference.")
    parser.add_argument("model", help="the fine-tuned model (folder or hub id)")
    parser.add_argument("base", help="the model it was fine-tuned from")
    parser.add_argument("out_dir", help="folder for adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    return parser


def run_extract(args) -> int:
    from tqdm import tqdm

    from .extract import extract_lora

    with tqdm(unit="tensor", desc="extracting", file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        report = extract_lora(args.model, args.base, args.out_dir, args.rank, progress)
    if report["not_extracted"]:
        shown = ", ".join(report["not_extracted"][:4]) + (" ..." if len(report["not_extracted"]) > 4 else "")
        print(f"warning: {len(report['not_extracted'])} other tensors differ and are not in the adapter "
              f"(a LoRA adapts linear weights only): {shown}", file=sys.stderr)
    print(f"wrote {args.out_dir}: rank {args.rank}, {report['modules']} linear weights, keeping "
          f"{report['energy_kept']:.1%} of their difference's energy", file=sys.stderr)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as the interruption Ctrl-C gives, so the same cleanup runs."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("extract-lora", "search") else None
    if command == "search":
        from .search_cli import run_search, search_parser

        parser, runner = search_parser(), run_search
    elif command == "extract-lora":
        parser, runner = extract_parser(), run_extract
    else:
        parser, runner = build_parser(), run
    args = parser.parse_args(argv[1:] if command else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return runner(args)
    except MergeError as error:
        if args.verbose:
            raise
        hint = " (pass --overwrite)" if isinstance(error, FolderNotEmpty) else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        print("interrupted" if command == "search" else "interrupted; nothing was written", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interruption, Terminated) else signal.SIGINT)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or args.verbose:
            raise
        print(f"error: the disk ran out of space while writing ({error.strerror}); nothing was written "
              f"to {args.out_dir}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run(args) -> int:
    from .config import check_strict, load_config
    from .engine import resolve_device
    from .writer import check_output_folder, claim_folder

    config = load_config(args.config)
    if args.strict:
        check_strict(config)
    resolve_device(args.device)
    if args.dry_run:
        return run_config(args, config)
    out_dir = Path(args.out_dir)
    check_output_folder(out_dir, args.overwrite)
    # Claimed before planning: a second run to OUT_DIR fails at once, and the leftovers of a
    # killed run there are gone before free space is measured.
    with claim_folder(out_dir):
        return run_config(args, config)


def run_config(args, config) -> int:
    from tqdm import tqdm

    from .config import MultiStageConfig
    from .moe_config import MoEConfig
    from .pipeline import merge, plan_stages
    from .plan import format_bytes

    if isinstance(config, MoEConfig):
        return run_moe(args, config)
    plans = plan_stages(config)
    for plan in plans:
        if isinstance(config, MultiStageConfig):
            print(f"stage {plan.config.name or 'final'}:", file=sys.stderr)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        for plan in plans:
            header = f"== stage {plan.config.name or 'final'} ==\n" if len(plans) > 1 else ""
            print(header + plan.summary())
        print(f"dry run: all checks passed; nothing was written to {args.out_dir}")
        return 0

    total = sum(len(plan.tasks) for plan in plans)
    started = time.perf_counter()
    bars: list[tqdm] = []  # opened with the first tensor: the checks before it print nothing else

    def progress(done, count, name):
        if not bars:
            bars.append(tqdm(total=total, unit="tensor", desc="merging", file=sys.stderr, dynamic_ncols=True))
        bars[0].update(1)

    try:
        merge(config, args.out_dir, device=args.device, progress=progress, seed=args.seed,
              out_shard_size=args.out_shard_size, intermediate_dir=args.intermediate_dir,
              overwrite=args.overwrite, plans=plans)
    finally:
        for bar in bars:
            bar.close()
    size = sum(plan.output_bytes for plan in plans[-1:])
    print(f"wrote {args.out_dir} ({format_bytes(size)}) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0


def run_moe(args, config) -> int:
    """Build a mixture of experts: check, compute the routers, stream the tensors."""
    from tqdm import tqdm

    from .moe import build_moe, plan_moe
    from .plan import format_bytes

    plan = plan_moe(config, allow_identical_experts=args.allow_identical_experts)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(plan.summary())
        print(f"dry run: all checks passed; nothing was written to {args.out_dir}")
        return 0
    started = time.perf_counter()
    known = len(plan.warnings)
    bars: dict[str, tqdm] = {}

    def progress(stage, done, total):
        if stage not in bars:
            unit = "expert" if stage == "router prompts" else "tensor"
            bars[stage] = tqdm(total=total, unit=unit, desc=stage, file=sys.stderr, dynamic_ncols=True)
        bars[stage].update(done - bars[stage].n)

    try:
        build_moe(config, args.out_dir, device=args.device, seed=args.seed, progress=progress,
                  out_shard_size=args.out_shard_size, overwrite=args.overwrite, plan=plan)
    finally:
        for bar in bars.values():
            bar.close()
    for warning in plan.warnings[known:]:  # found while building: degenerate routers
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out_dir} ({format_bytes(plan.output_bytes)}) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
