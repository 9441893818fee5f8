"""LiveMerge: a merged model in memory, re-merged in place when the recipe changes.

    live = LiveMerge(config)            # sources memory-mapped, merged model built once
    live.model, live.tokenizer          # a transformers model ready to generate
    stats = live.update(new_config)     # same models: only changed tensors are recomputed

The model's tensors are exactly what `merge()` writes for the same config: both run
the same plan through the same engine, one into files, this one into parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .config import MergeConfig, MultiStageConfig, load_config
from .engine import Scratch, merged_blocks, resolve_device
from .methods.fused import SumBatch
from .methods.registry import TensorCache
from .errors import MergeError
from .folder import resolve_chat_template
from .pipeline import fetch_weights, open_checkpoints
from .placement import MaxMemory, Placed, empty_model, parse_max_memory, place
from .plan import TORCH_DTYPES, MergePlan, TensorTask, plan_merge
from .architecture import Structure, fused_part
from .sources import Checkpoint


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class UpdateStats:
    """What an update did."""

    recomputed: int
    skipped: int
    seconds: float
    rebuilt: bool = False
    reason: str = ""
    cache_bytes: int = 0

    def __str__(self) -> str:
        total = self.recomputed + self.skipped
        text = f"recomputed {self.recomputed} of {total} tensors in {self.seconds:.3f} s"
        if self.rebuilt:
            text += f" (model rebuilt: {self.reason})"
        return text


def task_signature(plan: MergePlan, task: TensorTask, seed: int) -> tuple:
    """Everything a tensor's value depends on; equal signatures mean an equal tensor."""
    return (plan.method.name, task.shape, tuple(task.inputs), task.base_index, repr(task.params),
            repr(task.model_params), task.vocab_rows, task.filler_index,
            seed if plan.method.random else None)


class ModelSink:
    """Writes merged tensors into a model's parameters, in place, cast to their dtype.

    Merged tensors carry their stored names; the architecture model says which parameter
    each loads into (renamed, or a part of a fused one: Mixtral's per-expert weights)."""

    def __init__(self, model: torch.nn.Module, structure: Structure,
                 tensors: Optional[dict[str, torch.Tensor]] = None):
        # a placed model's offloaded weights live outside its modules (see merging.placement)
        self.tensors = tensors if tensors is not None else dict(model.state_dict(keep_vars=True))
        self.structure = structure

    def has(self, name: str) -> bool:
        return self._target(name) is not None

    def _target(self, name: str) -> Optional[torch.Tensor]:
        if name in self.tensors:
            return self.tensors[name].data
        part = fused_part(self.structure, name)
        if part is None:
            module = self.tensors.get(self.structure.module_name(name))
            return None if module is None else module.data
        if part.parameter not in self.tensors:
            return None
        expert = self.tensors[part.parameter].data[part.expert]
        return expert.chunk(part.parts, dim=part.dim)[part.part] if part.parts > 1 else expert

    def destination(self, name: str, device: torch.device) -> Optional[torch.Tensor]:
        """The parameter `name` is written to, when a merge on `device` can write straight into it."""
        target = self._target(name)
        if target is None or target.device != device:
            return None
        return target if target.is_contiguous() and target.is_floating_point() else None

    @torch.no_grad()
    def write(self, name: str, blocks) -> None:
        target = self._target(name)
        if target.is_contiguous():
            flat = target.view(-1)
            offset = 0
            for block in blocks:
                count = block.numel()
                place = flat[offset:offset + count]
                if block.data_ptr() != place.data_ptr() or block.dtype != place.dtype:  # not merged in place
                    place.copy_(block.reshape(-1))
                offset += count
        else:  # a part of a fused parameter split along a later dimension
            whole = torch.cat([block.reshape(-1) for block in blocks])
            offset = whole.numel()
            if offset == target.numel():
                target.copy_(whole.reshape(target.shape))
        if offset != target.numel():
            raise RuntimeError(f"{name}: wrote {offset} of {target.numel()} values")


