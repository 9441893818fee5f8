"""Automatic merge search: CMA-ES over a recipe's numeric parameters, each candidate
re-merged in place (a LiveMerge) and scored, so a candidate costs little more than its
scoring.

    space = parse_space(config, ["t@points:5=0:1", "density@MODEL"])
    objectives = [parse_objective("probes:json"), parse_objective("probes:reverse")]
    result = search(space, objectives, Budget(evaluations=40), seed=0, combine="min")
    result.best.recipe      # mergekit YAML of the best candidate
    result.front            # the evaluations no other one beats on every objective

A parameter is `NAME[@WHERE][=LOW:HIGH]`:
    t                  the top-level value (a gradient or filter list becomes one value)
    weight@MODEL       that model's own parameter
    t@layers:4-9       layers 4..9 set to one value; the other layers keep theirs
    t@points:5         a gradient of 5 control points over the layers: 5 dimensions
Bounds default to the method's (t and density: 0..1); a parameter the method does not
bound (weight) needs them.

CMA-ES (the `cma` package: bounded, derivative-free, good with a few to a few dozen
noisy-free continuous dimensions, what Sakana's evolutionary merge and mergekit-evolve
use) minimizes one number per candidate: the objectives, each oriented so that higher is
better (accuracies as they are, perplexities as -log), summed (`combine="sum"`) or their
worst (`"min"`: a candidate is as good as its weakest skill). Every evaluation is kept, and
with several objectives the Pareto front among them is the answer to "what trade-offs
exist". The same seed proposes the same candidates, and scores depend only on the
weights, so a search is exactly repeatable, and resumable: evaluations recorded in the
History (kind "search") are read back instead of scored again.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .config import MergeConfig, load_config
from .errors import MergeError

SPEC = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<where>[^=]+?))?(?:=(?P<low>[^:]+):(?P<high>.+))?$")
POINTS = re.compile(r"^points:(\d+)$")
MOST_POINTS = 64
DECIMALS = 4  # candidates' values are rounded: readable recipes, and equal recipes for equal values
SIGMA = 0.25  # CMA-ES's first step, in the unit cube every dimension is scaled to


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: `count` values (control points) in [low, high]."""

    spec: str
    name: str
    where: str  # "" (top level), a model, "layers:a-b" or "points:K"
    low: float
    high: float
    count: int = 1

    def values(self, unit: Sequence[float]):
        scaled = [round(self.low + (self.high - self.low) * min(1.0, max(0.0, float(u))), DECIMALS) for u in unit]
        return scaled if self.where.startswith("points:") else scaled[0]

    @property
    def parameter(self) -> str:
        """The parameter as `merging.evaluate.with_parameter` names it."""
        return self.name if not self.where or self.where.startswith("points:") else f"{self.name}@{self.where}"


@dataclass
class Space:
    """The searched parameters of a recipe: a point of the unit cube is one candidate recipe."""

    config: MergeConfig
    dimensions: list[Dimension]

    @property
    def size(self) -> int:
        return sum(d.count for d in self.dimensions)

    def values(self, unit: Sequence[float]) -> dict:
        """{spec: value (a list for control points)} at the unit-cube point."""
        result, offset = {}, 0
        for dimension in self.dimensions:
            result[dimension.spec] = dimension.values(unit[offset:offset + dimension.count])
            offset += dimension.count
        return result

    def recipe(self, values: dict) -> MergeConfig:
        """The recipe with every searched parameter set to `values` (checked)."""
        from .evaluate import layer_facts, with_parameter

        config = self.config
        facts = None
        for dimension in self.dimensions:
            if dimension.where.startswith("layers:") and facts is None:
                facts = layer_facts(self.config)
            config = with_parameter(config, dimension.parameter, values[dimension.spec], *(facts or (None, None)))
        return config


