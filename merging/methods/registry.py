"""The method registry: every merge method declares its parameters here, once.

The config validator, the command line's help and the app's controls all read these
declarations, so adding a method is one module that calls `register`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import MergeError

REQUIRED = object()  # marks a parameter without a default


@dataclass(frozen=True)
class Parameter:
    """One tunable of a method.

    per_model parameters are looked up for every input model (and tensor); global
    ones once per tensor. `low`/`high` bound numeric values (inclusive); `choices`
    bound string values.
    """

    name: str
    kind: type  # float, int, bool or str
    default: Any = REQUIRED
    per_model: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[tuple] = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """Return `value` as this parameter's kind, or raise a MergeError naming it."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise MergeError(f"{self.name} must be true or false{where}, got {value!r}")
        if self.kind is str:
            if not isinstance(value, str):
                raise MergeError(f"{self.name} must be a string{where}, got {value!r}")
            if self.choices and value not in self.choices:
                raise MergeError(
                    f"{self.name} must be one of {', '.join(self.choices)}{where}, got {value!r}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MergeError(f"{self.name} must be a number{where}, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise MergeError(f"{self.name} must be a number{where}, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise MergeError(f"{self.name} must be a finite number{where}, got {value!r}")
        return int(number) if self.kind is int else number

    def check_range(self, value: Any, where: str) -> None:
        if self.kind in (bool, str) or value is None:
            return
        if self.low is not None and value < self.low:
            raise MergeError(f"{self.name}={value:g}{where} is below its minimum {self.low:g}")
        if self.high is not None and value > self.high:
            raise MergeError(f"{self.name}={value:g}{where} is above its maximum {self.high:g}")

    def describe(self) -> str:
        scope = "per model" if self.per_model else "global"
        default = "required" if self.required else f"default {self.default}"
        bounds = ""
        if self.choices:
            bounds = f", one of {'/'.join(self.choices)}"
        elif self.low is not None or self.high is not None:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            bounds = f", range [{low}, {high}]"
        return f"{self.name} ({scope}, {default}{bounds}): {self.help}"


@dataclass
class TensorInputs:
    """What a method sees for one output tensor.

    `models` are the non-base inputs in config order (float32, same shape); `base` is
    the base model's tensor or None; `model_params[i]` holds the per-model parameters
    of models[i]; `params` the global ones. `seed` seeds random methods (see stream_key()).
    """

    models: list[torch.Tensor]
    base: Optional[torch.Tensor]
    params: dict
    model_params: list[dict]
    seed: Optional[int] = None
    name: str = ""
    keys: Optional[list] = None  # identities of models[i] and, last, of the base (for caching)
    cache: Optional["TensorCache"] = None
    out: Optional[torch.Tensor] = None  # where the result may go (a live parameter); see Method.merge
    batch: Optional[Any] = None  # a fused.SumBatch that may compute a weighted sum into the live parameter later

    def per_model(self, key: str) -> list:
        return [p[key] for p in self.model_params]

    def stream_key(self, index: int) -> int:
        """The key of models[index]'s counter-based random stream (sparsify.hash_draws): what
        one model draws does not depend on the others, so a cached pruning rule stays valid
        when another model changes."""
        return ((self.seed or 0) + 0x9E3779B97F4A7C15 * (index + 1)) % 2**64

    def cached(self, key: Optional[tuple], compute: Callable[[], Any]) -> Any:
        """compute(), or the cached result for `key` (with a cache and a key)."""
        if self.cache is None or key is None or self.keys is None:
            return compute()
        return self.cache.get_or_compute(key, compute)


class TensorCache:
    """Tensors (and other things with an `nbytes`) kept between updates, least recently
    used dropped first, within a byte budget."""

    def __init__(self, budget_bytes: int):
        from collections import OrderedDict

        self.budget_bytes = budget_bytes
        self.entries: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get_or_compute(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        size = value.nbytes  # a tensor, an array, or anything that says its size
        if size <= self.budget_bytes:
            while self.bytes + size > self.budget_bytes and self.entries:
                _, dropped = self.entries.popitem(last=False)
                self.bytes -= dropped.nbytes
            self.entries[key] = value
            self.bytes += size
        return value


@dataclass(frozen=True)
class Elementwise:
    """A method whose output, once a few tensor-wide sums are known, is computed entry by
    entry. The engine then streams such tensors in row blocks: flat memory, any size.

    statistics(inputs) -> 1-D tensor of sums that add up across row blocks (or None);
      the sums depend on the tensors only, never on parameters, so they can be cached;
    coefficients(sums, inputs) -> whatever combine needs (sums is None without statistics);
    combine(inputs, coefficients, out) -> the output for the rows in `inputs`, written
      into the float32 buffer `out` (the engine reuses it from block to block).
    stored_dtype_ok: combine computes in `out` by in-place float32 operations, so its
      inputs may come in their storage dtype (bfloat16, float16): one conversion pass less.
    any_out_dtype: combine may be given an `out` in a lower precision (a live model's
      bfloat16 parameter) and rounds the float32 result into it once.
    """

    combine: Callable[["TensorInputs", Any, torch.Tensor], torch.Tensor]
    coefficients: Callable[[Optional[torch.Tensor], "TensorInputs"], Any] = lambda sums, inputs: None
    statistics: Optional[Callable[["TensorInputs"], torch.Tensor]] = None
    stored_dtype_ok: bool = False
    any_out_dtype: bool = False

    def merge(self, inputs: "TensorInputs") -> torch.Tensor:
        sums = self.statistics(inputs).double() if self.statistics else None
        first = inputs.base if inputs.base is not None else inputs.models[0]
        out = torch.empty_like(first, dtype=torch.float32)
        return self.combine(inputs, self.coefficients(sums, inputs), out)


# How a method treats the config's base_model.
BASE_REQUIRED = "required"  # the base is a distinguished input (task vectors, slerp)
BASE_OPTIONAL = "optional"  # used when given
BASE_IGNORED = "ignored"  # the base is just one more input model


@dataclass(frozen=True)
class Method:
    """A merge method: a pure function over tensors plus its declared parameters.

    `min_models`/`max_models` count the inputs that are not the base (for
    BASE_IGNORED methods: all inputs).
    """

    name: str
    summary: str
    merge: Optional[Callable[[TensorInputs], torch.Tensor]]
    parameters: tuple[Parameter, ...] = ()
    base: str = BASE_IGNORED
    min_models: int = 1
    max_models: Optional[int] = None
    random: bool = False
    check: Optional[Callable[[dict, list[dict], str], None]] = field(default=None)
    reference: str = ""
    elementwise: Optional[Elementwise] = None
    stored_inputs: bool = False  # merge takes the inputs as stored (bfloat16...) and widens them itself
    # merge may write its result, rounded once, into inputs.out (the destination's dtype and
    # shape) and return that tensor; otherwise it returns a float32 tensor of its own

    def __post_init__(self):
        if self.merge is None:
            if self.elementwise is None:
                raise ValueError(f"method {self.name} needs merge or elementwise")
            object.__setattr__(self, "merge", self.elementwise.merge)

    def parameter(self, name: str) -> Optional[Parameter]:
        return next((p for p in self.parameters if p.name == name), None)

    @property
    def global_parameters(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if not p.per_model)

    @property
    def model_parameters(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.per_model)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        if close:  # a typo: the one close name, not the whole list
            raise MergeError(f"unknown merge_method {name!r}; did you mean {close[0]}?") from None
        known = ", ".join(sorted(METHODS))
        raise MergeError(f"unknown merge_method {name!r}; known methods: {known}") from None


def weight_parameter(default: Any = REQUIRED, help: str = "how much this model counts") -> Parameter:
    return Parameter("weight", float, default, per_model=True, help=help)


def describe_methods(names: Sequence[str] | None = None) -> str:
    """Text for the CLI's help: every method with its parameters."""
    lines = []
    for name in names or sorted(METHODS):
        method = METHODS[name]
        lines.append(f"  {name}: {method.summary}")
        for parameter in method.parameters:
            lines.append(f"      {parameter.describe()}")
    return "\n".join(lines)