class LiveMerge:
    """A merge kept in memory as a transformers model, updated in place.

    `dtype` sets the model's dtype (default: the recipe's out_dtype or dtype, else the
    base's storage dtype); `seed` seeds random methods per tensor, so the same settings
    always give the same model; `cache_budget_bytes` bounds the cache of pruned task
    vectors that makes weight and lambda changes of TIES/DARE merges skip the pruning.
    `progress(done, total)` (here and in `update`) is called after each tensor merged.

    `max_memory` ({"cuda:0": "20GiB", "cpu": "60GiB"}, or the text "cuda:0=20GiB,cpu=60GiB")
    places a model bigger than one device with accelerate: whole layers fill the GPUs,
    then CPU memory, then files in a new folder under `offload_folder` (the system's
    temporary folder by default); each re-merged tensor is written where it lives
    (merging.placement). Without it the whole model is on `device`.
    """

    def __init__(self, config, device: str = "auto", *, dtype: Optional[str] = None, seed: int = 0,
                 cache_budget_bytes: int = 1 << 30, trust_remote_code: bool = False,
                 progress: Optional[Callable[[int, int], None]] = None,
                 max_memory: Optional[Union[MaxMemory, str]] = None, offload_folder: Optional[Path] = None):
        self.device = resolve_device(device)
        self.max_memory = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
        self.offload_folder = offload_folder
        self.placed: Optional[Placed] = None
        self.seed = seed
        self.requested_dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.statistics_cache: dict = {}
        self.tensor_cache = TensorCache(cache_budget_bytes)
        self.scratch = Scratch(self.device)
        self.checkpoints: dict[str, Checkpoint] = {}
        self.model = None
        self.tokenizer = None
        self.last_stats = self._build(self._single(config), "first build", progress)

    # ---- building ------------------------------------------------------------------
    @staticmethod
    def _single(config) -> MergeConfig:
        config = load_config(config)
        if isinstance(config, MultiStageConfig):
            raise MergeError("LiveMerge takes one merge; run the earlier stages of a multi-stage "
                             "file with merge() and name their folders as models")
        return config

    def _open(self, config: MergeConfig) -> dict[str, Checkpoint]:
        """The config's models, opened once per session and reused by later updates."""
        self.checkpoints.update(open_checkpoints(config, known=self.checkpoints))
        return {name: self.checkpoints[name] for name in config.referenced_models()}

    def _build(self, config: MergeConfig, reason: str, progress=None) -> UpdateStats:
        started = time.perf_counter()
        plan = plan_merge(config, self._open(config))
        fetch_weights(plan)
        self.checkpoints.update(plan.checkpoints)
        model, placed = self._new_model(plan)
        reference = plan.config.base_model or plan.config.referenced_models()[0]
        sink = ModelSink(model, plan.checkpoints[reference].layout.structure,
                         tensors=placed.tensors if placed is not None else None)
        for task in plan.tasks:
            if not sink.has(task.name):
                raise MergeError(f"the {type(model).__name__} built from the merged config has no tensor "
                                 f"'{task.name}'")
        self._merge_tasks(plan, plan.tasks, sink, progress)
        signatures = {task.name: task_signature(plan, task, self.seed) for task in plan.tasks}
        if placed is None and getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # (a placed model was tied before its weights were placed)
        model.eval()
        self.model, self.placed, self.sink = model, placed, sink
        self.plan, self.config, self.signatures = plan, config, signatures
        self.tokenizer = self._tokenizer(plan)
        return UpdateStats(len(plan.tasks), 0, time.perf_counter() - started, True, reason,
                           self.cache_bytes)

    def _model_dtype(self, plan: MergePlan) -> torch.dtype:
        name = self.requested_dtype or plan.config.out_dtype or plan.config.dtype
        if name:
            return TORCH_DTYPES[name]
        floats = [t.out_dtype for t in plan.tasks if t.out_dtype.is_floating_point]
        return floats[0] if floats else torch.float32

    def _new_model(self, plan: MergePlan) -> tuple[torch.nn.Module, Optional[Placed]]:
        """The model the merge is written into: on `device`, or placed within `max_memory`."""
        dtype = self._model_dtype(plan)
        if self.max_memory is None:
            from transformers.initialization import no_init_weights

            with no_init_weights():  # every weight is about to be written by the merge
                return self._empty_model(plan, dtype).to(self.device), None
        model = empty_model(lambda: self._empty_model(plan, dtype))
        return model, place(model, self.max_memory, dtype, self.offload_folder)

    def _empty_model(self, plan: MergePlan, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, CONFIG_MAPPING

        values = dict(plan.out_config)
        model_type = values.get("model_type")
        if model_type in CONFIG_MAPPING:
            model_config = CONFIG_MAPPING[model_type].from_dict(values)
        elif self.trust_remote_code:  # the architecture's code comes from the base model's folder
            from transformers import AutoConfig

            reference = plan.checkpoints[plan.config.base_model or plan.config.referenced_models()[0]].folder
            model_config = AutoConfig.from_pretrained(reference, trust_remote_code=True)
            for key, value in values.items():
                setattr(model_config, key, value)
        else:
            raise MergeError(f"transformers has no built-in model type '{model_type}'; running the "
                             "model's own code needs trust_remote_code, which is off")
        import transformers

        # the class the config names (a multimodal model chats with its text alone), else the causal LM
        named = [getattr(transformers, n, None) for n in values.get("architectures") or []]
        model_class = next((c for c in named if c is not None), None)
        if model_class is not None and model_type in CONFIG_MAPPING:
            return model_class._from_config(model_config, dtype=dtype)
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=self.trust_remote_code)

    def _tokenizer(self, plan: MergePlan):
        from transformers import AutoTokenizer

        donor = plan.checkpoints[plan.tokenizer_donor].folder if plan.tokenizer_donor else None
        if donor is None or not any((Path(donor) / name).is_file() for name in TOKENIZER_FILES):
            return None  # weights alone (a benchmark's random model): a merge to inspect, not to chat with
        tokenizer = AutoTokenizer.from_pretrained(donor, trust_remote_code=self.trust_remote_code)
        if plan.vocabulary is not None:
            from .sources.vocabulary import extend_tokenizer

            extend_tokenizer(tokenizer, plan.vocabulary)
        if plan.config.chat_template:
            folders = [plan.checkpoints[m].folder for m in plan.config.referenced_models()]
            template = resolve_chat_template(plan.config.chat_template, folders)
            if template:
                tokenizer.chat_template = template
        return tokenizer

    # ---- updating ------------------------------------------------------------------
    def update(self, config, progress: Optional[Callable[[int, int], None]] = None) -> UpdateStats:
        """Re-merge for `config`: recompute only the tensors whose inputs or resolved
        parameters changed, writing them into the model's parameters in place. Other
        models, or a different layer layout (e.g. new passthrough slices), rebuild."""
        config = self._single(config)
        started = time.perf_counter()
        if set(config.referenced_models()) != set(self.config.referenced_models()):
            self.last_stats = self._build(config, "the models changed", progress)
            return self.last_stats
        plan = plan_merge(config, self._open(config))
        layout = [(t.name, t.shape) for t in plan.tasks]
        if layout != [(t.name, t.shape) for t in self.plan.tasks] or plan.out_config != self.plan.out_config:
            self.last_stats = self._build(config, "the output's layers or shapes changed", progress)
            return self.last_stats
        dtype = self._model_dtype(plan)
        if dtype != self._model_dtype(self.plan):
            self.last_stats = self._build(config, "the model dtype changed", progress)
            return self.last_stats
        sink = self.sink
        signatures = {task.name: task_signature(plan, task, self.seed) for task in plan.tasks}
        changed = [task for task in plan.tasks if self.signatures.get(task.name) != signatures[task.name]]
        try:
            self._merge_tasks(plan, changed, sink, progress)
        except BaseException:
            self.signatures = {}  # tensors may be half written: the next update recomputes every one
            raise
        self.signatures = signatures
        recomputed = len(changed)
        if plan.tokenizer_donor != self.plan.tokenizer_donor or config.chat_template != self.config.chat_template:
            self.tokenizer = self._tokenizer(plan)
        self.plan, self.config = plan, config
        self.last_stats = UpdateStats(recomputed, len(plan.tasks) - recomputed,
                                      time.perf_counter() - started, cache_bytes=self.cache_bytes)
        return self.last_stats

    @torch.no_grad()
    def _merge_tasks(self, plan: MergePlan, tasks: list[TensorTask], sink: ModelSink, progress=None) -> None:
        """Merge `tasks` into the model's tensors where they live, calling progress(done, total).
        On a CPU, slerp's and linear's passes into the parameters are gathered and run
        together on every thread (methods.fused.SumBatch)."""
        batch = SumBatch() if self.device.type == "cpu" else None
        for done, task in enumerate(tasks):
            sink.write(task.name, merged_blocks(plan, task, self.device, self.seed, release=False,
                                                statistics_cache=self.statistics_cache, scratch=self.scratch,
                                                cache=self.tensor_cache, batch=batch,
                                                destination=sink.destination(task.name, self.device)))
            if progress is not None:
                progress(done + 1, len(tasks))
        if batch is not None:
            batch.run()  # the last gathered passes (at most `SumBatch.limit` entries: tens of ms)

    @property
    def cache_bytes(self) -> int:
        """Memory held by the caches: elementwise methods' per-tensor sums and the pruned
        task vectors of the TIES/DARE family (within `cache_budget_bytes`)."""
        sums = sum(t.numel() * t.element_size() for t in self.statistics_cache.values())
        return sums + self.tensor_cache.bytes

    # ---- generating ----------------------------------------------------------------
    def _chat_ready(self) -> None:
        if self.tokenizer is None:
            raise MergeError("this merge has no tokenizer (none of its models' folders has one), so it cannot chat")

    def generate(self, messages, sampling=None, **overrides):
        """The merged model's answer (see merging.generation.generate)."""
        self._chat_ready()
        from .generation import Sampling, generate
        return generate(self.model, self.tokenizer, messages, sampling or Sampling(), **overrides)

    def stream(self, messages, sampling=None, **overrides):
        """Text pieces, then a Generation (see merging.generation.stream)."""
        self._chat_ready()
        from .generation import Sampling, stream
        return stream(self.model, self.tokenizer, messages, sampling or Sampling(), **overrides)
