"""Data-aware TT-matrix: TT-SVD of a weight whitened by a Kronecker-factored input second moment (ours).

Objective (SVD-LLM's, Wang et al. 2024, arXiv 2403.07378, for a TT-matrix ``W~`` instead of a rank-``r`` one):
``||(W - W~) G^{1/2}||_F``, ``G = sum x x^T`` over the layer's calibration inputs, ``W: (m, n)`` with
``n = n_1 ... n_N`` the TT input modes (Novikov et al. 2015).

Replace ``G`` by its nearest Kronecker product ``G_1 (x) ... (x) G_N`` with ``G_k: (n_k, n_k)`` (Van
Loan-Pitsianis, peeled one factor at a time) and let ``L_k = G_k^{1/2}``, ``L = L_1 (x) ... (x) L_N``. Then
``(W L)[i, (j_1..j_N)] = sum_j' W[i, j'] prod_k L_k[j'_k, j_k]`` acts on each TT core's input index alone, so
``W L`` is a TT-matrix of the same ranks as ``W`` and, for any cores ``C_k`` of ``W L``, the cores
``C_k x_n L_k^{-1}`` (each core's input mode times ``L_k^{-1}``) give ``W``. TT-SVD of ``W L``, mapped back
core by core, is the data-aware TT-matrix: the plain TT-SVD of the whitened problem (quasi-optimal in the
weighted norm, Oseledets 2011, Thm. 2.2) when ``G`` is a Kronecker product, and a planted TT-matrix is recovered
exactly under any ``G``. ``G = I`` gives the plain TT-SVD. Roots are damped as in
:func:`~tensorlm.decompose.whitening.whitening`. A real ``G`` is not a Kronecker product, and its factoring can
cost more than the whitening gains (an MLP matrix of a tiny random Llama: 0.7% worse than plain), so at fixed ranks the
plain TT-SVD is kept when its error under the full ``G`` is lower: never worse than plain in the objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tensorlm.decompose.kronecker import nearest_kronecker
from tensorlm.decompose.tt import Ranks, tt_matrix_svd, tt_matrix_to_full
from tensorlm.decompose.whitening import (
    DEFAULT_DAMP,
    Whitening,
    check_second_moment,
    weighted_error,
    whitening,
)
from tensorlm.errors import TensorLMError


def kronecker_moment_roots(g: torch.Tensor, in_shape: Sequence[int], damp: float = DEFAULT_DAMP,
                           name: str = "weight") -> list[Whitening]:
    """Damped roots of ``G_1 (x) ... (x) G_N ~ g``, one :class:`~tensorlm.decompose.whitening.Whitening` of
    ``(n_k, n_k)`` per input mode, row-major as the TT input index.

    ``g (n, n)``, ``n = prod(in_shape)``, is split as ``G_1 (x) H`` (the nearest Kronecker product), then ``H``
    likewise; each factor is symmetrised and given a positive trace.

    Raises:
        TensorLMError: ``g`` not ``(n, n)`` or not finite, a factor with no positive trace (no input).
    """
    sizes = [int(s) for s in in_shape]
    rest = check_second_moment(g, math.prod(sizes), name)
    factors = []
    for k, size in enumerate(sizes[:-1]):
        tail = math.prod(sizes[k + 1:])
        found = nearest_kronecker(rest, (size, size), (tail, tail), 1, name)
        head, rest = found.a[0], found.b[0]  # (n_k, n_k), (tail, tail)
        if torch.trace(head) < 0:
            head, rest = -head, -rest
        factors.append((head + head.T) / 2)
    factors.append((rest + rest.T) / 2)
    return [whitening(f, damp, name) for f in factors]


def whitened_tt_matrix(
    w: torch.Tensor, g: torch.Tensor, out_shape: Sequence[int], in_shape: Sequence[int], *, ranks: Ranks = None,
    eps: float | None = None, damp: float = DEFAULT_DAMP, name: str = "weight",
) -> list[torch.Tensor]:
    """The data-aware TT-matrix of ``w`` (module docstring).

    Args:
        w: ``(m, n)``, ``m = prod(out_shape)``, ``n = prod(in_shape)`` (tensorlm orientation: out, in; padded
            by the caller when a size factors badly).
        g: ``(n_in, n_in)`` input second moment, ``n_in <= n`` (zero-padded to ``n``: padded inputs are zero).
        out_shape, in_shape: ``(m_1..m_N)``, ``(n_1..n_N)``.
        ranks, eps: as in :func:`~tensorlm.decompose.tt.tt_matrix_svd`, over the whitened weight (``eps``
            bounds the weighted relative error when ``G`` is a Kronecker product).
        damp: eigenvalue floor of each factor, relative to its mean eigenvalue.

    Returns:
        cores ``(r_{k-1}, m_k, n_k, r_k)`` float64: with ``eps`` the whitened fit; at fixed ranks, whichever of
        the whitened and the plain TT-SVD has the lower ``||(W - W~) G^{1/2}||_F``.

    Raises:
        TensorLMError: shapes that do not match, ``g`` too large, not square or not finite; bad ranks or eps.
    """
    n = math.prod(int(s) for s in in_shape)
    if w.dim() != 2 or w.shape[1] != n or g.dim() != 2 or g.shape[0] > n:
        raise TensorLMError(f"{name}: whitened TT-matrix needs w (m, {n}) and g (n_in, n_in) with n_in <= {n}; "
                            f"got w {tuple(w.shape)}, g {tuple(g.shape)}")
    padded = g.new_zeros(n, n, dtype=torch.float64)
    padded[: g.shape[0], : g.shape[0]] = check_second_moment(g, g.shape[0], name)
    roots = kronecker_moment_roots(padded, in_shape, damp, name)
    whitened = w.detach().to(torch.float64).reshape(w.shape[0], *in_shape)  # (m, n_1, ..., n_N)
    for k, root in enumerate(roots):  # input mode k times L_k
        whitened = torch.movedim(torch.tensordot(whitened, root.sqrt, dims=([k + 1], [0])), -1, k + 1)
    cores = tt_matrix_svd(whitened.reshape(w.shape), out_shape, in_shape, ranks=ranks, eps=eps)
    cores = [torch.einsum("amnb,nc->amcb", core, root.inv_sqrt) for core, root in zip(cores, roots, strict=True)]
    if eps is not None:  # the plain fit's ranks would differ: no like-for-like comparison
        return cores
    plain = tt_matrix_svd(w.detach().to(torch.float64), out_shape, in_shape, ranks=ranks)
    errors = [weighted_error(w, tt_matrix_to_full(c), padded) for c in (cores, plain)]
    return cores if errors[0] <= errors[1] else plain


def rank_one_weights(f: torch.Tensor, shape: Sequence[int]) -> list[torch.Tensor]:
    """Positive ``u_k (v_k,)`` with ``u_1 (x) ... (x) u_N ~ f`` for positive ``f (prod shape,)``, row-major: the
    leading singular pair of ``f`` as ``(v_1, v_2 ... v_N)``, then of the right vector likewise (the nearest
    Kronecker product of ``diag(f)`` by diagonals; Perron-Frobenius makes each pair positive)."""
    sizes = [int(s) for s in shape]
    rest, out = f.to(torch.float64), []
    for size in sizes[:-1]:
        u, s, vh = torch.linalg.svd(rest.reshape(size, -1), full_matrices=False)
        sign = 1.0 if u[:, 0].sum() >= 0 else -1.0
        out.append((sign * u[:, 0] * s[0]).clamp_min(torch.finfo(torch.float64).tiny))
        rest = sign * vh[0]  # (v_{k+1} ... v_N,)
    out.append(rest.clamp_min(torch.finfo(torch.float64).tiny))
    return out


def row_weighted_tt_matrix(
    table: torch.Tensor, f: torch.Tensor, vocab_shape: Sequence[int], dim_shape: Sequence[int], *,
    ranks: Ranks = None, eps: float | None = None,
) -> list[torch.Tensor]:
    """A TT-matrix table ``E~ (V', d)`` for ``min sum_t f_t ||e_t - e~_t||^2`` (``calibration: frequency`` of
    ``tt_matrix_embedding``; ours).

    The row weights enter as ``D^{1/2} E`` with ``D = diag(f)``; ``D`` replaced by its nearest Kronecker product
    over the vocabulary modes, ``diag(u_1) (x) ... (x) diag(u_N)`` (:func:`rank_one_weights`), scales each
    core's vocabulary index alone, so the TT-SVD of the scaled table maps back core by core (the input-side
    argument of :func:`whitened_tt_matrix`). Uniform ``f`` gives the plain TT-SVD; a planted TT-matrix is exact.
    At fixed ranks the plain TT-SVD is kept where its weighted error under the full ``f`` is lower.

    Args:
        table: ``(V', d)``, ``V' = prod(vocab_shape)`` (padded rows zero); f: ``(V',)`` positive, finite row
            weights; vocab_shape, dim_shape, ranks, eps: as in :func:`~tensorlm.decompose.tt.tt_matrix_svd`.

    Returns:
        cores ``(r_{k-1}, v_k, d_k, r_k)`` float64.

    Raises:
        TensorLMError: ``f`` not ``(V',)``, positive and finite; shapes, ranks or eps as ``tt_matrix_svd``.
    """
    if f.shape != (table.shape[0],) or not (torch.isfinite(f).all() and (f > 0).all()):
        raise TensorLMError(f"row-weighted TT-matrix: row weights {tuple(f.shape)} must be ({table.shape[0]},), "
                            "finite and > 0")
    roots = [u.sqrt() for u in rank_one_weights(f, vocab_shape)]  # each (v_k,)
    scaled = table.to(torch.float64).reshape(*vocab_shape, -1)  # (v_1, ..., v_N, d)
    for k, root in enumerate(roots):
        scaled = scaled * root.reshape(-1, *[1] * (len(vocab_shape) - k))  # vocabulary mode k times sqrt(u_k)
    cores = tt_matrix_svd(scaled.reshape(table.shape), vocab_shape, dim_shape, ranks=ranks, eps=eps)
    cores = [core / root[None, :, None, None] for core, root in zip(cores, roots, strict=True)]
    if eps is not None:  # the plain fit's ranks would differ: no like-for-like comparison
        return cores
    plain = tt_matrix_svd(table.to(torch.float64), vocab_shape, dim_shape, ranks=ranks)
    errors = [float((f.double() * (tt_matrix_to_full(c) - table.double()).square().sum(1)).sum())
              for c in (cores, plain)]
    return cores if errors[0] <= errors[1] else plain
