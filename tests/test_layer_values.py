"""Per-layer values of any parameter a method takes: slerp's t, and each model's own weight
or density (never a value the method ignores, such as TIES's base's density)."""

from __future__ import annotations

import pytest

from merging import MergeError
from merging.config import recipe_from_text
from merging.layer_values import (layer_parameters, parameter_bounds, points_from_config, with_layer_points)

TIES = """
models:
  - model: /m/a
    parameters: {weight: 0.5, density: 0.5}
  - model: /m/b
    parameters: {weight: 0.5}
merge_method: ties
base_model: /m/base
parameters: {density: 0.8}
"""


def test_what_each_method_can_shape_per_layer():
    assert layer_parameters(recipe_from_text(TIES)) == [
        "lambda", "weight@/m/a", "density@/m/a", "weight@/m/b", "density@/m/b"]
    linear = recipe_from_text("models:\n  - model: /m/a\n  - model: /m/b\nmerge_method: linear\n")
    assert layer_parameters(linear) == ["weight@/m/a", "weight@/m/b"]
    slerp = recipe_from_text("models:\n  - model: /m/a\nbase_model: /m/base\nmerge_method: slerp\n"
                             "parameters: {t: 0.5}\n")
    assert layer_parameters(slerp) == ["t"]
    assert parameter_bounds(slerp, "t") == (0.0, 1.0)
    assert parameter_bounds(recipe_from_text(TIES), "density@/m/a") == (0.0, 1.0)
    assert parameter_bounds(recipe_from_text(TIES), "weight@/m/a") == (None, None)


def test_a_models_own_values_per_layer_round_trip_and_touch_nothing_else():
    config = recipe_from_text(TIES)
    changed = with_layer_points(config, "density@/m/b", [0.1, 0.9], [0.3], [1.0], filters=("self_attn", "mlp"))
    entry = {e.model: e for e in changed.model_entries()}
    assert entry["/m/b"].parameters["density"] == [
        {"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.3}, {"value": 1.0}]
    assert entry["/m/a"].parameters == {"weight": 0.5, "density": 0.5}
    assert changed.parameters == {"density": 0.8}  # the top level is another scope
    assert points_from_config(changed, "density@/m/b") == ([0.1, 0.9], [0.3], [1.0])
    # read back as mergekit looks it up: the model's own value, else the top level's, else the default
    assert points_from_config(config, "density@/m/b") == ([0.8], [0.8], [0.8])
    assert points_from_config(config, "weight@/m/a") == ([0.5], [0.5], [0.5])
    assert points_from_config(config, "lambda") == ([1.0], [1.0], [1.0])


@pytest.mark.parametrize("key, words", [
    ("t", "ties has no 't'"),
    ("density@/m/base", "takes no 'density' for '/m/base'"),
    ("density@/m/nobody", "takes no 'density' for '/m/nobody'"),
])
def test_a_value_the_merge_would_ignore_is_refused(key, words):
    with pytest.raises(MergeError, match=words):
        with_layer_points(recipe_from_text(TIES), key, [0.5], [0.5], [0.5])
