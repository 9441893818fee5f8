"""Fused CPU kernels for the task-vector family: TIES, DARE, breadcrumbs, DELLA.

`task_arithmetic.combine` states the math with whole-tensor torch operations (the
reference, used on other devices and when numba is missing). These kernels compute the
same thing entry by entry in one pass: d_i = x_i - b read straight from the stored
(bfloat16 or float32) sources, pruned, rescaled, weighted, the sign vote, the sum. Nothing
the size of a tensor is allocated but the output, and each operation is the reference's,
in its order and precision, so the outputs are bitwise equal (the L1 rescale's sums are
float64 sums in another order; their float32 quotient almost always agrees).

A model's pruning is data (`Rule`), found once and reused while its density stays:
  window  (TIES, breadcrumbs): keep the entries ranked [start, stop) by |d| (see
          sparsify.rank_window); a rank's edge is found exactly in O(N): a 65,536-bin
          histogram of |d|'s float32 bits names its bin (cached: a new density reuses it),
          one pass over that bin finds the value, ties at the edge are split by index;
  hash    (DARE): keep entry j iff h(key, j) < density 2^32, h a counter-based hash
          (sparsify.hash_draws), so a new density is one comparison per entry;
  ranked  (DELLA): keep entry j iff h(key, j) < p_j 2^32, p_j from its rank by |d| in its
          row; the ranks (a stable radix sort per row) are cached, so a new density or
          epsilon sorts nothing.

Kernels work on index ranges and release the GIL: a tensor is split across threads by
fixed chunks, and sums are added chunk by chunk in order, so no result depends on the
thread count.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import MergeError

try:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic, overload
except ImportError:  # the torch reference serves alone
    njit = None

CHUNK = 1 << 16  # entries per unit of work: the split between threads, and of the sums
COMBINE_BLOCK = 4096  # entries per model the combine holds at once (in the L1/L2 cache)
NO_EDGE, ALL_EDGE = -1, 1 << 32  # prefix edges that take no entry / every entry
KEEP_ALL, WINDOW, HASH, RANKED = 0, 1, 2, 3
NO_RESCALE, MULTIPLY, DIVIDE = 0, 1, 2
GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class Rule:
    """How one model's task vector is pruned and rescaled, for one tensor.

    WINDOW: edges = (start_edge, start_index, stop_edge, stop_index); entry j, with order
    key K_j, is in the first R ranks iff K_j < edge or (K_j == edge and j < index); the
    rule keeps prefix(stop) minus prefix(start). HASH: keep iff h(key, j) < threshold.
    RANKED: keep iff h(key, j) < (low + ranks[j] / (width - 1) * spread) 2^32, computed
    in float32 as sparsify.della_keep does. scale_mode MULTIPLY multiplies the kept
    entries by `scale`, DIVIDE divides them by `density` (the reference's two rescales).
    """

    kind: int = KEEP_ALL
    descending: bool = True
    edges: tuple = (NO_EDGE, 0, ALL_EDGE, 0)
    key: int = 0
    threshold: int = 0
    ranks: Optional[np.ndarray] = None
    width: int = 1
    low: float = 0.0
    spread: float = 0.0
    scale_mode: int = NO_RESCALE
    scale: float = 1.0
    density: float = 1.0

    @property
    def nbytes(self) -> int:
        return 128  # the ranks it points to are cached on their own


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor: numba present, on the CPU, not empty."""
    return njit is not None and tensor.device.type == "cpu" and tensor.dim() > 0 and tensor.numel() > 0


def source_array(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a stored tensor: float32, or bfloat16 bits as uint16 (the
    kernels widen those as they read; other dtypes are widened here)."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.float().numpy()


def output_array(tensor: torch.Tensor) -> Optional[np.ndarray]:
    """A flat numpy view the kernels can write a result into (float32, or bfloat16 bits as
    uint16, rounded to nearest even once), or None for other tensors."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype not in (torch.float32,
                                                                                          torch.bfloat16):
        return None
    return source_array(tensor)


# ---- threads ------------------------------------------------------------------------
# One pool of worker threads per thread count asked for, shared by every session (a
# process sets its count once; a pool's idle threads wait, they do not spin).
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _ranges(count: int, threads: int = 0) -> list[tuple[int, int]]:
    """[start, stop) ranges on CHUNK boundaries, up to four per thread (`threads`, else
    torch's count): a thread whose core is shared with another process takes fewer of them."""
    chunks = max(1, -(-count // CHUNK))
    per = -(-chunks // (4 * max(1, threads or torch.get_num_threads())))
    return [(c * CHUNK, min(count, (c + per) * CHUNK)) for c in range(0, chunks, per)]


def _map(function, ranges: list, *args, threads: int = 0) -> list:
    """[function(*args, start, stop) for each range], spread over `threads` (else torch's count)."""
    threads = max(1, threads or torch.get_num_threads())
    if len(ranges) == 1 or threads == 1:
        return [function(*args, *bounds) for bounds in ranges]
    return list(_pool(threads).map(lambda bounds: function(*args, *bounds), ranges))


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fused")
        return pool


def _run(function, count: int, *args, threads: int = 0) -> list:
    return _map(function, _ranges(count, threads), *args, threads=threads)


# ---- rules --------------------------------------------------------------------------
def window_rule(base, model, start: int, stop: int, descending: bool, histogram) -> tuple:
    """Edges for ranks [start, stop) of |d| (descending or ascending, ties by index).

    `histogram` gives the level-one counts of |d|'s bits >> 16 (65,536 bins; cached by
    the caller: it depends on the tensors only)."""
    coarse = histogram()
    if descending:  # key = 0x7FFFFFFF - bits: high bins 0x7FFF - h, low bins 0xFFFF - l
        coarse = coarse[:0x8000][::-1]
    (start_edge, start_index), (stop_edge, stop_index) = _prefix_edges(base, model, (start, stop), descending,
                                                                       coarse, len(base))
    return start_edge, start_index, stop_edge, stop_index


def key_histogram(base, model) -> np.ndarray:
    """Counts of |d|'s float32 bits >> 16 (65,536 bins, ascending |d|)."""
    return np.sum(_run(_histogram_kernel, len(base), base, model), axis=0).astype(np.int32)


def _prefix_edges(base, model, ranks: tuple, descending: bool, coarse, count: int) -> list[tuple[int, int]]:
    """(edge, index) of prefix(rank) for each rank: the first `rank` entries in the order.

    The coarse histogram names the bin of each rank-th key. One pass over the tensor serves
    every edge: a small bin is gathered (its entries in index order), and counting their
    low 16 bits finds the key, index order which of its ties come first; a crowded bin (an
    unchanged tensor's zeros, the many equal magnitudes of bfloat16 task vectors) has its
    low bits counted instead, then one more pass counts each such edge's ties per chunk,
    and one chunk is scanned."""
    if int(coarse.sum()) != count:
        raise _changed_on_disk()
    edges: list = [None] * len(ranks)
    pending = []  # (slot, rank, bin, entries before the bin, crowded)
    for slot, rank in enumerate(ranks):
        if rank <= 0:
            edges[slot] = (NO_EDGE, 0)
        elif rank >= count:
            edges[slot] = (ALL_EDGE, 0)
        else:
            high, before = _locate(coarse, rank)
            pending.append((slot, rank, high, before, coarse[high] > max(CHUNK, count // 16)))
    if not pending:
        return edges
    stored_highs = np.array([0x7FFF - p[2] if descending else p[2] for p in pending], np.int64)
    capacities = np.array([0 if p[4] else coarse[p[2]] for p in pending], np.int64)
    parts = _run(_bins_kernel, count, base, model, stored_highs, capacities, 1 << 16 if any(p[4] for p in pending) else 1)
    crowded = []  # (slot, bits, ties needed, edge)
    for column, (slot, rank, high, before, is_crowded) in enumerate(pending):
        if is_crowded:
            fine = np.sum([part[3][column] for part in parts], axis=0)
            if int(fine.sum()) != coarse[high]:
                raise _changed_on_disk()
        else:
            if sum(part[2][column] for part in parts) != coarse[high]:
                raise _changed_on_disk()
            indices = np.concatenate([part[0][column, :part[2][column]] for part in parts])
            lows = np.concatenate([part[1][column, :part[2][column]] for part in parts])
            fine = np.bincount(lows, minlength=1 << 16)
        low, within = _locate(fine[::-1] if descending else fine, rank - before)
        needed = rank - before - within  # the first `needed` ties of the edge, in index order, are in the prefix
        stored_bits = (int(stored_highs[column]) << 16) | (0xFFFF - low if descending else low)
        edge = (high << 16) | low
        if is_crowded:
            crowded.append((slot, stored_bits, needed, edge))
        else:
            edges[slot] = (edge, int(indices[lows == (stored_bits & 0xFFFF)][needed - 1]) + 1)
    if crowded:
        bits = np.array([c[1] for c in crowded], np.int64)
        per_chunk = np.concatenate(_run(_tie_counts_kernel, count, base, model, bits), axis=1)
        for column, (slot, stored_bits, needed, edge) in enumerate(crowded):
            chunk = int(np.searchsorted(np.cumsum(per_chunk[column]), needed))
            needed -= int(per_chunk[column, :chunk].sum())
            first = chunk * CHUNK
            edges[slot] = (edge, int(_nth_tie_kernel(base, model, stored_bits, needed, first,
                                                     min(count, first + CHUNK))) + 1)
    return edges


def _locate(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(the first bin whose running count reaches `rank`, the count before it); the
    callers' counts always hold at least `rank` entries."""
    return tuple(int(v) for v in _locate_kernel(counts, rank))


def _changed_on_disk() -> MergeError:
    """The cached histogram no longer counts the weights read now (never write past it)."""
    return MergeError("a model's weights changed on disk while this session had them open; "
                      "open the models again (merge from a fresh Lab)")


def abs_sums(base, model, rule: Rule) -> tuple[float, float]:
    """(sum |d|, sum |kept d|) in float64, added chunk by chunk in order."""
    rules = _rule_arrays([rule])
    parts = _run(_abs_sums_kernel, len(base), base, model, rules[0][0], *(column[0] for column in rules[1:]))
    partials = np.concatenate(parts).reshape(-1, 2)
    return float(partials[:, 0].sum()), float(partials[:, 1].sum())


def row_ranks(base, model, width: int) -> np.ndarray:
    """Each entry's rank by |d| within its row of `width` (ascending, ties in index order):
    int16 where a row is short enough, else int32."""
    rows = len(base) // width
    ranks = np.empty(len(base), np.int16 if width <= 1 << 15 else np.int32)
    per = max(1, -(-rows // (4 * max(1, torch.get_num_threads()))))
    _map(_row_ranks_kernel, [(r, min(rows, r + per)) for r in range(0, rows, per)], base, model, width, ranks)
    return ranks


def _rule_arrays(rules: list[Rule]) -> tuple:
    """The rules as the kernels take them: a tuple of rank arrays, then one array per field."""
    real = [r.ranks for r in rules if r.ranks is not None]
    placeholder = np.zeros(1, real[0].dtype if real else np.int16)
    return (tuple(r.ranks if r.ranks is not None else placeholder for r in rules),
            np.array([r.kind for r in rules], np.int64), np.array([r.descending for r in rules], np.bool_),
            np.array([r.edges for r in rules], np.int64).reshape(-1, 4),
            np.array([r.key for r in rules], np.uint64), np.array([r.threshold for r in rules], np.uint64),
            np.array([r.width for r in rules], np.int64), np.array([r.low for r in rules], np.float32),
            np.array([r.spread for r in rules], np.float32),
            np.array([r.scale_mode for r in rules], np.int64), np.array([r.scale for r in rules], np.float32),
            np.array([r.density for r in rules], np.float32))


# ---- the combine --------------------------------------------------------------------
def combine(base, models: tuple, rules: list[Rule], weights: list[float], sign_vote: bool,
            normalize: bool, lam: float, out: Optional[np.ndarray] = None) -> Optional[torch.Tensor]:
    """The family's result b + lambda * mixed (see task_arithmetic): into `out` (an
    output_array) when given, else returned as a flat float32 tensor."""
    count = len(base)
    result = None
    if out is None:
        result = torch.empty(count, dtype=torch.float32)
        out = result.numpy()
    weight_array = np.array(weights, np.float32)
    divisor = np.float32(0)
    for weight in weight_array:  # the reference's float32 sum, in order
        divisor = np.float32(divisor + weight)
    if abs(divisor) < 1e-8:
        divisor = np.float32(1)
    _run(_combine_kernel, count, base, models, *_rule_arrays(rules), weight_array, sign_vote, normalize,
         divisor, np.float32(lam), lam != 1, out)
    return result


def weighted_sum(tensors: list[torch.Tensor], coefficients: list[float], out: torch.Tensor,
                 batch: Optional["SumBatch"] = None) -> torch.Tensor:
    """out = sum_i c_i x_i as interpolation.weighted_sum computes it (x_0 c_0, then each
    further term added by a fused multiply-add, as torch's add_(x, alpha=c) does), in one
    pass over the stored inputs; `out` float32, or bfloat16 (rounded once, as a cast would).
    With a `batch`, the pass waits there (`out` holds its values once the batch has run)."""
    arrays = [source_array(t) for t in tensors]
    if arrays[0].dtype != arrays[-1].dtype or len({a.dtype for a in arrays}) > 1:
        arrays = [source_array(t.float()) for t in tensors]
    job = (tuple(arrays), np.array(coefficients, np.float32), output_array(out))
    if batch is not None:
        batch.add(job)
    else:  # one thread: a single pass this size costs more to hand off than to run
        _weighted_sum_kernel(*job, 0, out.numel())
    return out


class SumBatch:
    """Weighted sums of many tensors (a live slerp or linear update), computed together.

    Each sum is one pass bound by memory, and one core streams half the bytes that two do
    (12.7 vs 24.9 GB/s here); one pass of a millisecond costs more to split between
    threads than it gains. So the passes are gathered, then run whole, largest first, by
    `threads` threads that each take the next pass when done (a thread on a core another
    process keeps busy takes fewer): a live slerp update of the demo pair 69 ms instead of
    114 ms (bench_live.py). `limit` entries gathered run at once (bounded latency)."""

    def __init__(self, threads: int = 0, limit: int = 1 << 27):
        self.threads = max(1, threads or torch.get_num_threads())
        self.limit = limit
        self.jobs: list = []
        self.entries = 0

    def add(self, job: tuple) -> None:
        self.jobs.append(job)
        self.entries += len(job[2])
        if self.entries >= self.limit:
            self.run()

    def run(self) -> None:
        """Compute every gathered sum; on return each `out` holds its values."""
        jobs = iter(sorted(self.jobs, key=lambda job: -len(job[2])))
        self.jobs, self.entries = [], 0

        def work() -> None:
            for sources, coefficients, out in jobs:  # a shared iterator: each job once
                _weighted_sum_kernel(sources, coefficients, out, 0, len(out))

        helpers = [_pool(self.threads - 1).submit(work) for _ in range(self.threads - 1)]
        try:
            work()
        finally:
            for helper in helpers:
                helper.result()


def dot_products(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(<a,b>, <a,a>, <b,b>) of two stored tensors, float64 (products and sums in float64,
    added chunk by chunk in order), in one pass."""
    a, b = source_array(first), source_array(second)
    if a.dtype != b.dtype:
        a, b = source_array(first.float()), source_array(second.float())
    parts = np.concatenate(_run(_dots_kernel, len(a), a, b)).reshape(-1, 3)
    return torch.from_numpy(parts.sum(axis=0))


if njit is not None:
    @intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c rounded once (llvm.fma.f32)."""
        def codegen(context, builder, signature, args):
            single = ir.FloatType()
            function = builder.module.declare_intrinsic("llvm.fma", [single],
                                                        ir.FunctionType(single, [single] * 3))
            return builder.call(function, args)
        return types.float32(types.float32, types.float32, types.float32), codegen

    @intrinsic
    def _as_float(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.uint32), codegen

    @intrinsic
    def _as_bits(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.uint32))
        return types.uint32(types.float32), codegen

    def _load(array, j):
        """Entry j of a source as float32: bfloat16 bits (uint16 arrays) widened, else cast."""

    @overload(_load, inline="always")
    def _load_typed(array, j):  # chosen when compiling, by the array's type
        if array.dtype == types.uint16:
            return lambda array, j: _as_float(np.uint32(array[j]) << np.uint32(16))
        return lambda array, j: np.float32(array[j])

    def _store(array, j, value):
        """array[j] = value: float32 as is, or rounded to bfloat16 bits (uint16 arrays) to
        nearest even, NaN as 0x7FC0, as torch casts."""

    @overload(_store, inline="always")
    def _store_typed(array, j, value):
        if array.dtype == types.uint16:
            def store(array, j, value):
                bits = _as_bits(value)
                rounded = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
                                    >> np.uint32(16))
                array[j] = np.uint16(0x7FC0) if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded
            return store

        def store(array, j, value):
            array[j] = value
        return store

    @njit(inline="always", error_model="numpy")
    def _order_key(d, descending):
        """|d|'s float32 bits (ascending |d|), or their complement (descending |d|)."""
        bits = _as_bits(np.float32(abs(d)))
        return np.int64(np.uint32(0x7FFFFFFF) - bits) if descending else np.int64(bits)

    @njit(inline="always", error_model="numpy")
    def _draw(key, j):
        """The top 32 bits of splitmix64's output for counter j of stream `key`."""
        z = key + np.uint64(j + 1) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) >> np.uint64(32)

    # Loops index sliced views from 0 (never `first + offset`): numba then knows the index
    # is not negative, and the loops vectorize (2.4x faster, measured).
    @njit(nogil=True, cache=True, error_model="numpy")  # called per block: not inlined, compiled once
    def _task_vector(base, model, ranks, kind, ordered, edges, key, threshold, width, low, spread, first, row):
        """row = d * keep for the entries first, first + 1, ... (base, model and ranks are
        that block's slices; one loop per kind, so each vectorizes)."""
        if kind == KEEP_ALL:
            for offset in range(len(row)):
                row[offset] = _load(model, offset) - _load(base, offset)
        elif kind == WINDOW:
            start_edge, start_index, stop_edge, stop_index = edges[0], edges[1], edges[2], edges[3]
            for offset in range(len(row)):
                d = _load(model, offset) - _load(base, offset)
                j = first + offset
                order = _order_key(d, ordered)  # no branches on data: kept or not is a coin toss
                in_stop = (order < stop_edge) | ((order == stop_edge) & (j < stop_index))
                in_start = (order < start_edge) | ((order == start_edge) & (j < start_index))
                row[offset] = d * np.float32(in_stop & ~in_start)
        elif kind == HASH:
            for offset in range(len(row)):
                d = _load(model, offset) - _load(base, offset)
                row[offset] = d * np.float32(_draw(key, first + offset) < threshold)
        else:  # RANKED: sparsify.della_keep's probabilities, in its float32 operations
            last = np.float32(width - 1)
            for offset in range(len(row)):
                d = _load(model, offset) - _load(base, offset)
                unit = np.float32(ranks[offset]) / last if width > 1 else np.float32(0)
                probability = low + unit * spread
                keep = np.float64(_draw(key, first + offset)) < np.float64(probability) * 4294967296.0
                row[offset] = d * np.float32(keep)

    @njit(nogil=True, cache=True, error_model="numpy")
    def _scale(row, scale_mode, scale, density, weight):
        """The rescale, then the weight, in the reference's order."""
        if scale_mode == MULTIPLY:
            for offset in range(len(row)):
                row[offset] = row[offset] * scale
        elif scale_mode == DIVIDE:
            for offset in range(len(row)):
                row[offset] = row[offset] / density
        for offset in range(len(row)):
            row[offset] = row[offset] * weight

    @njit(nogil=True, cache=True, error_model="numpy")
    def _histogram_kernel(base, model, start, stop):
        counts = np.zeros(1 << 16, np.int64)
        base, model = base[start:stop], model[start:stop]
        for j in range(len(base)):
            counts[_order_key(_load(model, j) - _load(base, j), False) >> 16] += 1
        return counts

    @njit(nogil=True, cache=True, error_model="numpy")
    def _bins_kernel(base, model, highs, capacities, width, start, stop):
        """For each bin h = highs[s] of |d|'s bits >> 16: with a capacity, (indices, low 16
        bits) of its entries in index order and their count; with capacity 0 (a crowded
        bin), counts of their low 16 bits (`width` 65,536) instead."""
        bins = len(highs)
        indices = np.empty((bins, max(1, capacities.max())), np.int64)
        lows = np.empty((bins, max(1, capacities.max())), np.int64)
        found = np.zeros(bins, np.int64)
        counts = np.zeros((bins, width), np.int64)
        base, model = base[start:stop], model[start:stop]
        for j in range(len(base)):
            bits = _order_key(_load(model, j) - _load(base, j), False)
            high = bits >> 16
            for slot in range(bins):
                if high == highs[slot]:
                    if capacities[slot] == 0:
                        counts[slot, bits & 0xFFFF] += 1
                    else:
                        if found[slot] < capacities[slot]:  # the count came from a histogram: never write past it
                            indices[slot, found[slot]] = start + j
                            lows[slot, found[slot]] = bits & 0xFFFF
                        found[slot] += 1
        return indices, lows, found, counts

    @njit(nogil=True, cache=True, error_model="numpy")
    def _tie_counts_kernel(base, model, bits, start, stop):
        """For each key bits[s]: how many entries of each CHUNK in [start, stop) have it."""
        counts = np.zeros((len(bits), (stop - start + CHUNK - 1) // CHUNK), np.int64)
        base, model = base[start:stop], model[start:stop]
        for j in range(len(base)):
            key = _order_key(_load(model, j) - _load(base, j), False)
            for slot in range(len(bits)):
                if key == bits[slot]:
                    counts[slot, j // CHUNK] += 1
        return counts

    @njit(cache=True)
    def _locate_kernel(counts, rank):
        total = 0
        for index in range(len(counts)):
            if total + counts[index] >= rank:
                return index, total
            total += counts[index]
        return -1, total

    @njit(nogil=True, cache=True, error_model="numpy")
    def _nth_tie_kernel(base, model, bits, n, start, stop):
        """The index of the n-th entry (from 1) in [start, stop) whose |d|'s bits are `bits`."""
        base, model = base[start:stop], model[start:stop]
        for j in range(len(base)):
            if _order_key(_load(model, j) - _load(base, j), False) == bits:
                n -= 1
                if n == 0:
                    return start + j
        return -1

    @njit(nogil=True, cache=True, error_model="numpy")
    def _row_ranks_kernel(base, model, width, ranks, first_row, last_row):
        """ranks of rows [first_row, last_row): an LSD radix sort of |d|'s bits, 8 bits a
        pass (stable, so equal magnitudes keep index order); a pass whose digit is the same
        for the whole row is skipped."""
        keys = np.empty(width, np.uint32)
        order = np.empty(width, np.int64)
        spare = np.empty(width, np.int64)
        counts = np.empty(257, np.int64)
        for row in range(first_row, last_row):
            row_base, row_model = base[row * width:(row + 1) * width], model[row * width:(row + 1) * width]
            for c in range(width):
                keys[c] = _as_bits(np.float32(abs(_load(row_model, c) - _load(row_base, c))))
                order[c] = c
            for shift in (0, 8, 16, 24):
                counts[:] = 0
                for c in range(width):
                    counts[((keys[c] >> np.uint32(shift)) & np.uint32(0xFF)) + 1] += 1
                if counts.max() == width:
                    continue
                for digit in range(1, 257):
                    counts[digit] += counts[digit - 1]
                for c in range(width):
                    digit = (keys[order[c]] >> np.uint32(shift)) & np.uint32(0xFF)
                    spare[counts[digit]] = order[c]
                    counts[digit] += 1
                order, spare = spare, order
            row_ranks = ranks[row * width:(row + 1) * width]
            for position in range(width):
                row_ranks[order[position]] = position

    @njit(nogil=True, cache=True, error_model="numpy")
    def _abs_sums_kernel(base, model, ranks, kind, descending, edges, key, threshold, width, low, spread,
                         scale_mode, scale, density, start, stop):
        """Per CHUNK of [start, stop): (sum |d|, sum |kept d|) in float64."""
        chunks = (stop - start + CHUNK - 1) // CHUNK
        sums = np.zeros(2 * chunks, np.float64)
        kept = np.empty(CHUNK, np.float32)
        for c in range(chunks):
            first = start + c * CHUNK
            last = min(stop, first + CHUNK)
            block_base, block_model = base[first:last], model[first:last]
            row = kept[:last - first]
            _task_vector(block_base, block_model, ranks[first:last] if kind == RANKED else ranks, kind,
                         descending, edges, key, threshold, width, low, spread, first, row)
            total = 0.0
            for j in range(len(row)):
                total += abs(_load(block_model, j) - _load(block_base, j))
            pruned = 0.0
            for j in range(len(row)):
                pruned += abs(row[j])
            sums[2 * c] = total
            sums[2 * c + 1] = pruned
        return sums

    @njit(nogil=True, cache=True, error_model="numpy")
    def _combine_kernel(base, models, ranks, kinds, descending, edges, keys, thresholds, widths, lows, spreads,
                        scale_modes, scales, densities, weights, sign_vote, normalize, divisor, lam, apply_lambda,
                        out, start, stop):
        # Block by block: each model's weighted, pruned task vector into a small buffer, then
        # the vote and the sum, adding the models in order for each entry as the reference does.
        count = len(models)
        weighted = np.empty((count, COMBINE_BLOCK), np.float32)
        buffers = np.empty((3, COMBINE_BLOCK), np.float32)
        for first in range(start, stop, COMBINE_BLOCK):
            last = min(stop, first + COMBINE_BLOCK)
            size = last - first
            block_base = base[first:last]
            for i in range(count):
                row = weighted[i, :size]
                _task_vector(block_base, models[i][first:last], ranks[i][first:last] if kinds[i] == RANKED
                             else ranks[i], kinds[i], descending[i], edges[i], keys[i], thresholds[i], widths[i],
                             lows[i], spreads[i], first, row)
                _scale(row, scale_modes[i], scales[i], densities[i], weights[i])
            total, mixed, agreeing = buffers[0, :size], buffers[1, :size], buffers[2, :size]
            total[:] = 0
            for i in range(count):
                row = weighted[i, :size]
                for offset in range(size):
                    total[offset] = total[offset] + row[offset]
            if sign_vote:
                mixed[:] = 0
                agreeing[:] = 0
                for i in range(count):
                    row, weight = weighted[i, :size], weights[i]
                    for offset in range(size):
                        y = row[offset]
                        positive = total[offset] >= 0
                        agrees = np.float32(((y > 0) & positive) | ((y < 0) & ~positive))
                        mixed[offset] = mixed[offset] + y * agrees
                        agreeing[offset] = agreeing[offset] + weight * agrees
                if normalize:
                    for offset in range(size):
                        share = agreeing[offset]
                        mixed[offset] = mixed[offset] / (share if share != 0 else np.float32(1))
            else:
                for offset in range(size):
                    mixed[offset] = total[offset] / divisor if normalize else total[offset]
            block_out = out[first:last]
            for offset in range(size):
                value = mixed[offset] * lam if apply_lambda else mixed[offset]
                _store(block_out, offset, _load(block_base, offset) + value)

    @njit(nogil=True, cache=True, error_model="numpy")
    def _weighted_sum_kernel(sources, coefficients, out, start, stop):
        # one entry at a time through every source: the sum stays in a register, and is
        # stored (maybe rounded to bfloat16) once
        block_out = out[start:stop]
        first = sources[0][start:stop]
        count = len(sources)
        if count == 2:  # slerp, and most linear merges: a loop that vectorizes
            second, c0, c1 = sources[1][start:stop], coefficients[0], coefficients[1]
            for j in range(len(block_out)):
                _store(block_out, j, _fma(_load(second, j), c1, _load(first, j) * c0))
            return
        for j in range(len(block_out)):
            total = _load(first, j) * coefficients[0]
            for i in range(1, count):
                total = _fma(_load(sources[i], start + j), coefficients[i], total)
            _store(block_out, j, total)

    @njit(nogil=True, cache=True, error_model="numpy")
    def _dots_kernel(first, second, start, stop):
        # eight running sums per quantity, entry j into sum j % 8, added in a fixed order at
        # the end: independent chains that vectorize, and the same result on every CPU
        chunks = (stop - start + CHUNK - 1) // CHUNK
        sums = np.zeros(3 * chunks, np.float64)
        lanes = np.zeros((3, 8), np.float64)
        for c in range(chunks):
            a, b = first[start + c * CHUNK:min(stop, start + (c + 1) * CHUNK)], \
                second[start + c * CHUNK:min(stop, start + (c + 1) * CHUNK)]
            lanes[:] = 0
            whole = len(a) - len(a) % 8
            for group in range(0, whole, 8):
                for lane in range(8):
                    x, y = np.float64(_load(a, group + lane)), np.float64(_load(b, group + lane))
                    lanes[0, lane] += x * y
                    lanes[1, lane] += x * x
                    lanes[2, lane] += y * y
            for j in range(whole, len(a)):
                x, y = np.float64(_load(a, j)), np.float64(_load(b, j))
                lanes[0, 0] += x * y
                lanes[1, 0] += x * x
                lanes[2, 0] += y * y
            for quantity in range(3):
                total = 0.0
                for lane in range(8):
                    total += lanes[quantity, lane]
                sums[3 * c + quantity] = total
        return sums
