"""Data-aware TT-matrices (``tt_linear`` ``calibration: whitened``, ``tt_matrix_embedding`` ``calibration:
frequency``): G = I or uniform weights give the plain TT-SVD, a planted TT-matrix is recovered under any G or
weights, and Kronecker-structured ones are fitted better than by the plain TT-SVD."""

import pytest
import torch
from torch import nn

from tensorlm.decompose.kronecker import kronecker_sum
from tensorlm.decompose.tt import tt_matrix_svd, tt_matrix_to_full
from tensorlm.decompose.weighted_tt import (
    kronecker_moment_roots,
    rank_one_weights,
    row_weighted_tt_matrix,
    whitened_tt_matrix,
)
from tensorlm.decompose.whitening import weighted_error
from tensorlm.errors import TensorLMError
from tensorlm.layers.tt import TTLinear

D = torch.float64
OUT, IN = [3, 4, 2], [2, 3, 4]  # W: (24, 24)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_moment(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    """``X^T X`` of badly scaled, correlated inputs (rank-deficient when ``rank < n``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, rank or n, generator=g, dtype=D) @ torch.randn(rank or n, n, generator=g, dtype=D)
    return (x * torch.logspace(0, -2, n, dtype=D)).T @ (x * torch.logspace(0, -2, n, dtype=D))


def kronecker_moment(seed: int) -> torch.Tensor:
    """``G_1 (x) G_2 (x) G_3`` with ill-conditioned factors over the input modes ``IN``."""
    factors = [random_moment(n, seed + k) + 1e-3 * torch.eye(n, dtype=D) for k, n in enumerate(IN)]
    return kronecker_sum(kronecker_sum(factors[0][None], factors[1][None])[None], factors[2][None])


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_identity_second_moment_is_the_plain_tt_svd(scale):
    w = torch.randn(24, 24, generator=torch.Generator().manual_seed(0), dtype=D)
    plain = tt_matrix_to_full(tt_matrix_svd(w, OUT, IN, ranks=3))
    ours = tt_matrix_to_full(whitened_tt_matrix(w, scale * torch.eye(24, dtype=D), OUT, IN, ranks=3))
    assert rel(ours, plain) < 1e-10


def test_kronecker_roots_of_a_kronecker_moment_are_its_factors_up_to_scale():
    g = kronecker_moment(3)
    roots = kronecker_moment_roots(g, IN, damp=1e-12)
    whole = kronecker_sum(kronecker_sum(roots[0].sqrt[None], roots[1].sqrt[None])[None], roots[2].sqrt[None])
    assert rel(whole @ whole, g) < 1e-8


@pytest.mark.parametrize("rank", [None, 12])
def test_a_planted_tt_matrix_is_recovered_under_any_second_moment(rank):
    gen = torch.Generator().manual_seed(1)
    cores = [torch.randn(r0, m, n, r1, generator=gen, dtype=D)
             for r0, m, n, r1 in zip([1, 2, 3], OUT, IN, [2, 3, 1], strict=True)]
    w = tt_matrix_to_full(cores)  # TT-ranks (2, 3)
    fit = whitened_tt_matrix(w, random_moment(24, 2, rank), OUT, IN, ranks=[2, 3])
    assert rel(tt_matrix_to_full(fit), w) < 1e-8


def test_beats_the_plain_tt_svd_in_the_weighted_norm_when_g_is_kronecker():
    g = kronecker_moment(5)
    for seed in range(3):
        w = torch.randn(24, 24, generator=torch.Generator().manual_seed(seed), dtype=D)
        plain = tt_matrix_to_full(tt_matrix_svd(w, OUT, IN, ranks=[2, 3]))
        ours = tt_matrix_to_full(whitened_tt_matrix(w, g, OUT, IN, ranks=[2, 3]))
        assert weighted_error(w, ours, g) < 0.9 * weighted_error(w, plain, g)


