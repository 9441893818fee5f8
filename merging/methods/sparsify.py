"""Pruning a task vector: keep some of its entries, zero the rest, maybe rescale.

Each function takes a float32 tensor and returns a new one of the same shape.
"""

from __future__ import annotations

from typing import Optional

import torch


def rescale_l1(original: torch.Tensor, pruned: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `pruned` so that its L1 norm equals the original's (mergekit's DARE rescale);
    the norms are float64 sums, their quotient applied in float32."""
    before = float(original.abs().sum(dtype=torch.float64))
    after = float(pruned.abs().sum(dtype=torch.float64))
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


GOLDEN = 0x9E3779B97F4A7C15


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def hash_draws(count: int, key: int, device=None) -> torch.Tensor:
    """32-bit draws h_j = top 32 bits of splitmix64(key + (j + 1) * golden), j < count.

    A counter-based generator: draw j depends on (key, j) alone, so any part of a tensor
    can be drawn on its own (methods.fused draws entry by entry) with the same result on
    every device. int64 arithmetic wraps like uint64; right shifts are masked to be logical.
    """
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device) * _signed(GOLDEN) + _signed(key % (1 << 64))
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed(0x94D049BB133111EB)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return (z >> 32) & 0xFFFFFFFF


def keep_threshold(density: float) -> int:
    """Entry j is kept iff its draw is below floor(density 2^32): probability density."""
    return int(density * (1 << 32))


def random_keep(task_vector: torch.Tensor, density: float, key: int) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density` (hash_draws(key))."""
    if density >= 1:
        return task_vector
    keep = hash_draws(task_vector.numel(), key, task_vector.device) < keep_threshold(density)
    return task_vector * keep.reshape(task_vector.shape)


def della_ranks(task_vector: torch.Tensor) -> torch.Tensor:
    """Each entry's rank by |d| along dimension 1 (a vector: along itself), ascending, equal
    magnitudes in index order; float32, the shape of `task_vector` (as rows, 2-D for a vector)."""
    rows = task_vector if task_vector.dim() >= 2 else task_vector.unsqueeze(0)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    positions = torch.arange(rows.shape[1], dtype=torch.float32, device=rows.device)
    shape = [1] * rows.dim()
    shape[1] = rows.shape[1]
    return torch.empty_like(rows, dtype=torch.float32).scatter_(1, order, positions.reshape(shape).expand_as(rows))


def della_keep(task_vector: torch.Tensor, density: float, epsilon: float, key: int) -> torch.Tensor:
    """DELLA's keep mask (1/0, the task vector's shape): per row, keep probability
    p = (density - eps) + 2 eps r, r = rank of |d| in [0, 1] (della_ranks / (width - 1)), so
    larger entries are kept more often and a row keeps `density` of its entries on average.
    Entry j is kept iff its draw (hash_draws(key)) is below p 2^32."""
    if density <= 0:
        return torch.zeros_like(task_vector)
    ranks = della_ranks(task_vector)
    width = ranks.shape[1]
    rank_in_unit = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    probabilities = (density - epsilon) + rank_in_unit * (2 * epsilon)
    draws = hash_draws(task_vector.numel(), key, task_vector.device).reshape(probabilities.shape)
    keep = draws.double() < probabilities.double() * 2.0**32
    return keep.to(task_vector.dtype).reshape(task_vector.shape)


def della_magprune(task_vector: torch.Tensor, density: float, epsilon: float, key: int) -> torch.Tensor:
    """DELLA pruning: the task vector times della_keep's mask."""
    if density >= 1:
        return task_vector
    return task_vector * della_keep(task_vector, density, epsilon, key)
