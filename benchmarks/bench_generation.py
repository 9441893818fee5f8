"""Generation from a live merge against plain transformers on the same weights, in one run.

    python benchmarks/bench_generation.py [--runs 5] [--tokens 64] [--threads 2]

On the demo family (SmolLM2-135M: base and JSON child, built in the MergeLab cache on first
use): a slerp at t=0.5 written by `merge()` and loaded with `AutoModelForCausalLM.
from_pretrained`, and the same recipe as a LiveMerge (bfloat16 both; their tensors are equal).
Each answers the same chat prompt greedily with up to `--tokens` new tokens (the same tokens:
equal weights, greedy), the plain model through `model.generate` on the chat template's ids, the live one through
`LiveMerge.generate` (MergeLab's path: its sampler, stop event and template), alternately,
medians of `--runs`. Also the arena's streaming path. Prints Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
    for way in ways.values():
        way()  # warm-up
    rates = {name: [] for name in ways}
    for _ in range(args.runs):
        for name, way in ways.items():
            started = time.perf_counter()
            tokens = way()
            rates[name].append(tokens / (time.perf_counter() - started))
    reference = statistics.median(rates["transformers `model.generate`"])
    print(f"SmolLM2-135M slerp (bfloat16), {args.tokens} new tokens greedy, {args.threads} thread(s), "
          f"medians of {args.runs}\n")
    print("| path | tokens/s | vs plain transformers |")
    print("|---|---|---|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.1f} | {rate / reference:.2f} |")


if __name__ == "__main__":
    main()