def parse_space(config, specs: Sequence[str]) -> Space:
    """The search space of `specs` over `config`, every mistake named before any work: a
    parameter the recipe's method does not have, a model it does not name, bounds missing
    or outside the method's, layers outside the model."""
    from .methods.registry import get_method
    from .evaluate import layer_facts

    config = load_config(config)
    if not isinstance(config, MergeConfig):
        raise MergeError("a search takes one merge recipe (run a multi-stage file's earlier stages first)")
    if not specs:
        raise MergeError("name at least one parameter to search, e.g. --param t=0:1")
    method = get_method(config.merge_method)
    known = {p.name: p for p in method.parameters}
    dimensions, seen = [], set()
    layers = None
    for spec in specs:
        spec = spec.strip()
        match = SPEC.match(spec)
        if match is None:
            raise MergeError(f"search parameter '{spec}' is not NAME[@MODEL|@layers:A-B|@points:K][=LOW:HIGH]")
        name, where = match["name"], (match["where"] or "").strip()
        parameter = known.get(name)
        if parameter is None or parameter.kind not in (float, int):
            numeric = ", ".join(sorted(n for n, p in known.items() if p.kind in (float, int))) or "none"
            raise MergeError(f"search parameter '{spec}': {config.merge_method} has no numeric parameter "
                             f"'{name}' (it has: {numeric})")
        count = 1
        points = POINTS.match(where)
        if points:
            count = int(points[1])
            if not 2 <= count <= MOST_POINTS:
                raise MergeError(f"search parameter '{spec}': between 2 and {MOST_POINTS} control points")
        if where and not points and not where.startswith("layers:") and not parameter.per_model:
            raise MergeError(f"search parameter '{spec}': '{name}' is one value for the whole merge, "
                             "not a model's own (write it without @MODEL)")
        if parameter.per_model and (not where or points or where.startswith("layers:")):
            raise MergeError(f"search parameter '{spec}': '{name}' is each model's own: write {name}@MODEL")
        if where.startswith("layers:"):
            layers = layers or layer_facts(config)[0]
            bounds = re.fullmatch(r"layers:(\d+)-(\d+)", where)
            if bounds is None or not int(bounds[1]) <= int(bounds[2]) < layers:
                raise MergeError(f"search parameter '{spec}': layers run 0-{layers - 1}, as layers:A-B")
        try:
            low = float(match["low"]) if match["low"] is not None else parameter.low
            high = float(match["high"]) if match["high"] is not None else parameter.high
        except ValueError:
            raise MergeError(f"search parameter '{spec}': bounds are numbers, as {name}=0.1:0.9") from None
        if low is None or high is None:
            raise MergeError(f"search parameter '{spec}': {config.merge_method}'s '{name}' has no bounds of its "
                             f"own; give them, as {spec.split('=')[0]}=0:1")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise MergeError(f"search parameter '{spec}': the bounds must be finite, low below high")
        if (parameter.low is not None and low < parameter.low) or (parameter.high is not None and high > parameter.high):
            raise MergeError(f"search parameter '{spec}': {name} must stay within "
                             f"[{parameter.low}, {parameter.high}]")
        key = (name, where.split(":")[0] if points else where)
        if key in seen:
            raise MergeError(f"search parameter '{spec}' is given twice")
        seen.add(key)
        dimensions.append(Dimension(spec, name, where, low, high, count))
    space = Space(config, dimensions)
    from .limits import check

    check("search_dimensions", space.size, f"the search has {space.size} dimensions")
    space.recipe(space.values([0.5] * space.size))  # a model the recipe does not name fails here, at once
    return space


# ---- objectives ------------------------------------------------------------------
@dataclass
class Objective:
    """A score of the merged model: `scorer(model, tokenizer) -> float`; `maximize` False
    for a perplexity (lower is better). `spec` rebuilds it elsewhere (a Ray worker)."""

    name: str
    scorer: Callable[[object, object], float]
    maximize: bool = True
    spec: Optional[str] = None

    def oriented(self, value: float) -> float:
        """Higher is better: the value, or -log of a perplexity."""
        if self.maximize:
            return value
        return -math.log(value) if value > 0 else math.inf


