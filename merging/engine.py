"""The streaming executor: read each task's inputs, call the method, hand the result on.

One tensor at a time (the next task's inputs are read on a second thread while the
current one computes), arithmetic in float32 on `device`, one cast on output.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Protocol

import torch

from .methods.registry import TensorInputs
from .plan import MergePlan, TensorTask

Progress = Callable[[int, int, str], None]


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor) -> None: ...


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        from .errors import MergeError
        raise MergeError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def fit_rows(tensor: torch.Tensor, rows: int, filler: torch.Tensor) -> torch.Tensor:
    """Cut a vocabulary tensor to `rows`, or pad it with the filler's rows."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, filler[tensor.shape[0]:rows]], dim=0)


def read_inputs(plan: MergePlan, task: TensorTask, device: torch.device) -> list[torch.Tensor]:
    """The task's input tensors in float32 on `device` (views of the files when already so)."""
    tensors = []
    for model, name in task.inputs:
        checkpoint = plan.checkpoints[model]
        stored = checkpoint.read(name)
        if stored.is_floating_point():
            stored = stored.to(device=device, dtype=torch.float32)
        tensors.append(stored)
    if task.vocab_rows is not None:
        filler = tensors[task.filler_index]
        tensors = [fit_rows(t, task.vocab_rows, filler) for t in tensors]
    return tensors


def release_inputs(plan: MergePlan, task: TensorTask) -> None:
    for model, name in task.inputs:
        plan.checkpoints[model].release(name)


def compute(plan: MergePlan, task: TensorTask, tensors: list[torch.Tensor], seed: int) -> torch.Tensor:
    """The merged tensor for one task, in float32 on the inputs' device."""
    if not tensors[0].is_floating_point():
        return tensors[0]  # integer buffers are copied from the first input
    base = tensors[task.base_index] if task.base_index is not None else None
    models = [t for i, t in enumerate(tensors) if i != task.base_index]
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=tensors[0].device)
        generator.manual_seed(task.seed(seed))
    inputs = TensorInputs(models, base, task.params, task.model_params, generator, task.name)
    return plan.method.merge(inputs)


def run_plan(plan: MergePlan, sink: Sink, device: str = "auto", seed: int = 0,
             progress: Optional[Progress] = None) -> None:
    """Compute every task of `plan` in order and write each result to `sink`."""
    target = resolve_device(device)
    total = len(plan.tasks)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as reader:
        pending = reader.submit(read_inputs, plan, plan.tasks[0], target) if total else None
        for index, task in enumerate(plan.tasks):
            tensors = pending.result()
            if index + 1 < total:
                pending = reader.submit(read_inputs, plan, plan.tasks[index + 1], target)
            result = compute(plan, task, tensors, seed)
            sink.write(task.name, result.to(dtype=task.out_dtype))
            del tensors, result
            release_inputs(plan, task)
            if progress is not None:
                progress(index + 1, total, task.name)
