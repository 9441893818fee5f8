"""Task vectors kept only where a mask selects them: arcee_fusion, ram and ramplus_tl.

Notation: b the base's tensor, x_i model i's, d_i = x_i - b its task vector.
"""

from __future__ import annotations

import torch

from .registry import BASE_REQUIRED, Elementwise, Method, Parameter, TensorInputs, register

SOFTMAX_FLOOR = 1e-8  # added to both distributions so the KL divergence stays finite


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """importance = |x - b| * KL(p || q) of the entry's row, with p = softmax(x) + 1e-8 and
    q = softmax(b) + 1e-8 along the last axis (the whole vector for 1-D tensors)."""
    p = torch.softmax(model, dim=-1) + SOFTMAX_FLOOR
    q = torch.softmax(base, dim=-1) + SOFTMAX_FLOOR
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * divergence


def lower_quantile(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The sorted entry at index floor(fraction * (N - 1)): no interpolation between entries."""
    flat = values.reshape(-1)
    index = int(fraction * (flat.numel() - 1))
    return torch.kthvalue(flat, index + 1).values


def arcee_fusion(inputs: TensorInputs) -> torch.Tensor:
    """result = b + d * [importance >= median + 1.5 (q3 - q1)]: the other model's change is
    taken only at its outliers of importance (see fusion_importance); q1, median and q3 are
    quantiles of the importance over the whole tensor.

    When the model equals the base every importance is 0, the threshold is 0 and the result
    is the base.
    """
    base, model = inputs.base, inputs.models[0]
    if base.numel() == 0:
        return base.clone()
    importance = fusion_importance(model, base)
    q1, median, q3 = (lower_quantile(importance, f) for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    mask = (importance >= threshold).to(base.dtype)
    return base + (model - base) * mask


def _kept_counts(inputs: TensorInputs, epsilon: float) -> torch.Tensor:
    """c = how many models change an entry by more than epsilon: sum_i [|d_i| > epsilon]."""
    counts = torch.zeros(inputs.base.shape, dtype=torch.int32, device=inputs.base.device)
    for model in inputs.models:
        counts += (model - inputs.base).abs() > epsilon
    return counts


def ram(inputs: TensorInputs, coefficients, out: torch.Tensor) -> torch.Tensor:
    """Reinforced Agent Merging: m_i = [|d_i| > epsilon], c = sum_i m_i,
    result = b + sum_i m_i d_i / max(c, 1).

    An entry only one model changes takes that model's change whole; entries several models
    change take the mean of their changes; entries no model changes stay the base's.
    """
    epsilon = inputs.params["epsilon"]
    base = inputs.base
    divisor = _kept_counts(inputs, epsilon).clamp_(min=1)
    out.zero_()
    for model in inputs.models:
        task_vector = model - base
        out.add_(task_vector * (task_vector.abs() > epsilon) / divisor)
    return out.add_(base)


def ramplus_tl(inputs: TensorInputs) -> torch.Tensor:
    """RAM+ with tensor-local rescaling: m_i, c as in ram; per model, over the whole tensor,
    shared_i = #{m_i and c > 1}, unique_i = #{m_i and c = 1},
    rho_i = shared_i / max(unique_i, epsilon), lambda_i = 1 + r * clamp(rho_i, 0, alpha);
    result = b + sum_i m_i d_i ([c = 1] lambda_i + [c > 1] / c).

    A model whose changes mostly overlap the others' has its few unique changes amplified,
    making up for their dilution in the averaged overlap.
    """
    epsilon, r, alpha = (inputs.params[key] for key in ("epsilon", "r", "alpha"))
    base = inputs.base
    counts = _kept_counts(inputs, epsilon)
    unique = counts == 1
    shared = counts > 1
    divisor = counts.clamp(min=1)
    merged = torch.zeros_like(base)
    for model in inputs.models:
        task_vector = model - base
        kept = task_vector.abs() > epsilon
        shared_count = int((kept & shared).sum())
        unique_count = int((kept & unique).sum())
        rho = shared_count / max(unique_count, epsilon)
        scale = 1 + r * min(max(rho, 0.0), alpha)
        contribution = torch.where(unique, task_vector * scale, task_vector / divisor)
        merged += contribution * kept
    return base + merged


_EPSILON = Parameter("epsilon", float, 1e-5, low=0.0,
                     help="a task vector entry counts as a change when its magnitude exceeds this")

register(Method(
    "arcee_fusion", "base plus the other model's changes where their importance is an outlier",
    arcee_fusion, (), base=BASE_REQUIRED, min_models=1, max_models=1,
    reference="https://arcee.ai"))

register(Method(
    "ram", "changes only one model makes kept whole, shared changes averaged", None,
    (_EPSILON,), base=BASE_REQUIRED, min_models=1, elementwise=Elementwise(ram),
    reference="https://arxiv.org/abs/2601.13572"))

register(Method(
    "ramplus_tl", "ram with each model's unique changes amplified by how much it overlaps, per tensor",
    ramplus_tl,
    (Parameter("r", float, 0.1, low=0.0, help="strength of the amplification of unique changes"),
     Parameter("alpha", float, 0.2, low=0.0, help="cap on the shared/unique ratio that drives it"),
     _EPSILON),
    base=BASE_REQUIRED, min_models=1, reference="https://arxiv.org/abs/2601.13572"))
