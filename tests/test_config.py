"""MergeConfig: YAML in and out, parameter resolution, gradient positions."""

from __future__ import annotations

import re

import pytest

from merging import MergeConfig, MergeError, MultiStageConfig
from merging.parameters import evaluate, gradient_value, resolve
from test_mergekit_equality import CONFIGS, MULTI_STAGE


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_yaml_round_trip(case):
    config = MergeConfig.from_yaml(CONFIGS[case].format_map(_Paths()))
    again = MergeConfig.from_yaml(config.to_yaml())
    assert again == config
    assert again.to_yaml() == config.to_yaml()


def test_multi_stage_round_trip_and_order():
    config = MergeConfig.from_yaml(MULTI_STAGE.format_map(_Paths()))
    assert isinstance(config, MultiStageConfig)
    assert [s.name for s in config.order()] == ["first", "second", "final"]
    again = MergeConfig.from_yaml(config.to_yaml())
    assert again.stages == config.stages


def test_stage_order_follows_dependencies_not_file_order():
    text = ("name: late\nmodels:\n  - model: early\nmerge_method: passthrough\n---\n"
            "name: early\nmodels:\n  - model: a/b\nmerge_method: passthrough\n---\n"
            "models:\n  - model: late\nmerge_method: passthrough\n")
    assert [s.name for s in MergeConfig.from_yaml(text).order()] == ["early", "late", None]


def test_yaml_scientific_notation_strings_are_numbers():
    config = MergeConfig.from_yaml("models:\n  - model: a/b\nmerge_method: multislerp\n"
                                   "parameters: {eps: 1e-6, weight: 1}\n")
    assert config.parameters["eps"] == 1e-6


def test_gradient_rule_matches_mergekit():
    values = [0.0, 0.5, 0.3, 0.7, 1.0]
    assert gradient_value(values, 0.0) == 0.0
    assert gradient_value(values, 1.0) == 1.0
    # layer 3 of 8: p = 3/7, s = 12/7, between v1 and v2
    assert gradient_value(values, 3 / 7) == pytest.approx((1 - 5 / 7) * 0.5 + (5 / 7) * 0.3)
    assert gradient_value(["a", "b", "c"], 0.9) == "b"


def test_filters_first_match_and_fall_through():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.5
    assert evaluate(setting, "model.norm.weight", 0.5) is None
    scopes = [{"t": setting}, {"t": 0.9}]
    assert resolve("t", scopes, "model.norm.weight", 0.5) == 0.9


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels: []\n", "exactly one of 'models', 'slices' or 'modules'"),
    ("merge_method: linear\nmodel:\n  - model: a/b\n", "unknown key 'model' (did you mean 'models'?)"),
    ("merge_method: linear\nmodules: {}\n", "exactly one of 'models', 'slices' or 'modules'"),
    ("merge_method: linear\nmodels: [{model: a/b}]\nmodules: {text_decoder: {models: [{model: a/b}]}}\n",
     "exactly one of 'models', 'slices' or 'modules'"),
    ("models:\n  - model: a/b\n", "has no merge_method"),
    ("models:\n  - model: a/b\n  - model: a/b\nmerge_method: linear\n", "listed twice"),
    ("models:\n  - model: a/b\nmerge_method: ties\n", "ties needs a base_model"),
    ("models:\n  - model: a/b\nmerge_method: slerp\nbase_model: a/c\nparameters: {t: yes-please}\n",
     "t must be a number"),
    ("models:\n  - model: a/b\nmerge_method: linear\nchat_template: 3\ntokenizer_source: a/b\n"
     "tokenizer: {source: base}\n", "either tokenizer_source or tokenizer"),
])
def test_config_errors(text, message):
    with pytest.raises(MergeError, match=re.escape(message)):
        MergeConfig.from_yaml(text)


class _Paths(dict):
    def __missing__(self, key):
        return f"/models/{key}"
