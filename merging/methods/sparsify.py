"""Pruning a task vector: keep some of its entries, zero the rest, maybe rescale.

Each function takes a float32 tensor and returns a new one of the same shape.
"""

from __future__ import annotations

from typing import Optional

import torch


def rescale_l1(original: torch.Tensor, pruned: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `pruned` so that its L1 norm equals the original's (mergekit's DARE rescale)."""
    before = original.abs().sum()
    after = pruned.abs().sum()
    if before < eps or after < eps:
        return pruned
    return pruned * (before / after)


def rescale(original: torch.Tensor, pruned: torch.Tensor, mode: Optional[str],
            density: float) -> torch.Tensor:
    """Apply the chosen rescale: None, 'l1' (mergekit) or 'inverse_density' (the DARE paper)."""
    if mode == "l1":
        return rescale_l1(original, pruned)
    if mode == "inverse_density":
        return pruned / density
    return pruned


def _keep_indices(task_vector: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(task_vector.numel(), dtype=torch.bool, device=task_vector.device)
    mask[indices] = True
    return task_vector * mask.reshape(task_vector.shape)


def magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES pruning: keep the top k = max(1, int(density * N)) entries by |d|."""
    if density >= 1:
        return task_vector
    if density <= 0 or task_vector.numel() == 0:
        return torch.zeros_like(task_vector)
    k = max(1, int(density * task_vector.numel()))
    order = torch.argsort(task_vector.abs().reshape(-1), descending=True)
    return _keep_indices(task_vector, order[:k])


def magnitude_outliers(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top int(gamma N) outliers and the smallest, keep int(density N).

    Sorted ascending by |d|, the kept entries are positions [n_bot, n_bot + keep) with
    n_bot = max(0, N - keep - n_top). When n_top is 0 this keeps everything above n_bot
    (mergekit once sliced [n_bot:-n_top], which is empty then).
    """
    if density >= 1:
        return task_vector
    count = task_vector.numel()
    keep = int(density * count)
    n_top = int(gamma * count)
    n_bot = max(0, count - keep - n_top)
    order = torch.argsort(task_vector.abs().reshape(-1))
    return _keep_indices(task_vector, order[n_bot:n_bot + keep])


def bernoulli(task_vector: torch.Tensor, density: float, generator: Optional[torch.Generator]
              ) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return task_vector
    probabilities = torch.full_like(task_vector, density)
    mask = torch.bernoulli(probabilities, generator=generator)
    return task_vector * mask


def della_magprune(task_vector: torch.Tensor, density: float, epsilon: float,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """DELLA: per row, keep probability (density - eps) + 2 eps r, r = rank of |d| in [0, 1].

    Larger entries are kept more often; on average the row keeps `density` of its entries.
    """
    if density >= 1:
        return task_vector
    if density <= 0:
        return torch.zeros_like(task_vector)
    rows = task_vector if task_vector.dim() >= 2 else task_vector.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(rows.dtype)
    width = rows.shape[1]
    rank_in_unit = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    probabilities = (density - epsilon) + rank_in_unit * (2 * epsilon)
    mask = torch.bernoulli(probabilities, generator=generator)
    return (rows * mask).reshape(task_vector.shape)
