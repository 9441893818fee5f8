"""MoEConfig: a mixture-of-experts recipe in mergekit-moe's YAML format, in and out.

    base_model: org/base               # attention, norms, embeddings, lm_head
    gate_mode: hidden                  # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: org/coder        # this expert's MLPs
        positive_prompts: ["Write a Python function"]
        negative_prompts: ["Tell me a story"]   # optional
        noise_scale: 0.01                        # optional: N(0, s^2) added to its MLPs
        residual_scale: 0.5                      # optional: scales its down_proj

A YAML document with an `experts` key is an MoE recipe; `MergeConfig.from_yaml` hands it
here. Everything that can be checked without model files is checked on reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import MergeError, did_you_mean
from .limits import check as check_limit

GATE_MODES = {
    "hidden": "the base model's hidden state entering each layer at a prompt's last token",
    "hidden_last": "same as hidden",
    "hidden_avg": "the base model's hidden state entering each layer, averaged over a prompt's tokens",
    "cheap_embed": "the prompts' summed token embeddings, the same for every layer",
    "random": "N(0, 1) router weights",
    "uniform_random": "uniform in ±1/sqrt(hidden size), like torch.nn.Linear's initialization",
}
PROMPTED_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")
ARCHITECTURES = ("mixtral",)
TOP_LEVEL_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token",
                  "shared_experts", "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


@dataclass
class Expert:
    """One expert: the model whose MLPs it takes, and the prompts that should reach it."""

    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None

    def prompts_key(self) -> tuple:
        return tuple(self.positive_prompts), tuple(self.negative_prompts)


@dataclass
class MoEConfig:
    """A Mixtral-style MoE built from dense models (mergekit-moe's config)."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    architecture: Optional[str] = None
    name: Optional[str] = None  # MoE recipes are single-stage; kept for code that asks
    warnings: list[str] = field(default_factory=list, repr=False, compare=False)

    @staticmethod
    def from_dict(data: Any, where: str = "") -> "MoEConfig":
        from .config import DTYPES, model_name

        if not isinstance(data, dict):
            raise MergeError(f"the MoE config{where} must be a mapping, got {type(data).__name__}")
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise MergeError(f"unknown key '{key}' in the MoE config{where}{did_you_mean(key, TOP_LEVEL_KEYS)}")
        if not data.get("base_model"):
            raise MergeError(f"the MoE config{where} has no base_model (attention and embeddings come from it)")
        if data.get("shared_experts"):
            raise MergeError("shared_experts need a Qwen2-MoE output, which MergeLab does not write yet; "
                             "Mixtral has no shared experts")
        experts = data.get("experts")
        if not isinstance(experts, list) or not experts:
            raise MergeError(f"experts{where} must be a non-empty list")
        check_limit("experts", len(experts), f"the MoE config{where} has {len(experts)} experts")
        gate_mode = str(data.get("gate_mode", "hidden"))
        if gate_mode not in GATE_MODES:
            hint = did_you_mean(gate_mode, GATE_MODES) or f" (one of {', '.join(GATE_MODES)})"
            raise MergeError(f"unknown gate_mode '{gate_mode}'{hint}")
        dtype = data.get("dtype")
        if dtype is not None:
            if str(dtype).lower() not in DTYPES:
                raise MergeError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
            dtype = DTYPES[str(dtype).lower()]
        per_token = data.get("experts_per_token", 2)
        if not isinstance(per_token, int) or isinstance(per_token, bool) or per_token < 1:
            raise MergeError(f"experts_per_token must be a whole number >= 1, got {per_token!r}")
        architecture = data.get("architecture")
        if architecture is not None:
            # mergekit matches a prefix of the output's name ('mix' is Mixtral)
            matches = [a for a in ARCHITECTURES if a.startswith(str(architecture).lower())]
            if not matches:
                raise MergeError(f"architecture '{architecture}' is not supported; MergeLab writes "
                                 f"{', '.join(ARCHITECTURES)}")
            architecture = matches[0]
        config = MoEConfig(
            base_model=model_name(data["base_model"], f" of base_model{where}"),
            experts=[_expert(entry, f" (experts[{i}])") for i, entry in enumerate(experts)],
            gate_mode=gate_mode, dtype=dtype, experts_per_token=per_token, architecture=architecture)
        config.check()
        return config

    def check(self) -> None:
        """The rules that need no model files (mergekit-moe's, said in one line each)."""
        self.warnings = []
        count = len(self.experts)
        if count < self.experts_per_token:
            raise MergeError(f"experts_per_token is {self.experts_per_token} but there "
                             f"{'is only 1 expert' if count == 1 else f'are only {count} experts'}")
        if self.gate_mode in PROMPTED_MODES:
            for index, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise MergeError(f"expert {index} ('{expert.source_model}') has no positive_prompts; "
                                     f"gate_mode {self.gate_mode} builds its router from them")
            if count > 1 and len({e.prompts_key() for e in self.experts}) == 1:
                raise MergeError("every expert has the same prompts, so the router cannot tell them apart; "
                                 "give each expert prompts of the kind it should answer")
        if count & (count - 1):
            self.warnings.append(f"{count} experts is not a power of two; llama.cpp will not load the model")

    def check_distinct_experts(self) -> None:
        """mergekit-moe's rule: experts that are all one model only make the model bigger."""
        if len(self.experts) > 1 and len({e.source_model for e in self.experts}) == 1:
            raise MergeError(f"every expert is '{self.experts[0].source_model}': the MoE would compute what "
                             "that model computes, at a larger size (allow it with --allow-identical-experts "
                             "if you will train it further)")

    # ---- facts -------------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """The base first, then each expert's model once."""
        return list(dict.fromkeys([self.base_model] + [e.source_model for e in self.experts]))

    @property
    def uses_prompts(self) -> bool:
        return self.gate_mode in PROMPTED_MODES

    # ---- writing -----------------------------------------------------------------
    def to_dict(self) -> dict:
        data: dict[str, Any] = {"base_model": self.base_model, "gate_mode": self.gate_mode}
        if self.architecture:
            data["architecture"] = self.architecture
        if self.dtype:
            data["dtype"] = self.dtype
        data["experts_per_token"] = self.experts_per_token
        data["experts"] = []
        for expert in self.experts:
            entry: dict[str, Any] = {"source_model": expert.source_model}
            if expert.positive_prompts:
                entry["positive_prompts"] = list(expert.positive_prompts)
            if expert.negative_prompts:
                entry["negative_prompts"] = list(expert.negative_prompts)
            for key in ("noise_scale", "residual_scale"):
                if getattr(expert, key) is not None:
                    entry[key] = getattr(expert, key)
            data["experts"].append(entry)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def _prompts(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # one prompt written without list brackets
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MergeError(f"{key}{where} must be a list of strings")
    prompts = [p for p in value if p.strip()]
    if len(prompts) != len(value):
        raise MergeError(f"{key}{where} has an empty prompt")
    return prompts


def _number(value: Any, key: str, where: str, minimum: Optional[float] = None) -> Optional[float]:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{key}{where} must be a number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise MergeError(f"{key}{where} must be at least {minimum:g}, got {number:g}")
    return number


def _expert(entry: Any, where: str) -> Expert:
    from .config import model_name

    if isinstance(entry, str):
        entry = {"source_model": entry}
    if not isinstance(entry, dict) or not entry.get("source_model"):
        raise MergeError(f"each expert{where} needs a source_model")
    for key in entry:
        if key not in EXPERT_KEYS:
            raise MergeError(f"unknown key '{key}' in expert{where}{did_you_mean(key, EXPERT_KEYS)}")
    return Expert(
        source_model=model_name(entry["source_model"], f" of source_model{where}"),
        positive_prompts=_prompts(entry.get("positive_prompts"), "positive_prompts", where),
        negative_prompts=_prompts(entry.get("negative_prompts"), "negative_prompts", where),
        noise_scale=_number(entry.get("noise_scale"), "noise_scale", where, minimum=0.0),
        residual_scale=_number(entry.get("residual_scale"), "residual_scale", where))
