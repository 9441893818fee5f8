"""The fused CPU kernels against the whole-tensor torch reference: bitwise equal outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.methods import fused, get_method, sparsify
from merging.methods import task_arithmetic as family_math
from merging.methods.registry import TensorInputs

PRUNING_OR_VOTE = [name for name, family in family_math.FAMILIES.items()
                   if family.pruning is not None or family.sign_vote]


def inputs(method: str, models, base, model_params, params=None, seed=3) -> TensorInputs:
    spec = get_method(method)
    full = {p.name: p.default for p in spec.global_parameters}
    full.update(params or {})
    per_model = []
    for values in model_params:
        merged = {p.name: p.default for p in spec.model_parameters}
        merged.update(values)
        per_model.append(merged)
    return TensorInputs(list(models), base, full, per_model, seed if spec.random else None, "test")


def both(method, models, base, model_params, params=None):
    given = inputs(method, models, base, model_params, params)
    family = family_math.FAMILIES[method]
    return family_math.combine_fused(given, family), family_math.combine_reference(given, family)


@pytest.fixture(scope="module")
def tensors():
    """A base and three children in float32 and bfloat16; the second child leaves 5,000 entries
    unchanged (ties at zero magnitude)."""
    generator = torch.Generator().manual_seed(0)
    made = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(300, 170, generator=generator).to(dtype)
        children = [(base.float() + 0.1 * torch.randn(300, 170, generator=generator)).to(dtype) for _ in range(3)]
        children[1].view(-1)[:5000] = base.view(-1)[:5000]
        made[dtype] = base, children
    return made


def test_the_family_is_what_fused_covers():
    assert set(PRUNING_OR_VOTE) == {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                                    "della", "della_linear"}
    assert all(get_method(name).stored_inputs for name in PRUNING_OR_VOTE)


@pytest.mark.parametrize("method", PRUNING_OR_VOTE)
def test_fused_equals_the_reference_bitwise(method, tensors):
    checked = 0
    for dtype, (base, children) in tensors.items():
        for count in (1, 2, 3):
            model_params = [{"weight": 0.3 + 0.2 * i, "density": 0.4 + 0.1 * i} for i in range(count)]
            if method.startswith("della"):
                for values in model_params:
                    values["epsilon"] = 0.1
            for params in ({}, {"rescale": True, "rescale_mode": "inverse_density"},
                           {"rescale": True, "rescale_mode": "l1", "lambda": 0.7, "normalize": True}):
                fast, reference = both(method, children[:count], base, model_params, params)
                assert fast.dtype == torch.float32 and fast.shape == base.shape
                assert torch.equal(fast, reference), (dtype, count, params, int((fast != reference).sum()))
                checked += 1
    assert checked == 18


@pytest.mark.parametrize("density", [0.0, 0.02, 1.0])
def test_edge_densities_match(density, tensors):
    base, children = tensors[torch.bfloat16]
    for method in ("ties", "breadcrumbs", "dare_linear"):
        fast, reference = both(method, children[:2], base, [{"weight": 1.0, "density": density}] * 2)
        assert torch.equal(fast, reference), method


def test_crowded_cuts_split_ties_by_index_on_any_thread_count():
    """2M entries, most of them tied at the cut (unchanged entries, equal bfloat16 steps): the
    path that counts instead of gathering, on one and on two threads."""
    generator = torch.Generator().manual_seed(1)
    count = 2_000_000
    base = torch.randn(count, generator=generator).bfloat16()
    step = torch.randint(-2, 3, (count,), generator=generator).float() * 2.0 ** -6
    child = (base.float() + step).bfloat16()
    child[: count // 3] = base[: count // 3]  # a third unchanged: |d| = 0
    other = (base.float() - step).bfloat16()
    threads = torch.get_num_threads()
    try:
        results = []
        for thread_count in (1, 2):
            torch.set_num_threads(thread_count)
            for method, density in (("ties", 0.8), ("ties", 0.3), ("breadcrumbs", 0.5)):
                fast, reference = both(method, [child, other], base,
                                       [{"weight": 0.6, "density": density}, {"weight": 0.4, "density": 0.5}])
                assert torch.equal(fast, reference), (method, density, thread_count)
                results.append(fast)
        assert all(torch.equal(a, b) for a, b in zip(results[:3], results[3:]))
    finally:
        torch.set_num_threads(threads)


def test_the_kernels_draw_what_the_torch_hash_draws():
    for key in (0, 12345, 2**63 + 7, 2**64 - 1):
        expected = sparsify.hash_draws(5000, key).numpy().astype(np.uint64)
        drawn = np.array([fused._draw(np.uint64(key), j) for j in range(5000)], np.uint64)
        assert np.array_equal(drawn, expected)
    draws = sparsify.hash_draws(200_000, 99).float() / 2**32
    assert abs(float(draws.mean()) - 0.5) < 0.005 and float(draws.min()) >= 0 and float(draws.max()) < 1


def test_the_reference_serves_when_the_kernels_cannot(tensors):
    base, children = tensors[torch.float32]
    assert fused.available(base) and not fused.available(base.to("meta"))
    assert not fused.available(torch.zeros(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_weighted_sum_is_torchs_bitwise_fused_multiply_adds_included(dtype):
    """linear's and slerp's sum: x_0 c_0, then each further term by a fused multiply-add, as
    torch's add_(x, alpha=c) computes it (vector and tail paths: odd sizes)."""
    generator = torch.Generator().manual_seed(2)
    for count in (7, 1000, 300_001):
        tensors = [torch.randn(count, generator=generator).to(dtype) for _ in range(3)]
        for models in (1, 2, 3):
            coefficients = [0.3141592, 0.7182818, -0.41][:models]
            fast = fused.weighted_sum(tensors[:models], coefficients, torch.empty(count))
            reference = torch.empty(count).copy_(tensors[0]).mul_(coefficients[0])
            for tensor, coefficient in zip(tensors[1:models], coefficients[1:]):
                reference.add_(tensor, alpha=coefficient)
            assert torch.equal(fast, reference), (count, models)


