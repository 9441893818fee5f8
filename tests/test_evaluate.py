"""Perplexity against a direct computation, probes, and sweeps that run from parent to parent."""

from __future__ import annotations

import math

import pytest
import torch

from merging import MergeConfig, MergeError
from merging.evaluate import (Probe, perplexity, perplexity_scorer, probe_results, sweep, with_parameter)
from merging.generation import Sampling, generate, load_model

TEXTS = ["the cat sat on the mat", "a red dog sat on a blue mat", "merge the model layer"]


def direct_perplexity(model, tokenizer, texts) -> float:
    """One text and one token at a time, no batching, no padding."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            for position in range(1, len(ids)):
                logits = model(input_ids=torch.tensor([ids[:position]])).logits[0, -1]
                total -= torch.log_softmax(logits.double(), dim=-1)[ids[position]].item()
                count += 1
    return math.exp(total / count)


def test_batched_perplexity_matches_a_direct_computation(tiny):
    model, tokenizer = load_model(tiny["c1"])
    assert perplexity(model, tokenizer, TEXTS, batch_size=2) == pytest.approx(
        direct_perplexity(model, tokenizer, TEXTS), rel=1e-4)


def test_probes_score_exact_answers(tiny):
    model, tokenizer = load_model(tiny["c1"])
    answer = generate(model, tokenizer, "the cat", Sampling(max_new_tokens=4)).text
    rows = probe_results(model, tokenizer, [Probe("the cat", answer), Probe("the cat", "certainly not")],
                         max_new_tokens=4)
    assert [r["correct"] for r in rows] == [True, False]


SLERP = """
models:
  - model: {c1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
dtype: float32
"""


def test_a_sweep_over_t_runs_from_one_parent_to_the_other(tiny):
    text = SLERP.format(base=tiny["base"], c1=tiny["c1"])
    seen = []
    rows = sweep(text, "t", [0.0, 0.25, 0.5, 0.75, 1.0], {"ppl": perplexity_scorer(TEXTS)}, device="cpu",
                 progress=lambda done, total, row: seen.append((done, total)))
    base, tokenizer = load_model(tiny["base"])
    child, _ = load_model(tiny["c1"])
    assert rows[0]["ppl"] == pytest.approx(perplexity(base, tokenizer, TEXTS), rel=1e-5)
    assert rows[-1]["ppl"] == pytest.approx(perplexity(child, tokenizer, TEXTS), rel=1e-5)
    assert [r["value"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert seen == [(i, 5) for i in range(1, 6)]


def test_a_sweep_can_stop_early(tiny):
    text = SLERP.format(base=tiny["base"], c1=tiny["c1"])
    seen = []
    rows = sweep(text, "t", [0.0, 0.5, 1.0], {"ppl": perplexity_scorer(TEXTS)}, device="cpu",
                 should_stop=lambda: len(seen) >= 2, progress=lambda done, total, row: seen.append(row))
    assert len(rows) == 2


def test_with_parameter_sets_global_and_per_model_values(tiny):
    config = MergeConfig.from_yaml(
        f"models:\n  - model: {tiny['c1']}\n    parameters: {{weight: 0.3}}\n  - model: {tiny['c2']}\n"
        f"    parameters: {{weight: 0.7}}\nmerge_method: ties\nbase_model: {tiny['base']}\n")
    changed = with_parameter(config, f"weight@{tiny['c2']}", 0.1)
    assert changed.models[1].parameters["weight"] == 0.1 and config.models[1].parameters["weight"] == 0.7
    assert with_parameter(config, "lambda", 0.5).parameters["lambda"] == 0.5
    with pytest.raises(MergeError, match="no model"):
        with_parameter(config, "weight@nobody", 1.0)
    with pytest.raises(MergeError, match="above its maximum"):
        with_parameter(config, f"density@{tiny['c1']}", 1.5)
