"""merging.search: CMA-ES over a recipe's parameters finds what the objectives ask for, is
repeatable and resumable from the History, answers bad input in one line before any work,
and gives the same search on Ray workers (one of them dying) as in one process."""

from __future__ import annotations

import os
import sys

import pytest

from helpers import run_cli
from merging.errors import MergeError
from merging.history import History
from merging.live import LiveMerge
from merging.search import Budget, Objective, parse_objective, parse_space, search

SLERP = "models:\n  - model: {c1}\nmerge_method: slerp\nbase_model: {base}\nparameters:\n  t: {t}\ndtype: float32\n"
TIES = ("models:\n  - model: {c1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {c2}\n"
        "    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\nbase_model: {base}\ndtype: float32\n")
PROBE = "model.layers.0.mlp.up_proj.weight"


def recipe(tiny, t=0.5) -> str:
    return SLERP.format(c1=tiny.path("c1"), base=tiny.path("base"), t=t)


class Closeness:
    """Higher the nearer one weight is to its value in the recipe at `t` (a known optimum)."""

    def __init__(self, tiny, t: float):
        live = LiveMerge(recipe(tiny, t), device="cpu")
        self.target = live.model.get_parameter(PROBE).detach().clone()

    def __call__(self, model, tokenizer) -> float:
        return -float((model.get_parameter(PROBE).detach() - self.target).abs().mean())


class DiesOnce(Closeness):
    """Closeness, but the first call anywhere ends its process (a worker lost mid-evaluation)."""

    def __init__(self, tiny, t: float, marker: str):
        super().__init__(tiny, t)
        self.marker = marker

    def __call__(self, model, tokenizer) -> float:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(model, tokenizer)


def test_the_search_finds_the_optimum_and_repeats_with_its_seed(tiny):
    space = parse_space(recipe(tiny), ["t"])
    objectives = [Objective("close", Closeness(tiny, 0.3))]
    first = search(space, objectives, Budget(evaluations=24), seed=3, device="cpu")
    assert len(first.evaluations) == 24 and "24 evaluations" in first.stopped
    assert abs(first.best.values["t"] - 0.3) < 0.02, first.best.values
    again = search(space, objectives, Budget(evaluations=24), seed=3, device="cpu")
    assert [(e.values, e.scores) for e in again.evaluations] == [(e.values, e.scores) for e in first.evaluations]
    import numpy as np

    np.random.seed(99)  # numpy's global generator is neither used nor touched
    state = np.random.get_state()[1].copy()
    also = search(space, objectives, Budget(evaluations=24), seed=3, device="cpu")
    assert (np.random.get_state()[1] == state).all()
    assert [e.values for e in also.evaluations] == [e.values for e in first.evaluations]
    other = search(space, objectives, Budget(evaluations=24), seed=4, device="cpu")
    assert [e.values for e in other.evaluations] != [e.values for e in first.evaluations]
    # the best candidate's recipe merges to the weights it was scored on
    best = LiveMerge(first.best.recipe, device="cpu")
    assert objectives[0].scorer(best.model, best.tokenizer) == first.best.scores["close"]


def test_every_kind_of_parameter_lands_where_it_says(tiny):
    text = TIES.format(c1=tiny.path("c1"), c2=tiny.path("c2"), base=tiny.path("base"))
    space = parse_space(text, [f"weight@{tiny.path('c1')}=0:2", f"density@{tiny.path('c2')}", "lambda=0.5:1.5"])
    assert space.size == 3
    values = space.values([0.25, 1.0, 0.5])
    assert values == {f"weight@{tiny.path('c1')}=0:2": 0.5, f"density@{tiny.path('c2')}": 1.0, "lambda=0.5:1.5": 1.0}
    config = space.recipe(values)
    assert config.models[0].parameters["weight"] == 0.5 and config.models[1].parameters["density"] == 1.0
    assert config.parameters["lambda"] == 1.0

    points = parse_space(recipe(tiny), ["t@points:3", "t@layers:1-2"])
    config = points.recipe(points.values([0.0, 0.5, 1.0, 0.2]))
    from merging.evaluate import layer_facts
    from merging.layer_values import expand, points_from_config

    layers, filters = layer_facts(config)
    for module_points in points_from_config(config, "t", filters):  # the gradient, then layers 1-2 set
        assert [round(v, 4) for v in expand(module_points, layers)] == [0.0, 0.2, 0.2, 1.0]


@pytest.mark.parametrize("spec, said", [
    ("density", "slerp has no numeric parameter 'density'"),
    ("t=0:2", "must stay within"),
    ("t=0.9:0.1", "low below high"),
    ("t@points:1", "between 2 and 64 control points"),
    ("t@layers:2-9", "layers run 0-3"),
    ("t@somemodel", "one value for the whole merge"),
    ("t; rm -rf", "is not NAME"),
])
def test_a_parameter_the_recipe_cannot_take_is_named(tiny, spec, said):
    with pytest.raises(MergeError, match=said):
        parse_space(recipe(tiny), [spec])


def test_model_parameters_need_their_model_and_bounds(tiny):
    text = TIES.format(c1=tiny.path("c1"), c2=tiny.path("c2"), base=tiny.path("base"))
    with pytest.raises(MergeError, match="no model '/nowhere'"):
        parse_space(text, ["density@/nowhere"])
    with pytest.raises(MergeError, match="has no bounds of its own"):
        parse_space(text, [f"weight@{tiny.path('c1')}"])
    with pytest.raises(MergeError, match="each model's own"):
        parse_space(text, ["density"])


