"""arcee_fusion, ram and ramplus_tl: equal to mergekit 0.1.5, hand-computed cases, errors."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import assert_same_config, load_tensors, max_relative_error, run_mergekit
from merging import MergeConfig, MergeError, merge
from test_methods import run

TOLERANCE = 1e-5

# The children's task vectors are 0.02-0.05 * N(0, 1): epsilon 0.02 makes some entries changed
# by one model only, some by several, some by none, so every branch of ram's mask is exercised.
CONFIGS = {
    "arcee_fusion": """
models:
  - model: {c1}
merge_method: arcee_fusion
base_model: {base}
dtype: float32
""",
    "arcee_fusion_other_base": """
models:
  - model: {c3}
merge_method: arcee_fusion
base_model: {c2}
dtype: float32
""",
    "ram": """
models:
  - model: {c1}
  - model: {c2}
  - model: {c3}
merge_method: ram
base_model: {base}
dtype: float32
""",
    "ram_epsilon": """
models:
  - model: {c1}
  - model: {c2}
  - model: {c3}
merge_method: ram
base_model: {base}
parameters: {{epsilon: 0.02}}
dtype: float32
""",
    "ramplus_tl_epsilon": """
models:
  - model: {c1}
  - model: {c2}
  - model: {c3}
merge_method: ramplus_tl
base_model: {base}
parameters: {{epsilon: 0.03}}
dtype: float32
""",
    "ramplus_tl_r_alpha": """
models:
  - model: {c1}
  - model: {c2}
  - model: {c3}
