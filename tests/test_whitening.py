"""Whitening and the whitened (SVD-LLM) truncated SVD: the objective on data where the answer is known."""

import pytest
import torch

from tensorlm.decompose.lowrank import truncated_svd
from tensorlm.decompose.whitening import psd_sqrt, weighted_error, whitened_svd, whitening
from tensorlm.errors import TensorLMError

D = torch.float64


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs(n, tokens=200, rank=None, seed=0):
    """Calibration inputs ``X (tokens, n)`` with decaying column scales (ill-conditioned G), optionally of low rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen, dtype=D) * torch.logspace(0, -4, n, dtype=D)
    if rank is not None:
        x = torch.randn(tokens, rank, generator=gen, dtype=D) @ torch.randn(rank, n, generator=gen, dtype=D)
    return x


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_identity_second_moment_is_plain_svd(scale):
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(1), dtype=D)
    plain = truncated_svd(w, 5)
    white = whitened_svd(w, scale * torch.eye(12, dtype=D), 5)
    assert _rel(white.u @ white.v, plain.u @ plain.v) < 1e-6
    assert _rel(white.u.abs(), plain.u.abs()) < 1e-6  # same balanced factors, up to the signs of the vectors
    assert _rel(white.singular_values / scale**0.5, plain.singular_values) < 1e-6
    assert abs(white.rel_error - plain.rel_error) < 1e-9


def test_equals_svd_llm_map_back_when_g_invertible():
    """U_r diag(s_r) V_r^T S^{-1} (SVD-LLM) is what the projection form computes."""
    w = torch.randn(10, 8, generator=torch.Generator().manual_seed(2), dtype=D)
    g = (x := _inputs(8, seed=3)).T @ x
    s = psd_sqrt(g)
    u, sv, vh = torch.linalg.svd(w @ s)
    svd_llm = (u[:, :3] * sv[:3]) @ vh[:3] @ torch.linalg.inv(s)
    f = whitened_svd(w, g, 3)
    assert _rel(f.u @ f.v, svd_llm) < 1e-6


def test_weighted_error_matches_singular_value_tail_and_beats_plain_svd():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(4), dtype=D)
    g = (x := _inputs(24, seed=5)).T @ x
    f = whitened_svd(w, g, 4)
    tail = (f.singular_values[4:].square().sum() / f.singular_values.square().sum()).sqrt().item()
    assert abs(f.rel_error - tail) < 1e-9
    assert abs(weighted_error(w, f.u @ f.v, g) - f.rel_error) < 1e-7
    plain = truncated_svd(w, 4)
    assert f.rel_error < weighted_error(w, plain.u @ plain.v, g)


def test_planted_low_rank_output_recovered_with_rank_deficient_g():
    """W full rank but the inputs span 3 dimensions: W X has rank 3, and rank 3 reproduces it exactly."""
    w = torch.randn(9, 14, generator=torch.Generator().manual_seed(6), dtype=D)
    x = _inputs(14, tokens=50, rank=3, seed=7)
    f = whitened_svd(w, x.T @ x, 3)
    assert f.rel_error < 1e-7
    assert _rel(x @ (f.u @ f.v).T, x @ w.T) < 1e-7


def test_planted_low_rank_weight_recovered_with_ill_conditioned_g():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(12, 4, generator=gen, dtype=D) @ torch.randn(4, 10, generator=gen, dtype=D)
    x = _inputs(10, seed=9) * torch.logspace(0, -6, 10, dtype=D)  # condition number of G about 1e20
    f = whitened_svd(w, x.T @ x, 4)
    assert f.rel_error < 1e-7
    assert _rel(x @ (f.u @ f.v).T, x @ w.T) < 1e-7


def test_whitening_roots_and_damping():
    g = (x := _inputs(6, seed=10)).T @ x
    wh = whitening(g)
    eye = torch.eye(6, dtype=D)
    assert _rel(wh.sqrt @ wh.inv_sqrt, eye) < 1e-6
    assert wh.floor == pytest.approx(1e-6 * torch.trace(g).item() / 6)
    singular = (x := _inputs(6, rank=2, seed=11)).T @ x
    damped = whitening(singular)
    assert torch.isfinite(damped.inv_sqrt).all()
    assert damped.inv_sqrt.abs().max() <= 1.01 * damped.floor ** -0.5
    assert _rel(damped.sqrt @ damped.sqrt, singular) < 1e-5  # the clamp only touches the null space


@pytest.mark.parametrize("bad, match", [
    (torch.full((5, 5), float("nan"), dtype=D), "NaN/Inf"),
    (torch.eye(4, dtype=D), r"expected \(5, 5\)"),
    (torch.ones(5, 4, dtype=D), r"expected \(5, 5\)"),
])
def test_bad_second_moment_is_one_line_naming_the_module(bad, match):
    with pytest.raises(TensorLMError, match=match) as info:
        whitened_svd(torch.randn(3, 5, dtype=D), bad, 2, name="model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj" in str(info.value) and "\n" not in str(info.value)


def test_zero_second_moment_cannot_be_inverted():
    with pytest.raises(TensorLMError, match="no nonzero input"):
        whitening(torch.zeros(3, 3, dtype=D), name="lin")