def test_objectives_and_budgets_are_checked(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for spec, said in [(f"perplexity:{empty}", "has no texts"), ("perplexity:/no/such/file", "no file"),
                       ("probes:math", "the probe sets are"), ("accuracy", "is not probes:SKILL")]:
        with pytest.raises(MergeError, match=said):
            parse_objective(spec)
    assert parse_objective("probes:json:5").name == "json probes"
    for budget, said in [(Budget(), "give the search a budget"), (Budget(evaluations=0), "at least 1"),
                         (Budget(seconds=-1), "more than 0")]:
        with pytest.raises(MergeError, match=said):
            budget.check()


def test_a_search_resumes_from_its_records(tiny, tmp_path):
    space = parse_space(recipe(tiny), ["t@points:2"])
    objectives = [Objective("close", Closeness(tiny, 0.7))]
    history = History(tmp_path / "history.sqlite")
    partial = search(space, objectives, Budget(evaluations=7), seed=1, device="cpu", history=history, user="u")
    assert not any(e.recorded for e in partial.evaluations)
    resumed = search(space, objectives, Budget(evaluations=15), seed=1, device="cpu", history=history, user="u")
    assert [e.recorded for e in resumed.evaluations] == [True] * 7 + [False] * 8
    fresh = search(space, objectives, Budget(evaluations=15), seed=1, device="cpu")
    assert [(e.values, e.scores) for e in resumed.evaluations] == [(e.values, e.scores) for e in fresh.evaluations]
    assert history.get(resumed.evaluations[-1].entry, "u").kind == "search"
    with pytest.raises(MergeError):  # another user's records are not theirs to read
        history.get(resumed.evaluations[-1].entry, "someone else")


def test_two_objectives_give_their_pareto_front(tiny):
    space = parse_space(recipe(tiny), ["t"])
    objectives = [Objective("near 0.2", Closeness(tiny, 0.2)), Objective("near 0.8", Closeness(tiny, 0.8))]
    result = search(space, objectives, Budget(evaluations=20), seed=0, combine="min", device="cpu")
    front = result.front
    assert len(front) >= 3
    assert all(0.15 <= e.values["t"] <= 0.85 for e in front)  # well outside [0.2, 0.8] both get worse

    def dominates(a, b):
        return all(a.scores[n] >= b.scores[n] for n in a.scores) and any(a.scores[n] > b.scores[n] for n in a.scores)
    for evaluation in result.evaluations:
        beaten = any(dominates(other, evaluation) for other in result.evaluations)
        if evaluation in front:
            assert not beaten, evaluation.index
        else:  # beaten, or the same scores as a member (a candidate proposed again)
            assert beaten or any(f.scores == evaluation.scores for f in front), evaluation.index
    assert abs(result.best.values["t"] - 0.5) < 0.05  # the best worst case is halfway


def test_the_command_line_searches_and_says_what_is_wrong_in_one_line(tiny, tmp_path, capsys):
    config = tmp_path / "recipe.yml"
    config.write_text(recipe(tiny))
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\nthe dog ran\n")
    out = tmp_path / "best"
    done = run_cli("search", str(config), "--param", "t", "--objective", f"perplexity:{texts}", "--budget", "6",
                   "--history", str(tmp_path / "h.sqlite"), "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert "| rank | # | ppl texts | sum | parameters |" in done.stdout
    assert "6 evaluations (0 read back from the history)" in done.stderr
    assert (out / "best-1.yml").is_file() and "merge_method: slerp" in (out / "best-1.yml").read_text()
    again = run_cli("search", str(config), "--param", "t", "--objective", f"perplexity:{texts}", "--budget", "6",
                    "--history", str(tmp_path / "h.sqlite"))
    assert "6 evaluations (6 read back from the history)" in again.stderr
    assert again.stdout == done.stdout

    # mistakes, in this process (the same main() as `python -m merging`): one line each, exit 2
    from merging.__main__ import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for extra, said in [(["--param", "density"], "slerp has no numeric parameter 'density'"),
                        (["--objective", f"perplexity:{empty}"], "the file has no texts"),
                        (["--budget", "0"], "it needs at least 1"),
                        (["--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1")]:
        arguments = {"--param": "t", "--objective": f"perplexity:{texts}", "--budget": "3"}
        arguments.update(dict(zip(extra[::2], extra[1::2])))
        flat = [item for pair in arguments.items() for item in pair]
        capsys.readouterr()
        assert main(["search", str(config), *flat, "--no-history"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], lines


def test_ray_workers_give_the_same_search_and_survive_a_lost_worker(tiny, tmp_path):
    ray = pytest.importorskip("ray")
    from merging.search_ray import RayEvaluator

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    space = parse_space(recipe(tiny), ["t@points:2"])
    local = search(space, [Objective("close", Closeness(tiny, 0.6))], Budget(evaluations=12), seed=2, device="cpu")
    objectives = [Objective("close", DiesOnce(tiny, 0.6, str(tmp_path / "died")))]
    with RayEvaluator(objectives, workers=2) as evaluator:
        distributed = search(space, objectives, Budget(evaluations=12), seed=2, evaluator=evaluator)
        assert len(evaluator.actors) == 2
    assert (tmp_path / "died").exists()  # one worker did die mid-evaluation
    assert [(e.values, e.scores) for e in distributed.evaluations] == \
        [(e.values, e.scores) for e in local.evaluations]

