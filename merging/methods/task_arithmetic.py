"""The task-vector family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

One routine serves them all (the table in docs of merge-methods): for each model
d_i = x_i - b; prune d_i; weight it; optionally elect signs; combine:

    s      = sign(sum_i w_i d~_i)            (0 counts as +, only with a sign vote)
    m_i    = [sign(w_i d~_i) == s]            (pruned zeros never match)
    mixed  = sum_i m_i w_i d~_i
    mixed /= sum_i m_i w_i  (vote) or sum_i w_i (no vote), when `normalize`
    result = b + lambda * mixed

Weights are applied before the vote, as mergekit does (the TIES paper votes on raw
task vectors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import MergeError
from . import fused, sparsify
from .registry import (
    BASE_REQUIRED,
    Elementwise,
    Method,
    Parameter,
    TensorInputs,
    register,
    weight_parameter,
)


@dataclass(frozen=True)
class Family:
    pruning: Optional[str]  # None, "magnitude", "random", "outliers", "della"
    sign_vote: bool
    normalize: bool
    rescale: bool


def prune(task_vector: torch.Tensor, pruning: Optional[str], params: dict, inputs: TensorInputs, index: int,
          rescale_mode: Optional[str]) -> torch.Tensor:
    """models[index]'s task vector pruned (and rescaled), with whole-tensor torch operations."""
    density = params.get("density", 1.0)
    if pruning is None:
        return task_vector
    if pruning == "magnitude":
        pruned = sparsify.magnitude(task_vector, density)
    elif pruning == "outliers":
        pruned = sparsify.magnitude_outliers(task_vector, density, params["gamma"])
    elif pruning == "random":
        pruned = sparsify.random_keep(task_vector, density, inputs.stream_key(index))
    elif pruning == "della":
        pruned = sparsify.della_magprune(task_vector, density, params["epsilon"], inputs.stream_key(index))
    else:
        raise ValueError(pruning)
    if density >= 1 or pruned is task_vector:
        return pruned
    return sparsify.rescale(task_vector, pruned, rescale_mode, density)


def _pruning_key(inputs: TensorInputs, index: int, family: Family, rescale_mode: Optional[str], kind: str):
    """Everything a pruned task vector (kind "pruned") or its rule (kind "rule") depends
    on; its weight is applied after pruning."""
    if family.pruning is None or inputs.keys is None:
        return None
    settings = tuple(sorted((k, v) for k, v in inputs.model_params[index].items() if k != "weight"))
    seed = inputs.seed if family.pruning in ("random", "della") else None
    return (kind, inputs.keys[index], inputs.keys[-1], family.pruning, settings, rescale_mode, seed)


def sign_mask(weighted: torch.Tensor) -> torch.Tensor:
    """m_i = [sign(w_i d_i) == s] with s = sign(sum_i w_i d_i), 0 counted as +."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    return weighted.sign() == majority


def _rescale_mode(params: dict) -> Optional[str]:
    if not params.get("rescale", False):
        return None
    return "inverse_density" if params.get("rescale_mode") == "inverse_density" else "l1"


def combine(inputs: TensorInputs, family: Family) -> torch.Tensor:
    """The family's merge: fused kernels on the CPU, whole-tensor torch elsewhere."""
    if not inputs.models:
        return inputs.base.float()
    if fused.available(inputs.base):
        return combine_fused(inputs, family)
    return combine_reference(inputs, family)


