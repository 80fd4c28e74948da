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
