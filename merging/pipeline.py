"""merge(): config in, model folder out; several stages in dependency order."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

from . import folder as folder_files
from .config import MergeConfig, MultiStageConfig, load_config
from .engine import Progress, resolve_device, run_plan
from .errors import MergeError
from .plan import MergePlan, plan_merge
from .sources import Checkpoint, open_folder, open_model
from .writer import (ShardedSafetensorsWriter, atomic_folder, check_free_space, check_output_folder,
                     claim_folder, make_sibling_folder, remove_siblings)

DEFAULT_SHARD_BYTES = 5 * 1000**3


def open_checkpoints(config: MergeConfig, known: Optional[dict[str, Checkpoint]] = None
                     ) -> dict[str, Checkpoint]:
    """Every model the config names, headers only (hub weights are not downloaded yet);
    `known` supplies the outputs of earlier stages."""
    checkpoints = {}
    for name in config.referenced_models():
        if known and name in known:
            checkpoints[name] = known[name]
        else:
            checkpoints[name] = open_model(name, download_weights=False)
    return checkpoints


def fetch_weights(plan: MergePlan) -> None:
    """Download the weights of hub models the plan was checked against by their headers."""
    for name, checkpoint in plan.checkpoints.items():
        plan.checkpoints[name] = checkpoint.fetched()


def plan_stages(config) -> list[MergePlan]:
    """Plans for every stage, in the order they run, checked against the models' headers
    (no weights are downloaded); later stages are checked against what earlier stages
    will write (config and tensors), so a whole multi-stage file fails before any work.

    What an earlier stage's output holds beyond those (its tokenizer) exists only once it is
    written: a stage whose vocabulary is the union over an earlier stage's tokenizer is
    checked here without it (a warning says so), and every stage that reads an earlier one
    is planned again once that one is written (`replan`)."""
    config = load_config(config)
    stages = config.order() if isinstance(config, MultiStageConfig) else [config]
    outputs: dict[str, Checkpoint] = {}
    plans = []
    for stage in stages:
        checkpoints = open_checkpoints(stage, outputs)
        waits_for = [name for name in stage.referenced_models() if name in outputs]
        if waits_for and _tokenizer_source(stage) == "union":
            plan = plan_merge(_without_tokenizer(stage), checkpoints)
            plan.config = stage
            # what the variant said about vocabularies holds no more once the tokenizer exists
            plan.warnings = [w for w in plan.warnings if not w.startswith(("vocabulary", "vocabularies"))]
            plan.warnings.append(f"tokenizer_source union over stage {', '.join(map(repr, waits_for))}: the "
                                 "vocabulary (and so the embedding rows) is planned once that stage is written")
        else:
            plan = plan_merge(stage, checkpoints)
        if stage.name:
            outputs[stage.name] = plan.as_checkpoint(stage.name)
        plans.append(plan)
    return plans


def replan(plan: MergePlan, written: dict[str, Checkpoint]) -> MergePlan:
    """The plan of a stage made again against the folders earlier stages wrote (their
    tokenizers included), or the plan itself when it reads no earlier stage."""
    if not any(name in written for name in plan.config.referenced_models()):
        return plan
    return plan_merge(plan.config, open_checkpoints(plan.config, written))


def _tokenizer_source(config: MergeConfig) -> Optional[str]:
    return (config.tokenizer or {}).get("source") or config.tokenizer_source


def _without_tokenizer(config: MergeConfig) -> MergeConfig:
    """The stage as planned before an earlier stage's tokenizer exists: every other check."""
    import dataclasses

    return dataclasses.replace(config, tokenizer_source=None, tokenizer=None)  # notes and warnings kept