def parse_objective(spec: str) -> Objective:
    """`probes:SKILL[:N]` (a demo skill's held-out probes: exact-match accuracy) or
    `perplexity:FILE` (one text a line; lower is better)."""
    from .limits import check

    kind, _, rest = spec.partition(":")
    if kind == "probes":
        from .demo_skills import SKILLS, probes
        from .evaluate import probe_scorer

        skill, _, count = rest.partition(":")
        if skill not in SKILLS:
            raise MergeError(f"objective '{spec}': the probe sets are {', '.join(sorted(SKILLS))}")
        try:
            number = int(count) if count else 20
        except ValueError:
            raise MergeError(f"objective '{spec}': the probe count is a whole number") from None
        if number < 1:
            raise MergeError(f"objective '{spec}': at least one probe")
        check("probes", number, f"objective '{spec}' asks for {number} probes")
        return Objective(f"{skill} probes", probe_scorer(probes(skill, number)), True, spec)
    if kind == "perplexity":
        from .evaluate import perplexity_scorer

        path = Path(rest)
        if not rest or not path.is_file():
            raise MergeError(f"objective '{spec}': no file '{rest}' of texts to score")
        size = path.stat().st_size
        check("score_bytes", size, f"objective '{spec}': the file is {size} bytes")
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise MergeError(f"objective '{spec}': the file has no texts (one a line)")
        check("score_lines", len(lines), f"objective '{spec}' has {len(lines)} texts")
        return Objective(f"ppl {path.stem}", perplexity_scorer(lines), False, spec)
    raise MergeError(f"objective '{spec}' is not probes:SKILL[:N] or perplexity:FILE")


# ---- the search ------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """When a search stops: after `evaluations`, or once `seconds` have passed (either)."""

    evaluations: Optional[int] = None
    seconds: Optional[float] = None

    def check(self) -> None:
        if self.evaluations is None and self.seconds is None:
            raise MergeError("give the search a budget: a number of evaluations, seconds, or both")
        if self.evaluations is not None and self.evaluations < 1:
            raise MergeError(f"the search's budget is {self.evaluations} evaluations; it needs at least 1")
        if self.evaluations is not None:
            from .limits import check

            check("search_evaluations", self.evaluations, f"the search's budget is {self.evaluations} evaluations")
        if self.seconds is not None and not self.seconds > 0:
            raise MergeError(f"the search's budget is {self.seconds} seconds; it needs more than 0")


@dataclass
class Evaluation:
    index: int
    values: dict  # {spec: value}
    scores: dict  # {objective name: score}
    fitness: float  # the combined score (higher is better)
    recipe: str  # the candidate as mergekit YAML
    seconds: float  # merging and scoring it (0 when read back from the History)
    recorded: bool = False  # read back from the History, not scored again
    entry: Optional[int] = None  # its History id
    repeats: Optional[int] = None  # the earlier evaluation of the same recipe (not scored again)


@dataclass
class SearchResult:
    evaluations: list[Evaluation] = field(default_factory=list)
    objectives: list[str] = field(default_factory=list)
    maximize: dict = field(default_factory=dict)
    seconds: float = 0.0
    stopped: str = ""  # why it ended

    @property
    def best(self) -> Optional[Evaluation]:
        return max(self.evaluations, key=lambda e: e.fitness, default=None)

    def ranked(self) -> list[Evaluation]:
        return sorted(self.evaluations, key=lambda e: (-e.fitness, e.index))

    @property
    def front(self) -> list[Evaluation]:
        """The evaluations no other one matches or beats on every objective and beats on one."""
        def oriented(e):
            return [e.scores[n] if self.maximize[n] else -e.scores[n] for n in self.objectives]
        points = [(e, oriented(e)) for e in self.evaluations]
        front = []
        for e, p in points:
            beaten = any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for _, q in points)
            if not beaten and not any(oriented(f) == p for f in front):
                front.append(e)
        return sorted(front, key=lambda e: e.index)


Evaluator = Callable[[list[MergeConfig]], list[tuple[dict, float]]]  # recipes -> [(scores, seconds)]