def test_tt_linear_pads_the_moment_of_a_size_that_factors_badly():
    layer = nn.Linear(22, 24, dtype=D)  # in 22 padded to 24 = 2 x 3 x 4
    g = random_moment(22, 7)
    tt = TTLinear.from_dense(layer, in_shape=IN, out_shape=OUT, second_moment=g)  # full ranks: exact
    x = torch.randn(5, 22, dtype=D)
    torch.testing.assert_close(tt(x), layer(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("g, match", [
    (torch.full((24, 24), float("nan"), dtype=D), "NaN/Inf"),
    (torch.eye(30, dtype=D), "n_in <= 24"),
    (torch.zeros(24, 24, dtype=D), "saw no nonzero input"),
])
def test_bad_second_moment_is_one_line(g, match):
    with pytest.raises(TensorLMError, match=match):
        whitened_tt_matrix(torch.randn(24, 24, dtype=D), g, OUT, IN, ranks=2)


# --- row-weighted TT-matrix tables (tt_matrix_embedding calibration: frequency) ----------------------------

V_SHAPE, E_SHAPE = [4, 5, 6], [2, 3, 4]  # table (120, 24)


def digit_weights(seed: int) -> torch.Tensor:
    """Row weights ``u_1 (x) u_2 (x) u_3`` over the vocabulary digits, spread over three decades."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.logspace(0, -1, n, dtype=D)[torch.randperm(n, generator=g)] for n in V_SHAPE]
    return torch.einsum("a,b,c->abc", *parts).reshape(-1)


def row_weighted(w, approx, f) -> float:
    return float((f * (w - approx).square().sum(1)).sum())


def test_uniform_row_weights_give_the_plain_tt_svd():
    w = torch.randn(120, 24, generator=torch.Generator().manual_seed(0), dtype=D)
    plain = tt_matrix_to_full(tt_matrix_svd(w, V_SHAPE, E_SHAPE, ranks=3))
    ours = tt_matrix_to_full(row_weighted_tt_matrix(w, torch.full((120,), 0.3, dtype=D), V_SHAPE, E_SHAPE, ranks=3))
    assert rel(ours, plain) < 1e-10


def test_rank_one_weights_of_a_product_are_its_factors():
    f = digit_weights(1)
    u = rank_one_weights(f, V_SHAPE)
    assert all((x > 0).all() for x in u) and rel(torch.einsum("a,b,c->abc", *u).reshape(-1), f) < 1e-10


def test_a_planted_tt_matrix_table_is_recovered_under_any_row_weights():
    gen = torch.Generator().manual_seed(2)
    cores = [torch.randn(r0, v, d, r1, generator=gen, dtype=D)
             for r0, v, d, r1 in zip([1, 3, 2], V_SHAPE, E_SHAPE, [3, 2, 1], strict=True)]
    w = tt_matrix_to_full(cores)  # (120, 24)
    f = torch.rand(120, generator=gen, dtype=D) + 1e-3  # far from a Kronecker product
    assert rel(tt_matrix_to_full(row_weighted_tt_matrix(w, f, V_SHAPE, E_SHAPE, ranks=[3, 2])), w) < 1e-8


def test_row_weights_over_the_digits_are_fitted_better_than_by_the_plain_tt_svd():
    f = digit_weights(3)
    for seed in range(3):
        w = torch.randn(120, 24, generator=torch.Generator().manual_seed(seed), dtype=D)
        plain = tt_matrix_to_full(tt_matrix_svd(w, V_SHAPE, E_SHAPE, ranks=[3, 3]))
        ours = tt_matrix_to_full(row_weighted_tt_matrix(w, f, V_SHAPE, E_SHAPE, ranks=[3, 3]))
        assert row_weighted(w, ours, f) < 0.9 * row_weighted(w, plain, f)


@pytest.mark.parametrize("f", [torch.ones(119, dtype=D), -torch.ones(120, dtype=D),
                               torch.full((120,), float("inf"), dtype=D)])
def test_bad_row_weights_are_one_line(f):
    with pytest.raises(TensorLMError, match="must be \\(120,\\), finite and > 0"):
        row_weighted_tt_matrix(torch.randn(120, 24, dtype=D), f, V_SHAPE, E_SHAPE, ranks=2)
