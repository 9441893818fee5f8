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


def rank_window(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """A mask of the entries whose rank is in [start, stop) when `values` (flat) are sorted
    ascending with ties in index order: entry i has rank #(values < v_i) + #(j < i: v_j = v_i).

    Exact in O(N): the window's two edge values come from selection (kthvalue), not a sort;
    only the entries equal to an edge are ranked among themselves, by index. mergekit sorts
    with torch.argsort, whose order among equal values is unspecified; this rule is the
    deterministic one (the same on every device and run), and equal to a stable sort.
    """
    count = values.numel()
    start, stop = max(0, start), min(count, stop)
    if start >= stop:
        return torch.zeros(count, dtype=torch.bool, device=values.device)
    mask = torch.ones(count, dtype=torch.bool, device=values.device)
    if start > 0:  # drop ranks below start: all below the edge value, and its first ties
        edge = torch.kthvalue(values, start + 1).values
        below = values < edge
        mask &= ~below
        _drop_ties(mask, values == edge, start - int(below.sum()), keep_first=False)
    if stop < count:  # drop ranks from stop on: all above the edge value, and its last ties
        edge = torch.kthvalue(values, stop).values
        below_or_at = values <= edge
        mask &= below_or_at
        _drop_ties(mask, values == edge, stop - int((values < edge).sum()), keep_first=True)
    return mask


def _drop_ties(mask: torch.Tensor, tied: torch.Tensor, first: int, keep_first: bool) -> None:
    """Of the tied entries (in index order), drop all but the first `first` (keep_first) or
    drop the first `first` (not keep_first)."""
    positions = torch.nonzero(tied).flatten()
    mask[positions[first:] if keep_first else positions[:first]] = False


def magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES pruning: keep the top k = max(1, int(density * N)) entries by |d| (equal
    magnitudes at the cut: the lower index first; see rank_window)."""
    if density >= 1:
        return task_vector
    if density <= 0 or task_vector.numel() == 0:
        return torch.zeros_like(task_vector)
    k = max(1, int(density * task_vector.numel()))
    keep = rank_window(-task_vector.abs().reshape(-1), 0, k)  # descending |d|: ascending -|d|
    return task_vector * keep.reshape(task_vector.shape)


def magnitude_outliers(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top int(gamma N) outliers and the smallest, keep int(density N).

    Sorted ascending by |d| (ties in index order; see rank_window), the kept entries are
    positions [n_bot, n_bot + keep) with n_bot = max(0, N - keep - n_top). When n_top is 0
    this keeps everything above n_bot (mergekit once sliced [n_bot:-n_top], which is empty
    then).
    """
    if density >= 1:
        return task_vector
    count = task_vector.numel()
    keep = int(density * count)
    n_top = int(gamma * count)
    n_bot = max(0, count - keep - n_top)
    kept = rank_window(task_vector.abs().reshape(-1), n_bot, n_bot + keep)
    return task_vector * kept.reshape(task_vector.shape)


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