class LocalEvaluator:
    """Scores candidates one after another on one LiveMerge, re-merged in place."""

    def __init__(self, objectives: list[Objective], device: str = "auto", live=None, build=None):
        self.objectives = objectives
        self.device = device
        self.live = live
        self.build = build

    def __call__(self, candidates: list[MergeConfig]) -> list[tuple[dict, float]]:
        from .live import LiveMerge

        results = []
        for candidate in candidates:
            started = time.perf_counter()
            if self.live is None:
                self.live = (self.build or (lambda c: LiveMerge(c, device=self.device)))(candidate)
            else:
                self.live.update(candidate)
            scores = {o.name: float(o.scorer(self.live.model, self.live.tokenizer)) for o in self.objectives}
            results.append((scores, time.perf_counter() - started))
        return results


def combined(objectives: list[Objective], scores: dict, combine: str) -> float:
    values = [o.oriented(scores[o.name]) for o in objectives]
    return min(values) if combine == "min" else sum(values)


def _cma():
    import warnings

    # `import cma` warns once that it cannot plot without matplotlib (plots here are plotly)
    warnings.filterwarnings("ignore", message="Could not import matplotlib", module="cma")
    import cma

    return cma


def _evaluate(points: list, space: Space, objectives: list[Objective], combine: str, evaluator, history, user: str,
              result: SearchResult) -> list[Evaluation]:
    """Evaluations of the candidates at `points`: read back from the History when recorded
    there with every objective's score, else scored by `evaluator` (and recorded)."""
    names = [o.name for o in objectives]
    values = [space.values(p) for p in points]
    texts = [space.recipe(v).to_yaml() for v in values]
    known: dict[int, tuple] = {}
    earlier = {e.recipe: e for e in result.evaluations}
    for position, text in enumerate(texts):
        if text in earlier:  # CMA-ES proposed a candidate again (values are rounded): its scores stand
            same = earlier[text]
            known[position] = (same.scores, 0.0, same.recorded, same.entry, same.repeats or same.index)
            continue
        entry = history.find(user, text) if history is not None else None
        if entry is not None and entry.kind == "search" and all(n in entry.scores for n in names):
            known[position] = ({n: entry.scores[n] for n in names}, 0.0, True, entry.id, None)
    pending = [position for position in range(len(points)) if position not in known]
    first = {}  # a recipe twice in one generation is scored once
    for position in list(pending):
        if texts[position] in first:
            pending.remove(position)
        else:
            first[texts[position]] = position
    if pending:
        scored = evaluator([load_config(texts[position]) for position in pending])
        for position, (scores, seconds) in zip(pending, scored):
            entry = history.record(user, texts[position], "search", scores) if history is not None else None
            known[position] = (scores, seconds, False, entry, None)
    evaluations = []
    for position, text in enumerate(texts):
        if position not in known:  # the same recipe as an earlier candidate of this generation
            scores, _, recorded, entry, _ = known[first[text]]
            known[position] = (scores, 0.0, recorded, entry, len(result.evaluations) + first[text] + 1)
        scores, seconds, recorded, entry, repeats = known[position]
        evaluations.append(Evaluation(len(result.evaluations) + len(evaluations) + 1, values[position], scores,
                                      combined(objectives, scores, combine), text, seconds, recorded, entry,
                                      repeats))
    return evaluations


def search(space: Space, objectives: list[Objective], budget: Budget, *, seed: int = 0,
           combine: str = "sum", population: Optional[int] = None, evaluator: Optional[Evaluator] = None,
           device: str = "auto", history=None, user: str = "local",
           progress: Optional[Callable[[Evaluation, SearchResult], None]] = None,
           should_stop: Optional[Callable[[], bool]] = None) -> SearchResult:
    """Search `space` for the recipe that scores best on `objectives` (see the module).

    `evaluator(candidates)` scores a generation's recipes (default: one LiveMerge here;
    merging.search_ray spreads them over Ray workers); `history` (a History) records every
    evaluation under `user` and supplies those already recorded; `progress(evaluation,
    result)` follows each one; `should_stop()` ends the search between evaluations."""
    result = None
    for evaluation, result in iter_search(space, objectives, budget, seed=seed, combine=combine,
                                          population=population, evaluator=evaluator, device=device,
                                          history=history, user=user):
        if progress is not None:
            progress(evaluation, result)
        if should_stop is not None and should_stop():
            result.stopped = "stopped"
            break
    return result if result is not None else _empty_result(objectives)


