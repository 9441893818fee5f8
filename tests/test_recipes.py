"""Recipes as people write them: published-style mergekit YAML runs here as it runs in
mergekit 0.1.5 (the reference), keys mergekit ignores are warnings (errors with strict),
multi-stage files whose later stages need an earlier stage's files, shipped chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_mergekit

MERGEKIT_TEMPLATES = Path(__import__("mergekit").__file__).parent / "_data" / "chat_templates"
CONVERSATIONS = {
    "two turns": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! \n"},
                  {"role": "user", "content": "How are you?"}],
    "system first": [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
    "one message": [{"role": "user", "content": "  spaced  "}],
}


# ---- (d) chat templates --------------------------------------------------------------
def test_every_mergekit_template_name_is_shipped():
    from merging.folder import TEMPLATES

    ours = {p.stem for p in TEMPLATES.glob("*.jinja")}
    theirs = {p.stem for p in MERGEKIT_TEMPLATES.glob("*.jinja")}
    assert theirs <= ours, f"mergekit ships {sorted(theirs - ours)}, we do not"


@pytest.mark.parametrize("name", sorted(p.stem for p in MERGEKIT_TEMPLATES.glob("*.jinja")))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_shipped_template_renders_as_mergekits(name, conversation, generation_prompt, tiny):
    from transformers import AutoTokenizer

    from merging.folder import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    render = lambda template: tokenizer.apply_chat_template(  # noqa: E731
        CONVERSATIONS[conversation], chat_template=template, tokenize=False,
        add_generation_prompt=generation_prompt)
    expected = render((MERGEKIT_TEMPLATES / f"{name}.jinja").read_text())
    assert render(resolve_chat_template(name, [])) == expected


def test_merged_folder_chat_template_equals_mergekits(tiny, tmp_path):
    from transformers import AutoTokenizer

    from merging import merge

    text = (f"models:\n  - model: {tiny.path('c1')}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tiny.path('c2')}\n    parameters: {{weight: 0.5}}\n"
            "merge_method: linear\nchat_template: llama3\ndtype: float32\n")
    theirs = AutoTokenizer.from_pretrained(run_mergekit(text, tmp_path / "mergekit"))
    ours = AutoTokenizer.from_pretrained(merge(text, tmp_path / "ours"))
    messages = CONVERSATIONS["two turns"]
    rendered = [t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for t in (ours, theirs)]
    assert rendered[0] == rendered[1]
    assert "<|eot_id|>\n<|start_header_id|>" in rendered[0]
