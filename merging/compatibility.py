"""Can these models merge? A report made by the planner's own checks, so that what a screen
says before a merge is what the merge will do: each model is planned against the reference
(the base, else the first model) with merging.plan.plan_merge, whose refusals (config.json
fields transformers needs, widths and head counts, depth) become "cannot merge" and whose
warnings (another model_type, vocabularies matched by token) are shown beside "can merge".
Only headers are read: no weights are downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import InputModel, MergeConfig
from .errors import MergeError

FACTS = (("type", ("model_type",)),
         ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
         ("hidden", ("hidden_size", "n_embd", "d_model")),
         ("MLP", ("intermediate_size", "n_inner", "ffn_dim")),
         ("heads", ("num_attention_heads", "n_head")),
         ("vocab", ("vocab_size", "padded_vocab_size")))


@dataclass
class ModelVerdict:
    name: str
    facts: dict = field(default_factory=dict)  # FACTS' labels -> values from config.json
    role: str = ""  # "reference" or "reference (base)" for the model the others are planned against
    error: Optional[str] = None  # why it cannot merge (or cannot be read); None when it can
    warnings: list[str] = field(default_factory=list)

    @property
    def can_merge(self) -> bool:
        return self.error is None


@dataclass
class CompatibilityReport:
    reference: Optional[str]
    models: list[ModelVerdict]

    @property
    def can_merge(self) -> bool:
        return all(m.can_merge for m in self.models)


def _facts(config: dict) -> dict:
    scopes = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    return {label: next((s[k] for s in scopes for k in keys if k in s), None) for label, keys in FACTS}


def compatibility(models: list[str], base: Optional[str] = None,
                  open_model: Optional[Callable] = None) -> CompatibilityReport:
    """Each of `models` (and `base`) checked as plan_merge checks it against the reference:
    a task-arithmetic plan of the reference and that one model, from headers only."""
    from .plan import check_loader_fields, plan_merge
    from .sources import open_model as default_open

    opener = open_model or (lambda name: default_open(name, download_weights=False))
    names = list(dict.fromkeys(([base] if base else []) + [str(m) for m in models or []]))
    if len(names) < 2:
        raise MergeError("pick at least two models (or one and a base)")
    checkpoints, verdicts = {}, []
    for name in names:
        verdict = ModelVerdict(name)
        try:
            checkpoints[name] = opener(name)
            verdict.facts = _facts(checkpoints[name].config)
        except MergeError as error:
            verdict.error = f"cannot be read: {error}"
        verdicts.append(verdict)
    reference = next((v for v in verdicts if v.can_merge), None)
    if reference is None:
        return CompatibilityReport(None, verdicts)
    reference.role = "reference (base)" if reference.name == base else "reference"
    for verdict in verdicts:
        if verdict is reference or not verdict.can_merge:
            continue
        config = MergeConfig("task_arithmetic", models=[InputModel(verdict.name, {"weight": 1.0})], base_model=reference.name,
                             dtype="float32")
        pair = {reference.name: checkpoints[reference.name], verdict.name: checkpoints[verdict.name]}
        try:
            verdict.warnings = list(plan_merge(config, pair).warnings)
        except MergeError as error:
            verdict.error = str(error)
    try:  # the reference must be loadable too (plan_merge refuses any model it meets that is not)
        check_loader_fields(reference.name, checkpoints[reference.name].config)
    except MergeError as error:
        reference.error = str(error)
    return CompatibilityReport(reference.name, verdicts)


def as_markdown(report: CompatibilityReport) -> str:
    """The report as a table: one row per model, its facts and its verdict."""
    labels = [label for label, _ in FACTS]
    header = "| model | " + " | ".join(labels) + " | verdict |\n|" + "---|" * (len(labels) + 2) + "\n"
    rows = []
    for verdict in report.models:
        facts = " | ".join("" if verdict.facts.get(label) is None else str(verdict.facts[label]) for label in labels)
        if verdict.error:
            said = f"cannot merge: {verdict.error}" if not verdict.error.startswith("cannot") else verdict.error
        elif verdict.role:
            said = verdict.role
        else:
            said = "can merge" + "".join(f"; {w}" for w in verdict.warnings)
        rows.append(f"| `{verdict.name}` | {facts} | {said.replace('|', '/')} |")
    return header + "\n".join(rows)
