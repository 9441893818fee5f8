"""Generation from a live merge against plain transformers on the same weights, in one run.

    python benchmarks/bench_generation.py [--runs 5] [--tokens 64] [--threads 2]

On the demo family (SmolLM2-135M: base and JSON child, built in the MergeLab cache on first
use): a slerp at t=0.5 written by `merge()` and loaded with `AutoModelForCausalLM.
from_pretrained`, and the same recipe as a LiveMerge (bfloat16 both; their tensors are equal).
Each answers the same chat prompt greedily with up to `--tokens` new tokens (the same tokens:
equal weights, greedy), the plain model through `model.generate` on the chat template's ids, the live one through
`LiveMerge.generate` (MergeLab's path: its sampler and template), alternately, medians of
`--runs`; also the arena's streaming path (generation in a thread of its own, text through a
queue). Each is called from the main thread and from a long-lived worker thread, as a Gradio
handler is: torch's OpenMP threads are slower when several threads have used them (libgomp
then stops spinning between parallel regions). Prints Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging import merge  # noqa: E402
from merging.generation import Sampling, chat_inputs  # noqa: E402
from merging.live import LiveMerge  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.demo import build_family

    family = {name: str(path) for name, path in build_family().items()}
    recipe = (f"merge_method: slerp\nbase_model: {family['base']}\nmodels:\n  - model: {family['base']}\n"
              f"  - model: {family['json']}\nparameters:\n  t: 0.5\ndtype: bfloat16\n")
    with tempfile.TemporaryDirectory() as work:
        merge(recipe, Path(work) / "out")
        plain = AutoModelForCausalLM.from_pretrained(Path(work) / "out", dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(Path(work) / "out")
    live = LiveMerge(recipe, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), live.model.state_dict().values()))
    sampling = Sampling(max_new_tokens=args.tokens)
    ids = chat_inputs(tokenizer, PROMPT, "cpu")

    def plain_generate() -> int:
        with torch.no_grad():
            out = plain.generate(**ids, max_new_tokens=args.tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return out.shape[1] - ids["input_ids"].shape[1]

    def live_generate() -> int:
        return live.generate(PROMPT, sampling).new_tokens

    def live_stream() -> int:
        *_, final = live.stream(PROMPT, sampling)
        return final.new_tokens

    ways = {"transformers `model.generate`": plain_generate, "LiveMerge.generate": live_generate,
            "LiveMerge.stream (the arena)": live_stream}
    handler = ThreadPoolExecutor(max_workers=1)  # one long-lived worker thread, as a Gradio handler runs in

    def called(way, where):
        return way() if where == "main" else handler.submit(way).result()

    wheres = {"main": "the main thread", "worker": "a worker thread (a Gradio handler)"}
    for where in wheres:
        for way in ways.values():
            called(way, where)  # warm-up
    rates = {(name, where): [] for name in ways for where in wheres}
    for _ in range(args.runs):
        for where in wheres:
            for name, way in ways.items():
                started = time.perf_counter()
                tokens = called(way, where)
                rates[name, where].append(tokens / (time.perf_counter() - started))
    handler.shutdown()
    print(f"SmolLM2-135M slerp (bfloat16), {args.tokens} new tokens greedy, {args.threads} thread(s), "
          f"medians of {args.runs}\n")
    print("| called from | path | tokens/s | vs plain transformers called from there |")
    print("|---|---|---|---|")
    for where, label in wheres.items():
        reference = statistics.median(rates["transformers `model.generate`", where])
        for name in ways:
            rate = statistics.median(rates[name, where])
            print(f"| {label} | {name} | {rate:.1f} | {rate / reference:.2f} |")


if __name__ == "__main__":
    main()
