"""GGUF files as models: tensors dequantized one at a time, under Hugging Face names.

A `.gguf` file (or a folder holding one, and no config.json) reads like a model folder:
the config comes from the file's metadata and the tokenizer from its vocabulary, both
derived by transformers' own GGUF loader and written once to a small cache folder; the
tensor names and shapes are transformers' mapping of GGUF names (`blk.3.attn_q.weight`
-> `model.layers.3.self_attn.q_proj.weight`), and each tensor is dequantized (the `gguf`
package) and un-permuted (llama.cpp reorders q/k rows for its rotary layout) only when
the merge reads it, so memory stays at one tensor. A quantized model brings its
quantization error into the merge; the plan says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import MergeError
from ..folder import cache_root
from .tensors import Checkpoint, TensorInfo

EXACT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}


def gguf_file(reference: str) -> Path | None:
    """The GGUF file a reference names: the file itself, or the one .gguf in a folder that
    has no config.json."""
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise MergeError(f"'{reference}' holds {len(files)} .gguf files; name the one to merge")
        return files[0] if files else None
    return None


def _cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


class GGUFCheckpoint(Checkpoint):
    def __init__(self, reference: str, path: Path):
        folder = _cache_folder(path)
        try:
            if not (folder / "config.json").is_file():  # first use: derive config and tokenizer once
                from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

                parsed = load_gguf_checkpoint(str(path), return_tensors=False)
                self._write_cache(folder, path, parsed["config"], reference)
            config = json.loads((folder / "config.json").read_text())
            table = self._tensor_table(folder, path, config)
        except (ValueError, NotImplementedError, OSError, KeyError) as error:
            raise MergeError(f"'{reference}' is not a GGUF model transformers can read ({error})") from None
        tensors = {name: TensorInfo(name, EXACT_TYPES.get(kind, torch.float32), tuple(shape), path)
                   for name, (_, shape, kind) in table["tensors"].items()}
        super().__init__(reference, folder, config, tensors)
        self.path, self.table, self._reader, self._processor = path, table, None, None
        quantized = sorted({kind for _, _, kind in table["tensors"].values() if kind not in EXACT_TYPES})
        self.warnings = ([f"model '{reference}' is quantized ({', '.join(quantized)}): the merge carries its "
                          "quantization error"] if quantized else [])

    @staticmethod
    def _tensor_table(folder: Path, path: Path, config: dict) -> dict:
        """{"architecture", "tensors": {HF name: [GGUF name, shape, GGUF type]}}, worked out
        once (transformers' name map over a meta-device model) and cached beside the config,
        so that later opens (every plan of a live session) read a small JSON file."""
        cached = folder / "tensors.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        from gguf import GGUFReader
        from transformers import AutoModelForCausalLM, CONFIG_MAPPING
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map)

        reader = GGUFReader(str(path))
        architecture = reader.fields["general.architecture"].contents()
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(CONFIG_MAPPING[config["model_type"]].from_dict(config))
        names = get_gguf_hf_weights_map(skeleton, TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config))
        shapes = {name: list(t.shape) for name, t in skeleton.state_dict().items()}
        table = {"architecture": architecture, "tensors": {
            names[t.name]: [t.name, shapes[names[t.name]], t.tensor_type.name]
            for t in reader.tensors if t.name in names}}  # llama.cpp extras (rope frequencies) have no place
        temporary = cached.with_suffix(".partial")
        temporary.write_text(json.dumps(table))
        temporary.replace(cached)
        return table

    def _source(self, name: str):
        """The GGUF tensor behind `name`, from a reader opened on first use (memory-mapped)."""
        if self._reader is None:
            from gguf import GGUFReader
            from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

            reader = GGUFReader(str(self.path))
            self._by_name = {t.name: t for t in reader.tensors}
            self._processor = TENSOR_PROCESSORS.get(self.table["architecture"], TensorProcessor)(config=self.config)
            self._reader = reader
        return self._by_name[self.table["tensors"][name][0]]

    @staticmethod
    def _write_cache(folder: Path, path: Path, values: dict, reference: str) -> None:
        """config.json and the tokenizer, derived from the GGUF's metadata as transformers does."""
        from transformers import CONFIG_MAPPING

        from ..writer import build_once  # the writer builds on this package

        values = dict(values)
        model_type = values.pop("model_type", None)
        if model_type not in CONFIG_MAPPING:
            raise MergeError(f"'{reference}' is a GGUF '{model_type}' model, which transformers cannot load")
        model_config = CONFIG_MAPPING[model_type](**values)

        def build(temporary: Path) -> None:
            data = model_config.to_dict()
            data["architectures"] = model_config.architectures or [ARCHITECTURES.get(model_type, "")]
            (temporary / "config.json").write_text(json.dumps(data, indent=2) + "\n")
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(temporary)
            except Exception as error:  # a model without a usable vocabulary can still be merged
                (temporary / "tokenizer-error.txt").write_text(f"{type(error).__name__}: {error}\n")

        build_once(folder, build, lambda built: (built / "config.json").is_file())

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor = self._source(name)
        weights = dequantize(tensor.data, tensor.tensor_type)
        weights = self._processor.process(weights=weights, name=tensor.name).weights
        result = torch.from_numpy(np.array(weights, copy=True))
        if result.dtype == torch.float64:
            result = result.float()
        return result.reshape(self.tensors[name].shape)

    def _advise(self, *args, **kwargs) -> None:
        pass  # numpy's memory map of the file; the kernel pages it as it likes

    def close(self) -> None:
        self._reader = None
