"""model_stock, sce, nearswap and passthrough."""

from __future__ import annotations

import itertools

import torch

from .registry import BASE_IGNORED, BASE_REQUIRED, Elementwise, Method, Parameter, TensorInputs, register
from .task_arithmetic import sign_mask


def model_stock(inputs: TensorInputs) -> torch.Tensor:
    """cos = mean pairwise cosine of the task vectors (whole tensor, or per row with
    filter_wise); t = N cos / (1 + (N-1) cos); result = t mean(x_i) + (1-t) b.

    Where 1 + (N-1) cos is ~0 there is no finite estimate and the base is kept.
    """
    base, models = inputs.base, inputs.models
    shape = base.shape
    if inputs.params["filter_wise"]:
        rows = (lambda x: x.unsqueeze(0)) if base.dim() == 1 else (lambda x: x)
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731
    base_rows = rows(base)
    offsets = [rows(x) - base_rows for x in models]
    cosines = []
    for a, b in itertools.combinations(offsets, 2):
        norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
        cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(models)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    count * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(rows(x) for x in models) / count
    return (t * average + (1 - t) * base_rows).reshape(shape)


def sce(inputs: TensorInputs) -> torch.Tensor:
    """Select (top-k variance positions), calculate (w_i = mean(d_i^2) / sum_j mean(d_j^2)),
    erase (sign vote): b + sum w_i m_i d_i / max(sum w_i m_i, 1e-6)."""
    base = inputs.base
    if not inputs.models:
        return base
    task_vectors = torch.stack([x - base for x in inputs.models])
    select = inputs.params["select_topk"]
    if select < 1:
        task_vectors = task_vectors * _variance_mask(task_vectors, select)
    erase = sign_mask(task_vectors)
    energy = task_vectors.square().reshape(len(inputs.models), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / len(energy)) if abs(total) < 1e-6 else energy / total
    weights = weights.reshape((-1,) + (1,) * base.dim()) * erase
    return base + (task_vectors * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _variance_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the int(fraction * nonzero) positions whose variance across models is highest."""
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask.view(-1)[torch.topk(variance.reshape(-1), k=k).indices] = 1
    return mask


def nearswap(inputs: TensorInputs, coefficients, out: torch.Tensor) -> torch.Tensor:
    """w = clamp(t / max(|base - x|, 1e-6), 0, 1); result = w x + (1 - w) base: entries
    where the two models are closer than t take the other model's value."""
    base, other = inputs.base, inputs.models[0]
    weight = (inputs.params["t"] / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return torch.add(weight * other, (1 - weight) * base, out=out)


def passthrough(inputs: TensorInputs, coefficients, out: torch.Tensor) -> torch.Tensor:
    """The single source tensor, optionally multiplied by its `scale`."""
    scale = inputs.model_params[0].get("scale")
    return out.copy_(inputs.models[0]) if scale is None else torch.mul(inputs.models[0], scale, out=out)


register(Method(
    "model_stock", "base moved toward the models' mean by their task vectors' agreement",
    model_stock,
    (Parameter("filter_wise", bool, False, help="estimate the angle per row instead of per tensor"),),
    base=BASE_REQUIRED, min_models=2, reference="https://arxiv.org/abs/2403.19522"))

register(Method(
    "sce", "task vectors at high-variance positions, weighted by energy, signs elected", sce,
    (Parameter("select_topk", float, 1.0, low=0.0, high=1.0,
               help="fraction of positions (highest variance across models) kept"),
     Parameter("int8_mask", bool, False, help="accepted for mergekit compatibility; no effect here")),
    base=BASE_REQUIRED, min_models=1, reference="https://arxiv.org/abs/2408.07990"))

register(Method(
    "nearswap", "base, with entries that are close to the other model's swapped in", None,
    (Parameter("t", float, low=0.0, help="distance under which an entry is taken from the other model"),),
    base=BASE_REQUIRED, min_models=1, max_models=1, elementwise=Elementwise(nearswap)))

register(Method(
    "passthrough", "copy tensors unchanged; with slices, stack layers from several models",
    None,
    (Parameter("scale", float, None, per_model=True, help="multiply the copied tensor by this"),),
    base=BASE_IGNORED, min_models=1, max_models=1, elementwise=Elementwise(passthrough)))
