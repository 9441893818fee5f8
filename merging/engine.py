"""The streaming executor: read each task's inputs, call the method, hand the result on.

Elementwise methods (linear, slerp, task_arithmetic, nearswap, passthrough) run in
row blocks: a pass over the blocks for the few tensor-wide sums they need, then a pass
that computes and emits each block. Memory stays at a few blocks whatever the tensor's
size. Other methods get whole tensors, and their result is emitted in blocks. All
arithmetic is float32 on `device`; each block is cast once, to the output dtype.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Protocol

import torch

from .errors import MergeError
from .methods.registry import TensorCache, TensorInputs
from .plan import MergePlan, TensorTask

Progress = Callable[[int, int, str], None]
BLOCK_ELEMENTS = 1024 * 1024  # 4 MB of float32 per input block: flat memory, no loss of speed


class Sink(Protocol):
    def write(self, name: str, blocks: Iterator[torch.Tensor]) -> None:
        """Take one tensor as consecutive row blocks (their rows concatenated, in order)."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


class TaskInputs:
    """A task's input tensors as stored (views of the mapped files), read by row blocks."""

    def __init__(self, plan: MergePlan, task: TensorTask, device: torch.device):
        self.task = task
        self.device = device
        self.sources = [(plan.checkpoints[model], name) for model, name in task.inputs]
        self.stored = [checkpoint.read(name) for checkpoint, name in self.sources]
        self.rows = task.shape[0] if task.shape else 1

    def release(self, start: int = 0, stop: Optional[int] = None) -> None:
        """Hand rows [start, stop) of the inputs back to the page cache (all rows by default)."""
        for (checkpoint, name), tensor in zip(self.sources, self.stored):
            row_bytes = tensor[0].numel() * tensor.element_size() if tensor.dim() else 0
            end = None if stop is None else stop * row_bytes
            checkpoint.release(name, start * row_bytes, end)

    def block(self, start: int, stop: int, scratch: Optional["Scratch"] = None,
              stored: bool = False) -> list[torch.Tensor]:
        """Rows [start, stop) of every input, in float32 on the device (in `scratch`'s
        reusable buffers when given; as stored, without conversion, when `stored` and the
        inputs already live on the device); vocabulary tensors cut or padded (from the
        filler input) to the planned row count."""
        if not self.task.shape:
            return [self._convert(t) for t in self.stored]
        stop = min(stop, self.rows)
        blocks = []
        for index, tensor in enumerate(self.stored):
            rows = tensor[start:min(stop, tensor.shape[0])]
            if rows.shape[0] < stop - start:  # a model with fewer vocabulary rows
                filler = self.stored[self.task.filler_index]
                rows = torch.cat([rows, filler[start + rows.shape[0]:stop]])
            if stored and rows.device == self.device:
                blocks.append(rows)
            elif scratch is None or not rows.is_floating_point():
                blocks.append(self._convert(rows))
            else:
                blocks.append(scratch.take(index, rows.shape).copy_(rows))
        return blocks

    def _convert(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(device=self.device, dtype=torch.float32)

    def block_rows(self) -> int:
        row_size = 1
        for size in self.task.shape[1:]:
            row_size *= size
        return max(1, BLOCK_ELEMENTS // max(1, row_size))


class Scratch:
    """Float32 block buffers on one device, reused from block to block and task to task,
    so streaming a tensor allocates nothing: conversions and results land in them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict = {}

    def take(self, slot, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        buffer = self.buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(max(count, BLOCK_ELEMENTS), dtype=dtype, device=self.device)
            self.buffers[slot, dtype] = buffer
        return buffer[:count].view(shape)


def make_inputs(plan: MergePlan, task: TensorTask, tensors: list[torch.Tensor], seed: int,
                cache: Optional[TensorCache] = None) -> TensorInputs:
    base = tensors[task.base_index] if task.base_index is not None else None
    models = [t for i, t in enumerate(tensors) if i != task.base_index]
    sources = [s for i, s in enumerate(task.inputs) if i != task.base_index]
    base_source = task.inputs[task.base_index] if task.base_index is not None else None
    keys = [(s, task.vocab_rows) for s in sources] + [(base_source, task.vocab_rows)]
    return TensorInputs(models, base, task.params, task.model_params,
                        task.seed(seed) if plan.method.random else None, task.name, keys, cache)


def statistics_key(plan: MergePlan, task: TensorTask) -> tuple:
    """What an elementwise method's tensor-wide sums depend on: the method and the inputs."""
    return (plan.method.name, tuple(task.inputs), task.base_index, task.vocab_rows)


def merged_blocks(plan: MergePlan, task: TensorTask, device: torch.device, seed: int, *,
                  release: bool = True, statistics_cache: Optional[dict] = None,
                  scratch: Optional[Scratch] = None, cache: Optional[TensorCache] = None,
                  destination: Optional[torch.Tensor] = None, batch=None) -> Iterator[torch.Tensor]:
    """The task's output in float32 on `device`, as consecutive row blocks (integer
    buffers as stored). Sinks cast each block to `task.out_dtype`; a block may live in a
    reused buffer, so it must be consumed before the next one is asked for.

    `release` hands the inputs' pages back once read (a one-shot merge); a live session
    keeps them. `statistics_cache` keeps elementwise methods' tensor-wide sums between
    calls, so changing a parameter skips the pass that computes them; `cache` keeps what
    whole-tensor methods can reuse (pruning rules). `destination` is where the sink will
    put the tensor (a live model's parameter, of the task's shape): methods that can round
    their result straight into it do, and then yield views of it (one pass less); with a
    `batch` (methods.fused.SumBatch) those passes may wait there: the destination holds the
    result once the batch has run.
    """
    inputs = TaskInputs(plan, task, device)
    step = inputs.block_rows()
    elementwise = plan.method.elementwise
    scratch = scratch or Scratch(device)
    if not inputs.stored[0].dtype.is_floating_point:
        yield inputs.stored[0].clone()  # integer buffers are copied from the first input
        return
    if destination is not None and (tuple(destination.shape) != tuple(task.shape) or not destination.is_contiguous()):
        destination = None
    if elementwise is None or not task.shape:
        whole = inputs.block(0, inputs.rows, stored=plan.method.stored_inputs)
        given = make_inputs(plan, task, whole, seed, cache)
        given.out = destination if plan.method.stored_inputs else None
        result = plan.method.merge(given)
        if release:
            inputs.release()
        for start in range(0, max(1, inputs.rows), step) if task.shape else [0]:
            yield result[start:start + step] if task.shape else result
        return
    starts = list(range(0, inputs.rows, step))
    single = None
    key = statistics_key(plan, task)
    sums = statistics_cache.get(key) if statistics_cache is not None else None
    if elementwise.statistics is not None and sums is None:
        for start in starts:
            block = make_inputs(plan, task, inputs.block(start, start + step, scratch,
                                                         stored=elementwise.stored_dtype_ok), seed)
            partial = elementwise.statistics(block).double()
            sums = partial if sums is None else sums + partial
            if len(starts) == 1:
                single = block  # one block: read it once
            elif release:
                inputs.release(start, start + step)  # read again, from the page cache, below
        if statistics_cache is not None:
            statistics_cache[key] = sums
    coefficients = None
    in_place = destination is not None and elementwise.any_out_dtype
    for index, start in enumerate(starts):
        block = single or make_inputs(plan, task, inputs.block(start, start + step, scratch,
                                                               stored=elementwise.stored_dtype_ok), seed)
        if index == 0:  # parameters are per tensor, so the first block's serve them all
            coefficients = elementwise.coefficients(sums, block)
        first = block.base if block.base is not None else block.models[0]
        if in_place:
            out = destination[start:start + step]
            block.batch = batch
        elif elementwise.any_out_dtype and task.out_dtype.is_floating_point:  # rounded once, here
            out = scratch.take("out", first.shape, task.out_dtype)
        else:
            out = scratch.take("out", first.shape)
        output = elementwise.combine(block, coefficients, out)
        if release:
            inputs.release(start, start + step)
        yield output


def run_plan(plan: MergePlan, sink: Sink, device: str = "auto", seed: int = 0,
             progress: Optional[Progress] = None) -> None:
    """Compute every task of `plan` in order and write each result to `sink`."""
    target = resolve_device(device)
    scratch = Scratch(target)
    total = len(plan.tasks)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="readahead") as readahead:
        for index, task in enumerate(plan.tasks):
            if index + 1 < total:  # ask the kernel for the next task's pages meanwhile
                readahead.submit(_prefetch, plan, plan.tasks[index + 1])
            sink.write(task.name, merged_blocks(plan, task, target, seed, scratch=scratch))
            if progress is not None:
                progress(index + 1, total, task.name)


def _prefetch(plan: MergePlan, task: TensorTask) -> None:
    for model, name in task.inputs:
        plan.checkpoints[model].prefetch(name)