def merge(config, out_dir: Union[str, Path], device: str = "auto", progress: Optional[Progress] = None,
          *, seed: int = 0, out_shard_size: int = DEFAULT_SHARD_BYTES,
          intermediate_dir: Optional[Union[str, Path]] = None, overwrite: bool = False,
          plans: Optional[list[MergePlan]] = None, card_extra: str = "") -> Path:
    """Merge as `config` says and write a Hugging Face model folder at `out_dir`.

    `config` is a MergeConfig, a MultiStageConfig, YAML text or a path. Everything is
    checked before any tensor is read; the folder appears only when complete.
    `progress(done, total, tensor_name)` is called after each tensor; `card_extra` is
    Markdown added to the model card (scores, say).
    """
    config = load_config(config)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    resolve_device(device)
    plans = plans or plan_stages(config)
    stages_parent = Path(intermediate_dir) if intermediate_dir else out_dir.resolve().parent
    check_free_space([(stages_parent, plan.disk_bytes) for plan in plans[:-1]]
                     + [(out_dir.resolve().parent, plans[-1].disk_bytes)])  # before a tensor is read
    if len(plans) == 1:
        return write_merge(plans[0], out_dir, device, progress, seed, out_shard_size, overwrite, card_extra)

    # The claim is held across the stages (the final stage's atomic_folder re-enters it), so
    # this run's stages folder, named like the output's other siblings, is never taken for stale.
    with claim_folder(out_dir):
        keep = intermediate_dir is not None
        try:
            work = Path(intermediate_dir) if keep else make_sibling_folder(out_dir, "stages")
            work.mkdir(parents=True, exist_ok=True)
            written = write_earlier_stages(plans, work, device, progress, seed, out_shard_size)
            write_merge(replan(plans[-1], written), out_dir, device, progress, seed, out_shard_size, overwrite,
                        card_extra)
            return out_dir
        finally:
            if not keep:  # by pattern: an interruption may come before `work` is assigned
                remove_siblings(out_dir, ("stages",))


def write_earlier_stages(plans: list[MergePlan], work: Path, device: str = "auto",
                         progress: Optional[Progress] = None, seed: int = 0,
                         out_shard_size: int = DEFAULT_SHARD_BYTES) -> dict[str, Checkpoint]:
    """Write every stage but the last into `work`, in order, each under a folder name chosen
    here; returns the written checkpoints by stage name."""
    written: dict[str, Checkpoint] = {}
    for index, plan in enumerate(plans[:-1]):
        plan = replan(plan, written)  # against the folders the earlier stages wrote, not stand-ins
        target = work / stage_folder_name(index, plan.config.name)
        # an intermediate folder left by an earlier run is stale: replace it
        write_merge(plan, target, device, progress, seed, out_shard_size, overwrite=True)
        written[plan.config.name] = open_folder(target, plan.config.name)
    return written


def merge_stages_into(config, work: Union[str, Path], device: str = "auto", progress: Optional[Progress] = None,
                      *, seed: int = 0, plans: Optional[list[MergePlan]] = None) -> MergeConfig:
    """Write the earlier stages of a multi-stage config into `work` and return its last stage
    with their names replaced by those folders: what a live merge of the file merges."""
    config = load_config(config)
    plans = plans or plan_stages(config)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    written = write_earlier_stages(plans, work, device, progress, seed)
    return plans[-1].config.with_models_renamed({name: str(c.folder) for name, c in written.items()})


def stage_folder_name(index: int, name: str) -> str:
    """The folder an earlier stage's output gets inside the intermediate folder: chosen here,
    never the user's string as a path (the index keeps it one plain component, not '..')."""
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}"


def write_merge(plan: MergePlan, out_dir: Path, device: str, progress: Optional[Progress], seed: int,
                out_shard_size: int, overwrite: bool, card_extra: str = "") -> Path:
    """Run one plan into a folder: weights, config, tokenizer, model card."""
    config = plan.config
    fetch_weights(plan)
    entries = [(task.name, task.out_dtype, task.shape) for task in plan.tasks]
    with atomic_folder(out_dir, overwrite) as temporary:
        writer = ShardedSafetensorsWriter(temporary, entries, out_shard_size)
        try:
            run_plan(plan, writer, device=device, seed=seed, progress=progress)
            writer.close()
        finally:
            writer.abort()
        folder_files.write_config(temporary, plan.out_config)
        donor = plan.checkpoints[plan.tokenizer_donor].folder if plan.tokenizer_donor else None
        folder_files.copy_model_files(temporary, donor)
        if plan.vocabulary is not None and plan.vocabulary.new_tokens:  # union: the donor's plus the new tokens
            from transformers import AutoTokenizer

            from .sources.vocabulary import extend_tokenizer

            extend_tokenizer(AutoTokenizer.from_pretrained(donor), plan.vocabulary).save_pretrained(temporary)
        if config.chat_template:
            folders = [plan.checkpoints[m].folder for m in config.referenced_models()]
            template = folder_files.resolve_chat_template(config.chat_template, folders)
            if template:
                folder_files.write_chat_template(temporary, template)
        folder_files.write_model_card(temporary, Path(out_dir).name, config.to_yaml(),
                                      config.referenced_models(), config.merge_method, config.base_model,
                                      extra=card_extra)
    for checkpoint in plan.checkpoints.values():
        checkpoint.close()
    return Path(out_dir)


__all__ = ["merge", "merge_stages_into", "plan_stages", "open_checkpoints", "fetch_weights", "MergeError"]