def combine_reference(inputs: TensorInputs, family: Family) -> torch.Tensor:
    """The math of the module docstring, on whole float32 tensors."""
    base = inputs.base.float()
    params = inputs.params
    rescale_mode = _rescale_mode(params)
    weights = inputs.per_model("weight")
    weighted = torch.empty((len(inputs.models), *base.shape), dtype=base.dtype, device=base.device)
    for index, (model, model_params) in enumerate(zip(inputs.models, inputs.model_params)):
        def pruned(model=model, model_params=model_params, index=index):
            return prune(model.float() - base, family.pruning, model_params, inputs, index, rescale_mode)
        task_vector = inputs.cached(_pruning_key(inputs, index, family, rescale_mode, "pruned"), pruned)
        torch.mul(task_vector, weights[index], out=weighted[index])
    weight_column = torch.tensor(weights, dtype=base.dtype, device=base.device).reshape(
        (-1,) + (1,) * base.dim())
    if family.sign_vote:
        mask = sign_mask(weighted)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (weight_column * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weight_column.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params["normalize"]:
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return base + mixed


def combine_fused(inputs: TensorInputs, family: Family) -> torch.Tensor:
    """combine_reference's result from methods.fused: one pass over the stored inputs, with
    each model's pruning kept as a Rule (cached: a weight change reuses it)."""
    tensors = [inputs.base, *inputs.models]
    if len({t.dtype for t in tensors}) > 1:  # mixed storage: widen all to float32
        tensors = [t.float() for t in tensors]
    base = fused.source_array(tensors[0])
    models = tuple(fused.source_array(t) for t in tensors[1:])
    rescale_mode = _rescale_mode(inputs.params)
    rules = []
    for index in range(len(models)):
        def rule(index=index):
            return _rule(inputs, index, family, base, models[index], rescale_mode)
        found = inputs.cached(_pruning_key(inputs, index, family, rescale_mode, "rule"), rule)
        if found.kind == fused.RANKED:  # its ranks are cached on their own (a new density reuses them)
            found = dataclasses.replace(found, ranks=_ranks(inputs, index, base, models[index]))
        rules.append(found)
    out = fused.output_array(inputs.out) if inputs.out is not None else None
    merged = fused.combine(base, models, rules, inputs.per_model("weight"), family.sign_vote,
                           inputs.params["normalize"], inputs.params["lambda"], out)
    return inputs.out if merged is None else merged.reshape(inputs.base.shape)


def _ranks(inputs: TensorInputs, index: int, base, model) -> np.ndarray:
    """models[index]'s DELLA ranks (sparsify.della_ranks), flat: a radix sort per row for
    vectors and matrices; torch's sort along dimension 1 for more dimensions."""
    shape = inputs.base.shape

    def compute():
        if len(shape) <= 2:
            return fused.row_ranks(base, model, shape[-1])
        task_vector = inputs.models[index].float() - inputs.base.float()
        return sparsify.della_ranks(task_vector).reshape(-1).to(torch.int32).numpy()
    key = ("ranks", inputs.keys[index], inputs.keys[-1]) if inputs.keys else None
    return inputs.cached(key, compute)


def _rule(inputs: TensorInputs, index: int, family: Family, base, model,
          rescale_mode: Optional[str]) -> fused.Rule:
    """How models[index] is pruned and rescaled (the rules of `prune`, as data)."""
    params = inputs.model_params[index]
    density = params.get("density", 1.0)
    if family.pruning is None or density >= 1:
        return fused.Rule()
    count = len(base)

    def histogram():
        key = ("histogram", inputs.keys[index], inputs.keys[-1]) if inputs.keys else None
        return inputs.cached(key, lambda: fused.key_histogram(base, model))

    empty = (fused.NO_EDGE, 0, fused.NO_EDGE, 0)
    if family.pruning == "magnitude":  # the top max(1, int(density N)) by |d|
        edges = (fused.window_rule(base, model, 0, max(1, int(density * count)), True, histogram)
                 if density > 0 else empty)
        rule = fused.Rule(fused.WINDOW, True, edges)
    elif family.pruning == "outliers":  # ranks [n_bot, n_bot + keep) by ascending |d|
        keep, top = int(density * count), int(params["gamma"] * count)
        start = max(0, count - keep - top)
        stop = min(count, start + keep)
        edges = fused.window_rule(base, model, start, stop, False, histogram) if start < stop else empty
        rule = fused.Rule(fused.WINDOW, False, edges)
    elif family.pruning == "random":
        rule = fused.Rule(fused.HASH, key=inputs.stream_key(index), threshold=sparsify.keep_threshold(density))
    elif density <= 0:  # della keeps nothing
        rule = fused.Rule(fused.WINDOW, edges=empty)
    else:  # della: keep probabilities from the ranks of |d| along dimension 1
        shape = inputs.base.shape
        rule = fused.Rule(fused.RANKED, key=inputs.stream_key(index), width=shape[1] if len(shape) > 1 else shape[0],
                          low=density - params["epsilon"], spread=2 * params["epsilon"],
                          ranks=_ranks(inputs, index, base, model))
    if rescale_mode == "inverse_density":
        rule = dataclasses.replace(rule, scale_mode=fused.DIVIDE, density=density)
    elif rescale_mode == "l1":
        before, after = fused.abs_sums(base, model, rule)
        if before >= 1e-7 and after >= 1e-7:
            rule = dataclasses.replace(rule, scale_mode=fused.MULTIPLY, scale=before / after)
    return dataclasses.replace(rule, ranks=None)  # the cache keeps ranks once, on their own


def task_arithmetic_coefficients(sums, inputs: TensorInputs) -> list[float]:
    """c_i = lambda w_i (/ sum_j w_j when normalize), so that result = b + sum_i c_i d_i."""
    weights = inputs.per_model("weight")
    divisor = sum(weights) if inputs.params["normalize"] else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    return [inputs.params["lambda"] * w / divisor for w in weights]


def task_arithmetic_combine(inputs: TensorInputs, coefficients: list[float], out: torch.Tensor) -> torch.Tensor:
    out.copy_(inputs.base)
    for model, coefficient in zip(inputs.models, coefficients):
        out.add_(model - inputs.base, alpha=coefficient)
    return out


def _check_della(params: dict, model_params: list[dict], where: str) -> None:
    for values in model_params:
        density, epsilon = values["density"], values["epsilon"]
        if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise MergeError(f"della needs 0 < density-epsilon and density+epsilon < 1{where}; "
                             f"got density={density:g}, epsilon={epsilon:g}")


def _family_method(name: str, summary: str, family: Family, reference: str) -> Method:
    parameters = [
        weight_parameter(help="scale of this model's task vector"),
        Parameter("normalize", bool, family.normalize,
                  help="divide the sum by the total weight (of the sign-agreeing models)"),
        Parameter("lambda", float, 1.0, help="scale of the combined task vector"),
    ]
    if family.pruning is not None:
        parameters.append(Parameter("density", float, 1.0, per_model=True, low=0.0, high=1.0,
                                    help="fraction of the task vector's entries kept"))
    if family.pruning is not None:
        parameters.append(Parameter("rescale", bool, family.rescale,
                                    help="rescale kept entries to make up for the pruned ones"))
        parameters.append(Parameter("rescale_mode", str, "l1", choices=("l1", "inverse_density"),
                                    help="l1: match the task vector's L1 norm (mergekit); "
                                         "inverse_density: multiply by 1/density (DARE paper)"))
    if family.pruning == "outliers":
        parameters.append(Parameter("gamma", float, 0.01, per_model=True, low=0.0, high=1.0,
                                    help="fraction of largest entries dropped as outliers"))
    if family.pruning == "della":
        parameters.append(Parameter("epsilon", float, 0.15, per_model=True, low=0.0, high=0.5,
                                    help="spread of keep probabilities around density"))
    if family.sign_vote:
        parameters.append(Parameter("int8_mask", bool, False,
                                    help="accepted for mergekit compatibility; no effect here"))
    elementwise = None
    if family.pruning is None and not family.sign_vote:
        elementwise = Elementwise(task_arithmetic_combine, task_arithmetic_coefficients)
    return Method(
        name, summary, None if elementwise else (lambda inputs: combine(inputs, family)), tuple(parameters),
        base=BASE_REQUIRED, min_models=1, random=family.pruning in ("random", "della"),
        check=_check_della if family.pruning == "della" else None, reference=reference,
        elementwise=elementwise, stored_inputs=elementwise is None)


FAMILIES: dict[str, Family] = {}

for _name, _summary, _family, _reference in (
    ("task_arithmetic", "base plus the weighted sum of task vectors",
     Family(None, False, False, False), "https://arxiv.org/abs/2212.04089"),
    ("ties", "task vectors pruned to their largest entries, signs elected, then averaged",
     Family("magnitude", True, True, False), "https://arxiv.org/abs/2306.01708"),
    ("dare_linear", "task vectors randomly pruned and rescaled, then summed",
     Family("random", False, False, True), "https://arxiv.org/abs/2311.03099"),
    ("dare_ties", "task vectors randomly pruned and rescaled, signs elected",
     Family("random", True, False, True), "https://arxiv.org/abs/2311.03099"),
    ("breadcrumbs", "task vectors without their largest and smallest entries, summed",
     Family("outliers", False, False, False), "https://arxiv.org/abs/2312.06795"),
    ("breadcrumbs_ties", "breadcrumbs pruning with sign election",
     Family("outliers", True, False, False), "https://arxiv.org/abs/2312.06795"),
    ("della", "magnitude-aware random pruning (large entries kept more often), signs elected",
     Family("della", True, True, True), "https://arxiv.org/abs/2406.11617"),
    ("della_linear", "della pruning without sign election",
     Family("della", False, False, True), "https://arxiv.org/abs/2406.11617"),
):
    FAMILIES[_name] = _family
    register(_family_method(_name, _summary, _family, _reference))