def test_della_ranks_rows_of_any_shape_like_the_reference():
    """Vectors, matrices (ranked by the kernels' radix sort) and 3-D expert stacks (ranked
    along dimension 1, as the reference does), with tied magnitudes, on two threads."""
    generator = torch.Generator().manual_seed(3)
    for shape in ((5000,), (700, 300), (4, 64, 48)):
        base = torch.randn(shape, generator=generator).bfloat16()
        child = (base.float() + torch.randint(-2, 3, shape, generator=generator).float() * 2.0 ** -5).bfloat16()
        for method in ("della", "della_linear"):
            fast, reference = both(method, [child, base], base,
                                   [{"weight": 0.7, "density": 0.5, "epsilon": 0.2},
                                    {"weight": 0.3, "density": 0.3, "epsilon": 0.1}])
            assert torch.equal(fast, reference), (shape, method)
    ranks = sparsify.della_ranks(torch.tensor([[3.0, -1.0, 1.0, 0.0]]))
    assert ranks.tolist() == [[3.0, 1.0, 2.0, 0.0]]  # |-1| = |1|: the lower index ranks first


def test_slerp_sums_are_float64_dot_products_of_the_stored_values():
    generator = torch.Generator().manual_seed(4)
    first = torch.randn(300_001, generator=generator).bfloat16()
    second = torch.randn(300_001, generator=generator).bfloat16()
    sums = fused.dot_products(first, second)
    a, b = first.double(), second.double()
    expected = torch.stack([a @ b, a @ a, b @ b])
    assert sums.dtype == torch.float64 and torch.allclose(sums, expected, rtol=1e-12, atol=0)


def test_a_histogram_that_no_longer_matches_the_weights_is_refused_not_overrun():
    """The cut's bin is gathered into arrays sized by the cached histogram; weights that
    changed under it (a file rewritten in place) must not write past them."""
    from merging.errors import MergeError

    generator = torch.Generator().manual_seed(5)
    base = fused.source_array(torch.randn(50_000, generator=generator).bfloat16())
    model = fused.source_array(torch.randn(50_000, generator=generator).bfloat16())
    coarse = fused.key_histogram(base, model)
    assert fused.window_rule(base, model, 0, 20_000, True, lambda: coarse)  # the true histogram serves
    stale = coarse.copy()
    stale //= 2  # every bin claims half its entries,
    stale[0] += coarse.sum() - stale.sum()  # the rest counted as the tiniest magnitudes
    with pytest.raises(MergeError, match="changed on disk"):
        fused.window_rule(base, model, 0, 20_000, True, lambda: stale)


def test_a_batch_of_weighted_sums_equals_each_sum_alone():
    """Passes gathered in a SumBatch (run largest first on two threads, and early when the
    batch reaches its limit) leave every output as the pass alone would."""
    generator = torch.Generator().manual_seed(5)
    sizes = (3, 70_000, 5, 300_001, 1_000, 65_536)
    for dtype in (torch.float32, torch.bfloat16):
        pairs = [[torch.randn(n, generator=generator).to(dtype) for _ in range(2)] for n in sizes]
        coefficients = [[0.25 + 0.1 * i, 0.6 - 0.05 * i] for i in range(len(sizes))]
        alone = [fused.weighted_sum(p, c, torch.empty(len(p[0]), dtype=dtype)) for p, c in zip(pairs, coefficients)]
        for limit in (1 << 27, 100_000):
            batch = fused.SumBatch(threads=2, limit=limit)
            outs = [fused.weighted_sum(p, c, torch.zeros(len(p[0]), dtype=dtype), batch)
                    for p, c in zip(pairs, coefficients)]
            batch.run()
            assert not batch.jobs
            assert all(torch.equal(a, b) for a, b in zip(alone, outs)), (dtype, limit)
