"""Scoring models: perplexity on texts, exact-match probes, and sweeps of a merge parameter.

    perplexity = exp( sum over predicted tokens of -log p(token | prefix) / number of them )
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .config import MergeConfig, load_config
from .errors import MergeError
from .placement import input_device

Scorer = Callable[[object, object], float]  # (model, tokenizer) -> score


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 512,
               tokenized: Optional[list[list[int]]] = None) -> float:
    """Token-weighted perplexity of `model` on `texts`, batched with right padding
    (`tokenized`: the texts' ids when already known, as a sweep's scorer keeps them)."""
    from .generation import pad_batch, pad_id

    tokenized = tokenized or tokenize_texts(tokenizer, texts, max_length)
    device = input_device(model)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = tokenized[start:start + batch_size]
        ids, mask = pad_batch(encoded, pad_id(tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets, counted = ids[:, 1:], mask[:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_loss += float(losses[counted].sum())
        total_tokens += int(counted.sum())
    return math.exp(total_loss / total_tokens)


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int = 512) -> list[list[int]]:
    """The texts' token ids (each cut at `max_length`), once they can be scored: at least one
    text, and one with two tokens or more (the first token has nothing to be predicted from)."""
    if not texts:
        raise MergeError("perplexity needs at least one text")
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    if max(len(ids) for ids in encoded) < 2:
        raise MergeError("the texts are too short: perplexity needs at least two tokens in one text")
    return encoded


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str


def normalize_answer(text: str) -> str:
    """Compare answers without surrounding whitespace or a trailing full stop."""
    return text.strip().rstrip(".").strip()


@torch.no_grad()
def probe_results(model, tokenizer, probes: Iterable[Probe], max_new_tokens: Optional[int] = None,
                  batch_size: int = 32, encoded: Optional[list] = None) -> list[dict]:
    """Greedy answers to each probe (batched, left-padded), and whether each matches
    exactly after normalizing. `encoded`: the prompts' ids and the answers' lengths when
    already known (probe_encoding; a sweep's scorer keeps them from point to point)."""
    from .generation import pad_batch, pad_id

    probes = list(probes)
    encoded = encoded or probe_encoding(tokenizer, probes)
    device = input_device(model)
    pad = pad_id(tokenizer)
    rows = []
    for start in range(0, len(probes), batch_size):
        chunk = probes[start:start + batch_size]
        prompts = [prompt for prompt, _ in encoded[start:start + batch_size]]
        ids, mask = pad_batch(prompts, pad, left=True)
        width = ids.shape[1]
        budget = max_new_tokens or max(length for _, length in encoded[start:start + batch_size]) + 8
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        for probe, generated in zip(chunk, output[:, width:]):
            answer = tokenizer.decode(generated, skip_special_tokens=True)
            rows.append({"prompt": probe.prompt, "expected": probe.answer, "answer": answer,
                         "correct": normalize_answer(answer) == normalize_answer(probe.answer)})
    return rows


def probe_encoding(tokenizer, probes: Sequence[Probe]) -> list[tuple[torch.Tensor, int]]:
    """Each probe's prompt as chat-template ids, and its answer's length in tokens."""
    from .generation import chat_inputs

    return [(chat_inputs(tokenizer, probe.prompt, "cpu")["input_ids"][0], len(tokenizer(probe.answer)["input_ids"]))
            for probe in probes]


def probe_accuracy(model, tokenizer, probes: Sequence[Probe], max_new_tokens: Optional[int] = None,
                   encoded: Optional[list] = None) -> float:
    """Fraction of probes answered exactly."""
    rows = probe_results(model, tokenizer, probes, max_new_tokens, encoded=encoded)
    return sum(r["correct"] for r in rows) / len(rows) if rows else 0.0


class _PerTokenizer:
    """What a scorer derives from its tokenizer (token ids), kept while the tokenizer stays
    the same object: from point to point of a sweep the texts are tokenized once."""

    def __init__(self, derive):
        self.derive, self.tokenizer, self.value = derive, None, None

    def __call__(self, tokenizer):
        if tokenizer is not self.tokenizer:
            self.tokenizer, self.value = tokenizer, self.derive(tokenizer)
        return self.value


def perplexity_scorer(texts: Sequence[str], max_length: int = 512, **kwargs) -> Scorer:
    ids = _PerTokenizer(lambda tokenizer: tokenize_texts(tokenizer, texts, max_length))
    return lambda model, tokenizer: perplexity(model, tokenizer, texts, max_length=max_length,
                                               tokenized=ids(tokenizer), **kwargs)


def probe_scorer(probes: Sequence[Probe], **kwargs) -> Scorer:
    encoded = _PerTokenizer(lambda tokenizer: probe_encoding(tokenizer, probes))
    return lambda model, tokenizer: probe_accuracy(model, tokenizer, probes, encoded=encoded(tokenizer), **kwargs)


LAYER_RANGE = re.compile(r"^layers:(\d+)-(\d+)$")


def with_parameter(config: MergeConfig, parameter: str, value, layers: Optional[int] = None,
                   filters: Optional[tuple[str, str]] = None) -> MergeConfig:
    """A copy of `config` with one parameter set everywhere it applies.

    `name` sets a top-level parameter (replacing a gradient or filter list by the value);
    `name@model` sets it in that model's own parameters (in `models` or slice sources);
    `name@layers:a-b` sets it on layers a..b (inclusive) for every module type and keeps
    every other layer's current value (`layers`: the merge's layer count, found from the
    models when not given).
    """
    name, _, model = parameter.partition("@")
    changed = copy.deepcopy(config)
    layer_range = LAYER_RANGE.match(model)
    if layer_range:
        from .layer_values import edit_range, expand, points_from_config, with_layer_points

        first, last = int(layer_range[1]), int(layer_range[2])
        if layers is None or filters is None:
            layers, filters = layer_facts(config)
        if (config.parameters or {}).get(name) is None:
            raise MergeError(f"the recipe sets no top-level '{name}' to change on layers {first}-{last}")
        per_module = [edit_range(expand(points, layers), "set", first, last, float(value), low=None, high=None)
                      for points in points_from_config(config, name, filters)]
        return with_layer_points(changed, name, *per_module, filters=filters)
    if not model:
        changed.parameters = {**(changed.parameters or {}), name: value}
        changed.drop_shadowing(name)  # a slice's or module's own value would shadow it
    else:
        entries = changed.model_entries()
        targets = [e for e in entries if e.model == model]
        if not targets:
            raise MergeError(f"no model '{model}' in the recipe to set '{name}' for")
        for entry in targets:
            entry.parameters = {**(entry.parameters or {}), name: value}
    changed.check()
    return changed


def sweep_points(config, parameter: str, values: Sequence) -> list[MergeConfig]:
    """The recipe at each value (see `with_parameter`), every one checked before any work."""
    config = load_config(config)
    layers = filters = None
    if LAYER_RANGE.match(parameter.partition("@")[2]):
        layers, filters = layer_facts(config)  # once, not per point
    return [with_parameter(config, parameter, value, layers, filters) for value in values]


def layer_facts(config) -> tuple[int, tuple[str, str]]:
    """The merge's text layers and the (attention, MLP) filters that match its blocks."""
    from .layer_values import module_filters
    from .pipeline import plan_stages

    plan = plan_stages(config)[0]
    return plan.num_layers, module_filters(plan)


def iter_sweep(config, parameter: str, values: Sequence, scorers: dict[str, Scorer], *, live=None,
               device: str = "auto", build: Optional[Callable[[MergeConfig], object]] = None) -> Iterator[dict]:
    """The rows of `sweep`, one as each point finishes: the work happens as the caller asks
    for the next row, in the caller's thread, so a caller that stops asking stops the sweep.
    `build(point)` makes the LiveMerge for the first point when no `live` is given."""
    from .live import LiveMerge

    build = build or (lambda point: LiveMerge(point, device=device))
    for value, point in zip(values, sweep_points(config, parameter, values)):
        started = time.perf_counter()
        if live is None:
            live = build(point)
        else:
            live.update(point)
        row = {"value": value, "update_seconds": time.perf_counter() - started, "recipe": point.to_yaml()}
        for name, scorer in scorers.items():
            row[name] = scorer(live.model, live.tokenizer)
        yield row


def sweep(config, parameter: str, values: Sequence, scorers: dict[str, Scorer], *, live=None,
          device: str = "auto", progress: Optional[Callable[[int, int, dict], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> list[dict]:
    """Score the merge at each value of `parameter` (see `with_parameter`).

    The LiveMerge (made here, or `live`) is updated in place from value to value. Returns
    one row per value: {"value", each scorer's name: score, "update_seconds", "recipe"
    (the point's YAML)}.
    `progress(done, total, row)` follows each point; `should_stop()` ends the sweep early.
    """
    rows = []
    for row in iter_sweep(config, parameter, values, scorers, live=live, device=device):
        rows.append(row)
        if progress is not None:
            progress(len(rows), len(values), row)
        if should_stop is not None and should_stop():
            break
    return rows