merge_method: ramplus_tl
base_model: {base}
parameters: {{r: 0.5, alpha: 3.0, epsilon: 0.02}}
dtype: float32
""",
}


def _yaml(case: str, tiny) -> str:
    return CONFIGS[case].format(**{k: tiny.path(k) for k in tiny})


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_equal_to_mergekit(case, tiny, tmp_path):
    text = _yaml(case, tiny)
    theirs = run_mergekit(text, tmp_path / "mergekit")
    ours = merge(MergeConfig.from_yaml(text), tmp_path / "ours", device="cpu")
    ours_tensors, base = load_tensors(ours), load_tensors(tiny["base"])
    assert max_relative_error(ours_tensors, load_tensors(theirs)) < TOLERANCE
    assert_same_config(ours, theirs)
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(ours_tensors[name], base[name])  # the merge moved something


def test_ram_row_blocks_give_the_same_tensors(tiny, tmp_path, monkeypatch):
    """ram is elementwise: streamed in row blocks it must give the same bits."""
    import merging.engine
    text = _yaml("ram_epsilon", tiny)
    whole = merge(text, tmp_path / "whole")
    monkeypatch.setattr(merging.engine, "BLOCK_ELEMENTS", 100)
    blocked = merge(text, tmp_path / "blocked")
    assert max_relative_error(load_tensors(blocked), load_tensors(whole)) == 0


@pytest.fixture
def base_and_models():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(16, 24, generator=generator)
    models = [base + scale * torch.randn(16, 24, generator=generator) for scale in (0.02, 0.05)]
    return base, models


@pytest.mark.parametrize("method", ["arcee_fusion", "ram", "ramplus_tl"])
def test_models_equal_to_the_base_give_the_base(method, base_and_models):
    base, _ = base_and_models
    count = 1 if method == "arcee_fusion" else 3
    assert torch.equal(run(method, [base.clone() for _ in range(count)], base), base)


def test_arcee_fusion_takes_the_changes_above_the_outlier_threshold(base_and_models):
    """Against an independent computation: F.kl_div for the row divergence, torch.quantile
    ('lower') for the quartiles."""
    base, (model, _) = base_and_models
    model = model.clone()
    model[3] += 0.5  # one row that changes a lot: its entries are the importance outliers
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    divergence = torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(dim=-1, keepdim=True)
    importance = (model - base).abs() * divergence
    q1, median, q3 = torch.quantile(importance.reshape(-1), torch.tensor([0.25, 0.5, 0.75]),
                                    interpolation="lower")
    taken = importance >= median + 1.5 * (q3 - q1)
    merged = run("arcee_fusion", [model], base)
    assert 0 < int(taken.sum()) < base.numel() // 4
    assert taken[3].all()
    assert torch.allclose(merged[taken], model[taken], atol=1e-6)
    assert torch.equal(merged[~taken], base[~taken])


def test_arcee_fusion_of_a_vector_uses_the_whole_vector():
    base = torch.zeros(40)
    model = 1e-3 * torch.arange(40.0) / 40  # small changes: none is an outlier ...
    model[7] = 2.0  # ... but this one is
    merged = run("arcee_fusion", [model], base)
    assert merged[7] == 2.0
    merged[7] = 0.0
    assert torch.equal(merged, base)


def test_ram_keeps_unique_changes_whole_and_averages_shared_ones():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    first = torch.tensor([1.5, 1.0, 2.0, 1.0 + 1e-6])
    second = torch.tensor([1.0, 0.0, 3.0, 1.0])
    merged = run("ram", [first, second], base)
    # entry 0: first only; 1: second only; 2: both (mean of +1 and +2); 3: below epsilon
    assert torch.allclose(merged, torch.tensor([1.5, 0.0, 2.5, 1.0]))
    assert torch.allclose(run("ram", [first, second], base, {"epsilon": 0.6}),
                          torch.tensor([1.0, 0.0, 2.5, 1.0]))


def test_ramplus_tl_amplifies_unique_changes_by_the_overlap_ratio():
    base = torch.zeros(6)
    first = torch.tensor([1.0, 0.0, 2.0, 2.0, 2.0, 0.0])   # 1 unique, 3 shared: rho = 3
    second = torch.tensor([0.0, 4.0, 4.0, 4.0, 4.0, 4.0])  # 2 unique, 3 shared: rho = 1.5
    merged = run("ramplus_tl", [first, second], base, {"r": 0.5, "alpha": 2.0})
    first_scale, second_scale = 1 + 0.5 * 2.0, 1 + 0.5 * 1.5  # rho capped at alpha for the first
    expected = torch.tensor([first_scale, 4 * second_scale, 3, 3, 3, 4 * second_scale])
    assert torch.allclose(merged, expected)
    assert torch.allclose(run("ramplus_tl", [first, second], base, {"r": 0.0}),
                          run("ram", [first, second], base))


def test_ramplus_tl_without_unique_changes_keeps_shared_ones_averaged():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 4.0, 0.0])]
    assert torch.allclose(run("ramplus_tl", models, base, {"r": 10.0, "alpha": 10.0}),
                          torch.tensor([2.0, 3.0, 0.0]))


@pytest.mark.parametrize("text, message", [
    ("models:\n  - model: a/b\nmerge_method: ram\nbase_model: a/c\nparameters: {epsilon: -1}\n",
     "epsilon=-1 in the top-level parameters is below its minimum 0"),
    ("models:\n  - model: a/b\nmerge_method: ramplus_tl\nbase_model: a/c\nparameters: {alpha: -0.5}\n",
     "alpha=-0.5 in the top-level parameters is below its minimum 0"),
    ("models:\n  - model: a/b\nmerge_method: ramplus_tl\nbase_model: a/c\nparameters: {r: lots}\n",
     "r must be a number"),
    ("models:\n  - model: a/b\n  - model: a/d\nmerge_method: arcee_fusion\nbase_model: a/c\n",
     "arcee_fusion takes exactly 1 model besides the base, got 2"),
    ("models:\n  - model: a/b\nmerge_method: ram\n", "ram needs a base_model"),
])
def test_bad_parameters_are_one_line_errors(text, message):
    with pytest.raises(MergeError, match=re.escape(message)) as caught:
        MergeConfig.from_yaml(text)
    assert "\n" not in str(caught.value)
