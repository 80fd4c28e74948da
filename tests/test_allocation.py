"""Budget-driven rank allocation: optimal where it must be, within budget, monotone in the budget."""

import itertools

import pytest
import torch

from tensorlm.decompose.allocation import RankCurve, allocate_ranks, lowrank_curve
from tensorlm.decompose.whitening import whitened_svd
from tensorlm.errors import TensorLMError


def _convex(name, gen, k, cost):
    """A planted convex curve over ranks 1..k: losses are tails of decreasing squared singular values."""
    s2 = torch.rand(k + 1, generator=gen, dtype=torch.float64).sort(descending=True).values
    tails = s2.flip(0).cumsum(0).flip(0)
    return RankCurve(name, tuple(range(1, k + 1)), tuple(tails[1:].tolist()), cost)


def _brute_force(curves, budget):
    best = float("inf")
    for choice in itertools.product(*[range(len(c.ranks)) for c in curves]):
        if sum(c.ranks[j] * c.cost_per_rank for c, j in zip(curves, choice, strict=True)) <= budget:
            best = min(best, sum(c.losses[j] for c, j in zip(curves, choice, strict=True)))
    return best


def test_greedy_equals_brute_force_on_convex_curves_with_equal_costs():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        curves = [_convex(f"m{i}", gen, 4, 7) for i in range(3)]
        for budget in range(21, 7 * 12 + 3, 5):
            got = allocate_ranks(curves, budget)
            assert got.cost <= budget
            assert got.loss == pytest.approx(_brute_force(curves, budget), rel=1e-12, abs=1e-12), (trial, budget)


def test_within_budget_and_monotone_in_budget_with_unequal_costs():
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        curves = [_convex(f"m{i}", gen, int(torch.randint(2, 9, (1,), generator=gen)),
                          int(torch.randint(3, 30, (1,), generator=gen))) for i in range(5)]
        minimum = sum(c.cost_per_rank for c in curves)
        losses = []
        for budget in range(minimum, minimum + 400, 3):
            got = allocate_ranks(curves, budget)
            assert got.cost <= budget
            assert sum(got.ranks[c.name] * c.cost_per_rank for c in curves) == got.cost
            assert got.loss == pytest.approx(sum(c.losses[c.ranks.index(got.ranks[c.name])] for c in curves))
            losses.append(got.loss)
        assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))


def test_non_convex_curve_jumps_over_a_flat_step():
    """A curve that saves nothing at rank 2 but everything at rank 3 still wins over a steady one."""
    jump = RankCurve("jump", (1, 2, 3), (10.0, 10.0, 0.0), 1)
    steady = RankCurve("steady", (1, 2, 3), (4.0, 2.0, 0.0), 1)
    assert allocate_ranks([jump, steady], 4).ranks == {"jump": 3, "steady": 1}


def test_deterministic_and_sparse_allowed_ranks():
    curves = [RankCurve("a", (1, 2, 4, 8), (8.0, 4.0, 2.0, 1.0), 10),
              RankCurve("b", (1, 2, 4, 8), (8.0, 4.0, 2.0, 1.0), 10)]
    first = allocate_ranks(curves, 60)
    assert first.ranks == allocate_ranks(curves, 60).ranks == {"a": 4, "b": 2}  # ties go to the earlier curve
    assert first.cost == 60 and first.loss == 6.0


def test_lowrank_curve_is_the_whitened_truncation_loss():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    f = whitened_svd(w, x.T @ x, 1)
    curve = lowrank_curve("lin", f.singular_values, (8, 6))
    assert curve.cost_per_rank == 14 and curve.ranks == (1, 2, 3, 4, 5, 6)
    for r in (1, 3, 5):
        assert curve.losses[r - 1] == pytest.approx(whitened_svd(w, x.T @ x, r).rel_error ** 2, abs=1e-12)
    assert curve.losses[-1] == pytest.approx(0.0, abs=1e-12)
    assert lowrank_curve("lin", f.singular_values, (8, 6), max_rank=2).ranks == (1, 2)
    floored = lowrank_curve("lin", f.singular_values, (8, 6), min_rank=3)
    assert floored.ranks == (3, 4, 5, 6) and floored.losses == curve.losses[2:]
    with pytest.raises(TensorLMError, match="minimum rank 7"):
        lowrank_curve("lin", f.singular_values, (8, 6), min_rank=7)


def test_impossible_budget_names_the_minimum():
    curves = [RankCurve("a", (1, 2), (1.0, 0.0), 100), RankCurve("b", (2, 3), (1.0, 0.0), 50)]
    with pytest.raises(TensorLMError, match="below the minimum 200") as info:
        allocate_ranks(curves, 199)
    assert "\n" not in str(info.value)
    assert allocate_ranks(curves, 200).ranks == {"a": 1, "b": 2}


@pytest.mark.parametrize("ranks, losses, cost, match", [
    ((1, 1), (1.0, 0.5), 1, "strictly increasing"),
    ((1, 2), (1.0, 2.0), 1, "must not rise"),
    ((1, 2), (1.0, float("nan")), 1, "finite"),
    ((1, 2), (1.0,), 1, "as many losses"),
    ((1,), (1.0,), 0, "cost per rank"),
])
def test_bad_curves(ranks, losses, cost, match):
    with pytest.raises(TensorLMError, match=match):
        RankCurve("m", ranks, losses, cost)
