"""A search's evaluations on Ray workers (`pip install ray`; imported only when asked for).

    evaluator = RayEvaluator(objectives, address="10.0.0.5:6379")   # or workers=2 on this machine
    result = search(space, objectives, budget, evaluator=evaluator)
    evaluator.close()

The driver runs CMA-ES; each worker (a Ray actor: by default one per GPU when the cluster
has GPUs, else 2) holds its own LiveMerge of the sources and re-merges it in
place for every candidate it is given. A generation's candidates go to the workers as they
become free; an evaluation whose worker dies is given to another one (a new worker replaces
the lost one). Scores depend only on a candidate's weights, so the search proposes, scores
and ends exactly as the single-process search with the same seed.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Optional

from .errors import MergeError

CONNECT_SECONDS = 5.0
MOST_RETRIES = 3  # an evaluation given to this many workers that all died is given up on


def check_address(address: str) -> None:
    """One line, before any work, when nothing answers at a Ray cluster's address."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise MergeError(f"the Ray address '{address}' is not HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise MergeError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None


def _ray():
    try:
        import ray
    except ImportError:
        raise MergeError("distributing the search needs Ray: pip install 'ray>=2.9'") from None
    return ray


class _Worker:
    """One Ray actor: a LiveMerge of the sources, re-merged in place for each candidate."""

    def __init__(self, objectives, device: str):
        from .search import LocalEvaluator

        self.evaluate_locally = LocalEvaluator(objectives, device)

    def evaluate(self, recipe: str) -> tuple[dict, float]:
        from .config import load_config

        return self.evaluate_locally([load_config(recipe)])[0]


def _cause(error: Exception) -> str:
    """The innermost `SomeError: message` line of a Ray error (its text holds the worker's
    traceback), else the error's type."""
    lines = re.findall(r"^(\w+(?:Error|Exception): .+)$", str(error), re.MULTILINE)
    return lines[-1] if lines else type(error).__name__


class RayEvaluator:
    """Scores a generation's candidates on Ray workers, in parallel (see the module)."""

    parallel = True

    def __init__(self, objectives, *, address: Optional[str] = None, workers: Optional[int] = None):
        """`workers`: how many (each holds a live model): on this machine 2 by default; on a
        cluster one per GPU by default, else 2."""
        if workers is not None and (isinstance(workers, bool) or not 1 <= workers <= 256):
            raise MergeError(f"{workers} Ray workers: between 1 and 256")
        if address is not None:
            check_address(address)
        ray = _ray()
        self.ray = ray
        self.started_here = not ray.is_initialized()
        if self.started_here:
            package = Path(__file__).resolve().parent
            if address is not None:  # the cluster's machines get this copy of the library
                ray.init(address=address, runtime_env={"py_modules": [str(package)]}, logging_level="ERROR",
                         log_to_driver=False)
            else:  # workers on this machine import it from here
                path = os.pathsep.join(filter(None, [str(package.parent), os.environ.get("PYTHONPATH")]))
                ray.init(num_cpus=workers or 2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.count = workers or gpus or 2
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        self.device = "cuda" if gpus else "cpu"
        self.actor_class = ray.remote(**options)(_Worker)
        self.objectives = objectives
        self.actors = [self._new_actor() for _ in range(self.count)]

    def _new_actor(self):
        return self.actor_class.remote(self.objectives, self.device)

    def __call__(self, candidates) -> list[tuple[dict, float]]:
        ray = self.ray
        texts = [candidate.to_yaml() for candidate in candidates]
        results: list = [None] * len(texts)
        waiting = list(range(len(texts)))
        attempts = [0] * len(texts)
        free = list(self.actors)
        running: dict = {}  # object ref -> (candidate index, actor)
        while waiting or running:
            while waiting and free:
                index, actor = waiting.pop(0), free.pop(0)
                attempts[index] += 1
                running[actor.evaluate.remote(texts[index])] = (index, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            for reference in done:
                index, actor = running.pop(reference)
                try:
                    results[index] = ray.get(reference)
                    free.append(actor)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.NodeDiedError) as error:
                    # the worker is gone: another one takes the evaluation, a new one its place
                    if attempts[index] >= MOST_RETRIES:
                        raise MergeError(f"candidate {index + 1} of the generation lost {attempts[index]} "
                                         f"workers in a row; the last said: {_cause(error)}") from None
                    self.actors.remove(actor)
                    replacement = self._new_actor()
                    self.actors.append(replacement)
                    free.append(replacement)
                    waiting.insert(0, index)
        return results

    def close(self) -> None:
        """End the workers (and the local Ray this evaluator started)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_here:
            self.ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