def iter_search(space: Space, objectives: list[Objective], budget: Budget, *, seed: int = 0, combine: str = "sum",
                population: Optional[int] = None, evaluator: Optional[Evaluator] = None, device: str = "auto",
                history=None, user: str = "local") -> Iterator[tuple[Evaluation, SearchResult]]:
    """The search as (evaluation, result so far) pairs, one as each evaluation finishes: the
    work happens as the caller asks for the next, in the caller's thread, so a caller that
    stops asking stops the search. Everything is checked before the first evaluation."""
    budget.check()
    if not objectives:
        raise MergeError("give the search at least one objective")
    if len({o.name for o in objectives}) != len(objectives):
        raise MergeError("two objectives have the same name")
    if combine not in ("sum", "min"):
        raise MergeError(f"objectives combine by 'sum' or 'min', not '{combine}'")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32 - 1:
        raise MergeError(f"the search's seed is {seed!r}; it is a whole number from 0 to {2**32 - 2}")
    if population is not None and not 2 <= population <= 256:
        raise MergeError(f"a generation of {population} candidates: between 2 and 256")
    return _search(space, objectives, budget, seed, combine, population,
                   evaluator or LocalEvaluator(objectives, device), history, user)


def _empty_result(objectives: list[Objective]) -> SearchResult:
    return SearchResult(objectives=[o.name for o in objectives], maximize={o.name: o.maximize for o in objectives})


def _search(space, objectives, budget, seed, combine, population, evaluator, history, user):
    cma = _cma()
    result = _empty_result(objectives)
    # CMA-ES's draws come from this search's own generator: pycma's `seed` would reseed numpy's
    # global one, which other requests (and other searches) share
    generator = np.random.default_rng(seed)
    options = {"bounds": [0.0, 1.0], "seed": float("nan"), "randn": lambda *shape: generator.standard_normal(shape),
               "verbose": -9, "tolx": 1e-4, "tolfun": 1e-6}
    if population:
        options["popsize"] = population
    # pycma's one-dimensional case fails inside its step-size adaptation ("not yet initialized
    # (dimension needed)") on some runs: one parameter is searched with a second, unused one
    strategy = cma.CMAEvolutionStrategy([0.5] * max(2, space.size), SIGMA, options)
    started = time.perf_counter()

    def out_of_budget() -> str:
        if budget.evaluations is not None and len(result.evaluations) >= budget.evaluations:
            return f"the budget of {budget.evaluations} evaluations is spent"
        if budget.seconds is not None and time.perf_counter() - started >= budget.seconds:
            return f"the budget of {budget.seconds:g} s is spent"
        return ""

    while not result.stopped:
        if strategy.stop():
            result.stopped = "CMA-ES converged (" + ", ".join(sorted(strategy.stop())) + ")"
            break
        points = [list(p) for p in strategy.ask()]
        fitnesses = []
        # a parallel evaluator takes the whole generation; otherwise one candidate at a time,
        # so the budget is looked at between evaluations
        for group in [points] if getattr(evaluator, "parallel", False) else [[p] for p in points]:
            result.stopped = out_of_budget()
            if result.stopped:
                break
            if budget.evaluations is not None:
                group = group[:budget.evaluations - len(result.evaluations)]
            for evaluation in _evaluate(group, space, objectives, combine, evaluator, history, user, result):
                result.evaluations.append(evaluation)
                fitnesses.append(-evaluation.fitness)
                result.seconds = time.perf_counter() - started
                yield evaluation, result
        if len(fitnesses) == len(points):  # a generation cut short by the budget is not told
            strategy.tell(points, fitnesses)
        result.stopped = result.stopped or out_of_budget()
