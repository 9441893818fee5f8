"""Interpolation methods: linear, slerp, nuslerp, multislerp, karcher.

All arithmetic is float32 on whatever device the inputs live on.
"""

from __future__ import annotations

import math

import torch

from ..errors import MergeError
from . import fused
from .registry import (
    BASE_IGNORED,
    BASE_OPTIONAL,
    BASE_REQUIRED,
    Elementwise,
    Method,
    Parameter,
    TensorInputs,
    register,
    weight_parameter,
)


def linear_coefficients(sums, inputs: TensorInputs) -> list[float]:
    """w_i, or w_i / sum_j w_j when `normalize`."""
    weights = inputs.per_model("weight")
    if not inputs.params["normalize"]:
        return weights
    total = sum(weights)
    if abs(total) < 1e-12:
        raise MergeError(f"linear weights sum to 0 for {inputs.name}; cannot normalize")
    return [w / total for w in weights]


def weighted_sum(tensors: list[torch.Tensor], coefficients: list[float], out: torch.Tensor,
                 batch=None) -> torch.Tensor:
    """sum_i c_i x_i, written into `out` by in-place float32 operations, so the arithmetic is
    float32 even when the x_i come in their (lower) storage dtype. On the CPU one fused pass
    (methods.fused) computes the same, bitwise, now or with the other passes of `batch`. A
    bfloat16 `out` (a live model's parameter) gets the float32 sum rounded once."""
    if fused.available(out) and fused.output_array(out) is not None and \
            all(t.device.type == "cpu" for t in tensors):
        return fused.weighted_sum(tensors, coefficients, out, batch)
    if out.dtype != torch.float32:
        return out.copy_(weighted_sum(tensors, coefficients, torch.empty_like(out, dtype=torch.float32)))
    out.copy_(tensors[0]).mul_(coefficients[0])
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        out.add_(tensor, alpha=coefficient)
    return out


def linear_combine(inputs: TensorInputs, coefficients: list[float], out: torch.Tensor) -> torch.Tensor:
    """Model soup: sum_i w_i x_i, divided by sum_i w_i when `normalize`."""
    return weighted_sum(inputs.models, coefficients, out, inputs.batch)


def slerp_statistics(inputs: TensorInputs) -> torch.Tensor:
    """<v0,v1>, <v0,v0>, <v1,v1>: sums that add up over row blocks (the inputs as stored;
    on the CPU one fused float64 pass, elsewhere float32 dot products)."""
    v0, v1 = inputs.base.reshape(-1), inputs.models[0].reshape(-1)
    if fused.available(v0) and v1.device.type == "cpu":
        return fused.dot_products(v0, v1)
    v0, v1 = v0.float(), v1.float()
    return torch.stack([torch.dot(v0, v1), torch.dot(v0, v0), torch.dot(v1, v1)])


def slerp_cosine(sums: torch.Tensor, eps: float = 1e-8) -> float:
    """cos of the angle from (<v0,v1>, |v0|^2, |v1|^2); norms under eps count as 1."""
    dot, square0, square1 = (float(x) for x in sums)
    norm0, norm1 = square0 ** 0.5, square1 ** 0.5
    return dot / ((norm0 if norm0 > eps else 1.0) * (norm1 if norm1 > eps else 1.0))


