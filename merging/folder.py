"""The files beside the weights: config.json, generation config, tokenizer, model card; and
MergeLab's own cache folder."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Optional

from .errors import MergeError

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")
TEMPLATES = Path(__file__).parent / "chat_templates"


def cache_root() -> Path:
    """Where MergeLab keeps what it builds: demo models, GGUF-derived configs, the history
    (`MERGELAB_CACHE`, else ~/.cache/mergelab)."""
    return Path(os.environ.get("MERGELAB_CACHE") or Path.home() / ".cache" / "mergelab")


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_model_files(folder: Path, donor: Optional[Path]) -> None:
    """Tokenizer files and generation_config.json from the donor model's folder."""
    if donor is None:
        return
    for name in TOKENIZER_FILES + ("generation_config.json",):
        source = donor / name
        if source.is_file():
            shutil.copyfile(source, folder / name)


def model_chat_template(folder: Optional[Path]) -> Optional[str]:
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def resolve_chat_template(setting: str, model_folders: list[Optional[Path]]) -> Optional[str]:
    """A chat template from the config: 'auto' (the most common among the inputs), a
    built-in name (chatml, llama3, alpaca, mistral, zephyr), or Jinja text."""
    if setting == "auto":
        templates = [t.strip() for t in map(model_chat_template, model_folders) if t]
        return Counter(templates).most_common(1)[0][0] if templates else None
    check_chat_template(setting)
    if "{" in setting:
        return setting
    return (TEMPLATES / f"{setting}.jinja").read_text().strip()


def check_chat_template(setting: str) -> None:
    """'auto', Jinja text, or the name of a template shipped here: a name, never a path."""
    names = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
    if setting != "auto" and "{" not in setting and setting not in names:
        raise MergeError(f"chat_template '{setting[:60]}' is not Jinja text, 'auto' or a known name "
                         f"({', '.join(names)})")


def write_chat_template(folder: Path, template: str) -> None:
    """transformers reads chat_template.jinja before tokenizer_config.json's field."""
    (folder / "chat_template.jinja").write_text(template)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.pop("chat_template", None) is not None:
            config.write_text(json.dumps(data, indent=2) + "\n")


def write_model_card(folder: Path, title: str, config_yaml: str, models: list[str], method: str,
                     base_model: Optional[str], extra: str = "", config_file: str = "mergekit_config.yml",
                     command: str = "mergekit-yaml") -> None:
    """README.md with hub front matter, the sources and the exact recipe."""
    hub_models = [m for m in models if "/" in m and not Path(m).expanduser().exists()]
    front = ["---", "library_name: transformers", "tags:", "- merge", "- mergekit", "- mergelab"]
    if hub_models:
        front.append("base_model:")
        front.extend(f"- {m}" for m in hub_models)
    front.append("---")
    lines = front + [
        "",
        f"# {title}",
        "",
        f"This model was merged with MergeLab using the **{method}** method"
        + (f", with `{base_model}` as the base." if base_model else "."),
        "",
        "## Models merged",
        "",
    ]
    lines += [f"- `{m}`" + (" (base)" if m == base_model else "") for m in models]
    lines += ["", "## Configuration", "",
              f"The same YAML runs with `python -m merging CONFIG.yml OUT_DIR` or `{command}`:",
              "", "```yaml", config_yaml.rstrip(), "```", ""]
    if extra:
        lines += [extra, ""]
    (folder / "README.md").write_text("\n".join(lines))
    (folder / config_file).write_text(config_yaml)
