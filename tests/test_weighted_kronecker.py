"""Data-aware nearest Kronecker sum: G = I is plain Van Loan-Pitsianis, planted sums are exact, ALS never rises."""

import pytest
import torch

from tensorlm.decompose.kronecker import kronecker_sum, nearest_kronecker
from tensorlm.decompose.weighted_kronecker import (
    DEFAULT_RIDGE,
    permute_second_moment,
    start_errors,
    weighted_kronecker,
    with_ridge,
)
from tensorlm.decompose.whitening import weighted_error
from tensorlm.errors import TensorLMError

D = torch.float64
A_SHAPE, B_SHAPE = (6, 4), (3, 5)  # W: (18, 20)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _second_moment(n, seed, tokens=300, rank=None):
    """G = X^T X of correlated, badly scaled inputs ``X (tokens, n)``."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=D) * torch.logspace(0, -3, n, dtype=D)[:, None]
    x = torch.randn(tokens, rank or n, generator=gen, dtype=D)
    x = x @ torch.randn(rank, n, generator=gen, dtype=D) if rank else x @ mix
    return x.T @ x


def _planted(rank, gen):
    """A Kronecker sum of ``rank`` random terms, ``(18, 20)``."""
    return kronecker_sum(torch.randn(rank, *A_SHAPE, generator=gen, dtype=D),
                         torch.randn(rank, *B_SHAPE, generator=gen, dtype=D))


def _weight(seed):
    return torch.randn(18, 20, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_identity_second_moment_is_plain_van_loan_pitsianis(scale):
    w = _weight(0)
    plain = nearest_kronecker(w, A_SHAPE, B_SHAPE, 3)
    res = weighted_kronecker(w, scale * torch.eye(20, dtype=D), A_SHAPE, B_SHAPE, 3)
    assert _rel(kronecker_sum(res.a, res.b), kronecker_sum(plain.a, plain.b)) < 1e-6
    assert abs(res.rel_error - plain.rel_error) < 1e-9
    assert abs(res.rel_error_whitened - plain.rel_error) < 1e-9 and abs(res.rel_error_plain - plain.rel_error) < 1e-9


def test_planted_kronecker_sum_recovered_with_rank_deficient_g():
    gen = torch.Generator().manual_seed(1)
    w = _planted(2, gen)
    for g in (_second_moment(20, 2), _second_moment(20, 3, rank=7)):
        res = weighted_kronecker(w, g, A_SHAPE, B_SHAPE, 2)
        assert res.rel_error_whitened < 1e-7 and res.rel_error < 1e-7


def test_beats_plain_kronecker_in_the_weighted_norm():
    for seed in range(3):
        w, g = _weight(10 + seed), _second_moment(20, 20 + seed)
        plain = nearest_kronecker(w, A_SHAPE, B_SHAPE, 2)
        res = weighted_kronecker(w, g, A_SHAPE, B_SHAPE, 2, ridge=0.0)  # errors in G's own norm
        plain_err = weighted_error(w, kronecker_sum(plain.a, plain.b), g)
        assert abs(res.rel_error_plain - plain_err) < 1e-12
        assert res.rel_error <= min(res.rel_error_whitened, plain_err) and res.rel_error < 0.9 * plain_err
        assert abs(weighted_error(w, kronecker_sum(res.a, res.b), g) - res.rel_error) < 1e-9


def test_ridge_moves_the_fit_from_the_weighted_towards_plain_van_loan_pitsianis():
    w = _weight(3)
    g = _second_moment(20, 4, rank=7)  # singular: the calibration excites 7 of 20 input directions
    plain = kronecker_sum(*(lambda f: (f.a, f.b))(nearest_kronecker(w, A_SHAPE, B_SHAPE, 3)))
    fits = {ridge: weighted_kronecker(w, g, A_SHAPE, B_SHAPE, 3, ridge=ridge) for ridge in (0.0, 1e-2, 1e6)}
    frob = {ridge: _rel(kronecker_sum(f.a, f.b), w) for ridge, f in fits.items()}
    assert frob[0.0] > frob[1e-2] > frob[1e6]  # less weight-space error as the ridge grows
    assert _rel(kronecker_sum(fits[1e6].a, fits[1e6].b), plain) < 1e-4  # G_ridge ~ c I: plain
    raw = {ridge: weighted_error(w, kronecker_sum(f.a, f.b), g) for ridge, f in fits.items()}
    assert max(raw[0.0], raw[1e-2]) < 0.9 * raw[1e6]  # both still fit the calibration norm far better
    with pytest.raises(TensorLMError, match="ridge must be a finite number >= 0"):
        weighted_kronecker(w, g, A_SHAPE, B_SHAPE, 3, ridge=-1.0)


def test_start_errors_are_the_weighted_errors_of_the_unrefined_fit_at_each_rank():
    w, g = _weight(5), _second_moment(20, 6)
    ranks = [1, 3, 7, 12]
    errors = start_errors(w, g, A_SHAPE, B_SHAPE, ranks)  # in the default G_ridge norm, as the fit's errors
    total = ((w @ with_ridge(g, DEFAULT_RIDGE)) * w).sum().item()
    for rank, error in zip(ranks, errors, strict=True):
        start = weighted_kronecker(w, g, A_SHAPE, B_SHAPE, rank, sweeps=0)
        assert (error / total) ** 0.5 == pytest.approx(start.rel_error, rel=1e-9)
        assert weighted_kronecker(w, g, A_SHAPE, B_SHAPE, rank).rel_error <= start.rel_error
    assert start_errors(w, g, A_SHAPE, B_SHAPE, [15])[0] < 1e-20 * total  # full rank min(6*4, 3*5): exact
    with pytest.raises(TensorLMError, match="must be in 1..15"):
        start_errors(w, g, A_SHAPE, B_SHAPE, [0, 3])


def test_als_never_increases_the_weighted_error():
    w, g = _weight(30), _second_moment(20, 31)
    res = weighted_kronecker(w, g, A_SHAPE, B_SHAPE, 3, sweeps=8, tol=0.0)
    assert len(res.history) == 1 + 2 * res.sweeps_run
    assert all(b <= a + 1e-12 for a, b in zip(res.history, res.history[1:], strict=False))
    measured = []  # independently: the weighted error after 0, 1, 2, ... sweeps, from the dense product
    for sweeps in range(5):
        r = weighted_kronecker(w, g, A_SHAPE, B_SHAPE, 3, sweeps=sweeps, tol=0.0)
        measured.append(weighted_error(w, kronecker_sum(r.a, r.b), g))
    assert all(b <= a + 1e-12 for a, b in zip(measured, measured[1:], strict=False))
    assert measured[-1] < measured[0]


def test_composes_with_permutations():
    """A planted permuted Kronecker sum: with the right p, q (and G[q][:, q]) the fit is exact."""
    gen = torch.Generator().manual_seed(40)
    k = _planted(1, gen)
    p, q = torch.randperm(18, generator=gen), torch.randperm(20, generator=gen)
    w = torch.empty_like(k)
    w[p.unsqueeze(1), q] = k  # so that W[p][:, q] = K
    g = _second_moment(20, 41)
    scrambled = weighted_kronecker(w, g, A_SHAPE, B_SHAPE, 1)
    res = weighted_kronecker(w[p][:, q], permute_second_moment(g, q), A_SHAPE, B_SHAPE, 1)
    assert res.rel_error < 1e-7 < scrambled.rel_error
    back = torch.empty_like(w)
    back[p.unsqueeze(1), q] = kronecker_sum(res.a, res.b)  # undo the permutations
    assert weighted_error(w, back, g) < 1e-7


@pytest.mark.parametrize("g, match", [
    (torch.full((20, 20), float("inf"), dtype=D), "NaN/Inf"),
    (torch.eye(18, dtype=D), r"expected \(20, 20\)"),
    (torch.zeros(20, 20, dtype=D), "no nonzero input"),
])
def test_bad_second_moment(g, match):
    with pytest.raises(TensorLMError, match=match) as info:
        weighted_kronecker(_weight(0), g, A_SHAPE, B_SHAPE, 1, name="h.0.mlp.c_fc")
    assert "h.0.mlp.c_fc" in str(info.value) and "\n" not in str(info.value)


def test_bad_shapes_and_rank():
    g = torch.eye(20, dtype=D)
    with pytest.raises(TensorLMError, match="cannot be split"):
        weighted_kronecker(_weight(0), g, (5, 4), (3, 5), 1)
    with pytest.raises(TensorLMError, match="must be in 1..15"):
        weighted_kronecker(_weight(0), g, A_SHAPE, B_SHAPE, 16)