def slerp_coefficients(t: float, dot: float, dot_threshold: float = 0.9995) -> tuple[float, float]:
    """The (c0, c1) with slerp(t) = c0 v0 + c1 v1.

    dot = <v0/|v0|, v1/|v1|>; if |dot| > dot_threshold the tensors are nearly parallel
    and the result is (1-t) v0 + t v1; otherwise theta = arccos(dot) and
    c0 = sin((1-t) theta) / sin(theta), c1 = sin(t theta) / sin(theta).
    """
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool,
                    flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    """Slerp along vectors: the whole tensor (flatten), each row, or each column (row_wise).

    Unit vectors use norms clamped at 1e-7, cos is clamped to [-1, 1], and the
    result falls back to (1-t) v0 + t v1 only where |sin theta| < eps.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(inputs: TensorInputs) -> torch.Tensor:
    """t = w2 / (w1 + w2) (0.5 when the sum is ~0); with a base, slerp the task vectors."""
    w1, w2 = inputs.per_model("weight")
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    x1, x2 = inputs.models
    row_wise, flatten = inputs.params["nuslerp_row_wise"], inputs.params["nuslerp_flatten"]
    if inputs.base is None:
        return nuslerp_tensors(t, x1, x2, row_wise, flatten)
    base = inputs.base
    return base + nuslerp_tensors(t, x1 - base, x2 - base, row_wise, flatten)


def multislerp(inputs: TensorInputs) -> torch.Tensor:
    """Weighted spherical mean of the models (or of their task vectors, with a base).

    u_i = x_i/(n_i+eps), m = normalize(sum w_i u_i), v = sum w_i (u_i - (u_i.m) m),
    result = (m cos|v| + v sin|v|/|v|) * sum w_i n_i  (+ base).
    """
    if len(inputs.models) == 1:
        return inputs.models[0]
    eps = inputs.params["eps"]
    stacked = torch.stack(inputs.models)
    if inputs.base is not None:
        stacked = stacked - inputs.base
    flat = stacked.reshape(len(inputs.models), -1)
    weights = torch.tensor(inputs.per_model("weight"), dtype=flat.dtype, device=flat.device)
    if inputs.params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(inputs.models) != 2:
            raise MergeError(f"multislerp: the weighted unit vectors cancel out for {inputs.name}; "
                             "change the weights")
        result = (flat[0] * weights[0] + flat[1] * weights[1]).reshape(stacked.shape[1:])
    else:
        mean = mean / mean_norm
        tangents = units - (units @ mean)[:, None] * mean
        tangent = (tangents * weights[:, None]).sum(0)
        length = torch.linalg.vector_norm(tangent) + eps
        result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
        result = (result * (norms.squeeze(-1) * weights).sum()).reshape(stacked.shape[1:])
    return result if inputs.base is None else result + inputs.base


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Riemannian (Karcher) mean on the unit sphere, equal weights, scaled by the mean norm.

    Iterate m <- exp_m(sum_i a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m)) until the
    tangent step is shorter than tol.
    """
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [x / n if float(n) != 0.0 else torch.zeros_like(x) for x, n in zip(tensors, norms)]
    valid = [u for u, n in zip(units, norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    weights = [1.0 / len(valid)] * len(valid)
    mean = sum(w * u for w, u in zip(weights, valid))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, valid):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = torch.linalg.vector_norm(mean)
        if float(length) > tol:
            mean = mean / length
    return sum(alpha * n for n in norms) * mean


def karcher(inputs: TensorInputs) -> torch.Tensor:
    if len(inputs.models) == 1:
        return inputs.models[0]
    return karcher_mean(inputs.models, inputs.params["max_iter"], inputs.params["tol"])


register(Method(
    "linear", "weighted average of the models (model soup)", None,
    (weight_parameter(),
     Parameter("normalize", bool, True, help="divide by the sum of the weights")),
    base=BASE_IGNORED, min_models=1, reference="https://arxiv.org/abs/2203.05482",
    elementwise=Elementwise(linear_combine, linear_coefficients, stored_dtype_ok=True, any_out_dtype=True)))

register(Method(
    "slerp", "spherical interpolation between the base (t=0) and one other model (t=1)", None,
    (Parameter("t", float, low=0.0, high=1.0, help="0 gives the base model, 1 the other model"),),
    base=BASE_REQUIRED, min_models=1, max_models=1,
    elementwise=Elementwise(
        combine=lambda inputs, coefficients, out: weighted_sum([inputs.base, inputs.models[0]],
                                                               list(coefficients), out, inputs.batch),
        coefficients=lambda sums, inputs: slerp_coefficients(inputs.params["t"], slerp_cosine(sums)),
        statistics=slerp_statistics, stored_dtype_ok=True, any_out_dtype=True)))

register(Method(
    "nuslerp", "slerp of two models (or their task vectors) with weights, by tensor, row or column",
    nuslerp,
    (weight_parameter(help="relative weight; t = w2/(w1+w2)"),
     Parameter("nuslerp_row_wise", bool, False, help="slerp column vectors instead of rows"),
     Parameter("nuslerp_flatten", bool, True, help="treat each tensor as one vector")),
    base=BASE_OPTIONAL, min_models=2, max_models=2))

register(Method(
    "multislerp", "weighted spherical mean of any number of models (or task vectors)", multislerp,
    (weight_parameter(),
     Parameter("normalize_weights", bool, True, help="scale the weights to sum to 1"),
     Parameter("eps", float, 1e-8, low=0.0, help="numerical floor for norms")),
    base=BASE_OPTIONAL, min_models=1,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"))

register(Method(
    "karcher", "Riemannian (Karcher) mean of all models on the sphere, equal weights", karcher,
    (Parameter("max_iter", int, 10, low=1, high=1000, help="iterations of the mean"),
     Parameter("tol", float, 1e-5, low=0.0, help="stop when the step is shorter than this")),
    base=BASE_IGNORED, min_models=1))
