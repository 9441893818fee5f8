"""Method math on tensors: identities, DARE/DELLA statistics, breadcrumbs' edge case."""

from __future__ import annotations

import pytest
import torch

from merging.methods import get_method
from merging.methods import sparsify
from merging.methods.registry import TensorInputs


def run(method: str, models, base=None, params=None, model_params=None, seed=0):
    spec = get_method(method)
    full = {p.name: p.default for p in spec.global_parameters}
    full.update(params or {})
    per_model = []
    for index in range(len(models)):
        values = {p.name: p.default for p in spec.model_parameters}
        values.update((model_params or [{}] * len(models))[index])
        per_model.append(values)
    return spec.merge(TensorInputs(list(models), base, full, per_model, seed if spec.random else None, "test"))


@pytest.fixture
def pair():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=generator)
    other = base + 0.5 * torch.randn(64, 48, generator=generator)
    return base, other


def test_slerp_endpoints_are_the_models(pair):
    base, other = pair
    assert torch.equal(run("slerp", [other], base, {"t": 0.0}), base)
    assert torch.allclose(run("slerp", [other], base, {"t": 1.0}), other, atol=1e-6)


def test_slerp_midpoint_keeps_the_norm_of_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    middle = run("slerp", [b], a, {"t": 0.5})
    assert torch.allclose(middle, torch.tensor([2**-0.5, 2**-0.5]))


def test_linear_of_one_model_is_that_model(pair):
    _, other = pair
    assert torch.allclose(run("linear", [other], model_params=[{"weight": 0.3}]), other)


def test_task_arithmetic_of_the_base_is_the_base(pair):
    base, _ = pair
    assert torch.equal(run("task_arithmetic", [base.clone()], base, model_params=[{"weight": 1.0}]), base)


def test_ties_keeps_exactly_the_top_density_entries(pair):
    base, other = pair
    merged = run("ties", [other], base, model_params=[{"weight": 1.0, "density": 0.25}])
    changed = (merged != base)
    assert changed.sum().item() == int(0.25 * base.numel())
    delta = (other - base).abs()
    assert delta[changed].min() >= delta[~changed].max()


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_about_density_and_leaves_kept_entries_unchanged(pair, density):
    base, other = pair
    task_vector = other - base
    pruned = sparsify.random_keep(task_vector, density, key=1)
    kept = pruned != 0
    fraction = kept.float().mean().item()
    sigma = (density * (1 - density) / task_vector.numel()) ** 0.5
    assert abs(fraction - density) < 5 * sigma
    assert torch.equal(pruned[kept], task_vector[kept])


def test_dare_rescale_l1_preserves_the_l1_norm(pair):
    base, other = pair
    merged = run("dare_linear", [other], base, model_params=[{"weight": 1.0, "density": 0.3}])
    delta = merged - base
    assert abs(delta.abs().sum().item() / (other - base).abs().sum().item() - 1) < 1e-4


def test_dare_paper_rescale_divides_by_density(pair):
    base, other = pair
    merged = run("dare_linear", [other], base, {"rescale_mode": "inverse_density"},
                 [{"weight": 1.0, "density": 0.4}])
    delta = merged - base
    kept = delta != 0
    assert torch.allclose(delta[kept], (other - base)[kept] / 0.4, atol=1e-5)


def test_random_methods_repeat_with_the_same_seed_and_differ_with_another(pair):
    base, other = pair
    params = [{"weight": 1.0, "density": 0.5}]
    first = run("dare_ties", [other], base, model_params=params, seed=3)
    assert torch.equal(first, run("dare_ties", [other], base, model_params=params, seed=3))
    assert not torch.equal(first, run("dare_ties", [other], base, model_params=params, seed=4))


def test_della_keeps_large_entries_more_often():
    task_vector = torch.arange(1, 2001, dtype=torch.float32).repeat(50, 1)  # each row: 1..2000
    kept = torch.zeros(2000)
    for seed in range(4):
        pruned = sparsify.della_magprune(task_vector, 0.5, 0.3, key=seed)
        kept += (pruned != 0).float().sum(dim=0)
    rate = kept / (4 * 50)
    assert abs(rate.mean().item() - 0.5) < 0.02
    assert rate[:200].mean() < 0.27 and rate[-200:].mean() > 0.73  # 0.2 + ... ; 0.8 - ...


def test_breadcrumbs_without_outliers_keeps_the_largest_entries():
    task_vector = torch.arange(1, 11, dtype=torch.float32)
    pruned = sparsify.magnitude_outliers(task_vector, density=0.5, gamma=0.0)
    assert torch.equal(pruned != 0, task_vector > 5)  # not an empty slice


def test_breadcrumbs_drops_top_outliers():
    task_vector = torch.arange(1, 101, dtype=torch.float32)
    pruned = sparsify.magnitude_outliers(task_vector, density=0.5, gamma=0.1)
    assert torch.equal(pruned != 0, (task_vector > 40) & (task_vector <= 90))


def test_sign_election_drops_the_minority(pair):
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, -1.0, 2.0])
    b = torch.tensor([1.0, -3.0, -1.0, -1.0])
    merged = run("ties", [a, b], base, model_params=[{"weight": 1.0, "density": 1.0}] * 2)
    assert torch.allclose(merged, torch.tensor([1.0, -3.0, -1.0, 2.0]))


def test_model_stock_of_identical_task_vectors_moves_all_the_way():
    base = torch.zeros(10)
    model = torch.ones(10)
    assert torch.allclose(run("model_stock", [model, model.clone()], base), model)


def test_nearswap_swaps_only_close_entries():
    base = torch.tensor([0.0, 0.0, 0.0])
    other = torch.tensor([0.001, 0.5, 2.0])
    merged = run("nearswap", [other], base, {"t": 0.01})
    assert merged[0].item() == pytest.approx(0.001) and merged[2].item() == pytest.approx(0.01)


def test_karcher_of_two_equal_norm_vectors_is_their_normalized_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("karcher", [a, b]), torch.tensor([2**-0.5, 2**-0.5]), atol=1e-5)


def test_equal_magnitudes_at_the_cut_keep_the_lower_index_first():
    """The tie rule of TIES and breadcrumbs pruning (sparsify.rank_window): entries are ranked
    by |d| with equal magnitudes in index order, as a stable sort would; the window's edges
    come from selection, not a sort. Checked against a stable argsort on tie-heavy vectors
    (bfloat16 task vectors have many equal magnitudes)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        count = int(torch.randint(1, 300, (), generator=generator))
        vector = (torch.randint(-4, 5, (count,), generator=generator).float() / 4).to(torch.bfloat16).float()
        density = float(torch.rand((), generator=generator))
        gamma = float(torch.rand((), generator=generator)) * (1 - density)
        k = max(1, int(density * count))
        top = torch.argsort(-vector.abs(), stable=True)[:k]
        expected = torch.zeros_like(vector)
        expected[top] = vector[top]
        assert torch.equal(sparsify.magnitude(vector, density), expected)
        keep, n_top = int(density * count), int(gamma * count)
        n_bot = max(0, count - keep - n_top)
        window = torch.argsort(vector.abs(), stable=True)[n_bot:n_bot + keep]
        expected = torch.zeros_like(vector)
        expected[window] = vector[window]
        assert torch.equal(sparsify.magnitude_outliers(vector, density, gamma), expected)
    ties = torch.tensor([0.5, -1.0, 0.5, 1.0, -0.5, 0.25])
    assert sparsify.magnitude(ties, 0.5).tolist() == [0.5, -1.0, 0.0, 1.0, 0.0, 0.0]  # of three 0.5s, the first
