"""Whitening by the input second moment, and the whitened (data-aware) truncated SVD.

A linear target ``y = W x`` (``W: (m, n)``, tensorlm's ``(out, in)`` orientation) that sees inputs
``x_1 .. x_N`` on calibration text has the output error ``sum_t ||(W - W~) x_t||^2 =
||(W - W~) G^{1/2}||_F^2`` with ``G = sum_t x_t x_t^T`` (``(n, n)``, float64). Every calibrated method
minimises this weighted norm (DESIGN.md, "Data-aware objective").

Square roots come from the eigendecomposition ``G = Q diag(lam) Q^T`` (``torch.linalg.eigh`` in float64),
as in SVD-LLM V2 (Wang et al., arXiv 2503.12340, Sec. 3.2), never from a Cholesky factor, which fails
on the singular ``G`` of a layer whose inputs span less than ``n`` dimensions.

Damping (only where an inverse is needed, :func:`whitening`): eigenvalues are clamped from below at
``damp * mean(lam)`` (``mean(lam) = trace(G) / n``), default ``damp = 1e-6``, so the inverse square root
is bounded by ``(damp * mean(lam))^{-1/2}``: the condition number of the damped root is at most
``sqrt(n / damp)``, i.e. about 2.4e4 for ``n = 576``. The whitened SVD itself needs no inverse and
no damping (see :func:`whitened_svd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorlm.decompose.linalg import check_finite
from tensorlm.errors import TensorLMError

DEFAULT_DAMP = 1e-6


@dataclass
class Whitening:
    """Symmetric square roots of a damped second moment, float64.

    Attributes:
        sqrt: ``(n, n)``, ``S = Q diag(sqrt(lam_d)) Q^T`` with ``lam_d = max(lam, floor)``.
        inv_sqrt: ``(n, n)``, ``S^{-1} = Q diag(lam_d^{-1/2}) Q^T``.
        eigenvalues: ``(n,)``, the undamped eigenvalues of ``G`` (ascending, round-off negatives kept).
        floor: the clamp ``damp * trace(G) / n``.
    """

    sqrt: torch.Tensor
    inv_sqrt: torch.Tensor
    eigenvalues: torch.Tensor
    floor: float


@dataclass
class WhitenedFactors:
    """Result of :func:`whitened_svd`: ``W ~ U @ V``.

    Attributes:
        u: ``(m, r)``; v: ``(r, n)``, in ``w``'s dtype; term ``k`` is scaled so that
            ``||u[:, k]|| = ||v[k]||``.
        singular_values: ``(min(m, n),)`` float64, all singular values of ``W G^{1/2}``, descending;
            truncating at rank ``r`` loses ``sum_{k>=r} s_k^2`` of the weighted energy.
        rel_error: ``||(W - U V) G^{1/2}||_F / ||W G^{1/2}||_F`` (0 when ``W G^{1/2} = 0``).
    """

    u: torch.Tensor
    v: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float


def check_second_moment(g: torch.Tensor, n: int | None, name: str) -> torch.Tensor:
    """Validate ``g`` as the ``(n, n)`` second moment of module ``name``'s inputs; return it symmetrised in float64.

    ``n = None`` accepts any square size.

    Raises:
        TensorLMError: ``g`` is not a square ``(n, n)`` matrix, or holds NaN/Inf.
    """
    if n is None and g.dim() == 2:
        n = g.shape[0]
    if g.dim() != 2 or tuple(g.shape) != (n, n):
        raise TensorLMError(
            f"{name}: input second moment has shape {tuple(g.shape)}, expected ({n}, {n}) for {n} input features"
        )
    if not torch.isfinite(g).all():
        bad = (~torch.isfinite(g)).sum().item()
        raise TensorLMError(f"{name}: input second moment {tuple(g.shape)} holds {bad} NaN/Inf values")
    g = g.detach().to(torch.float64)
    return (g + g.T) / 2


def psd_sqrt(g: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Undamped symmetric root ``G^{1/2} = Q diag(sqrt(max(lam, 0))) Q^T`` of a ``(n, n)`` second moment, float64.

    Raises:
        TensorLMError: see :func:`check_second_moment`.
    """
    g = check_second_moment(g, None, name)
    lam, q = torch.linalg.eigh(g)  # ascending (n,), (n, n)
    return (q * lam.clamp_min(0).sqrt()) @ q.T  # (n, n)


def whitening(g: torch.Tensor, damp: float = DEFAULT_DAMP, name: str = "weight") -> Whitening:
    """Damped symmetric square root and inverse square root of a second moment ``g: (n, n)``.

    Eigenvalues below ``floor = damp * trace(G) / n`` are raised to ``floor`` (module docstring), so
    ``inv_sqrt`` exists for any PSD ``G`` with a nonzero trace and ``sqrt @ inv_sqrt = I``.

    Raises:
        TensorLMError: ``g`` not square, not finite, ``damp`` not positive, or ``trace(G) <= 0`` (the
            module saw no nonzero input).
    """
    g = check_second_moment(g, None, name)
    if not damp > 0:
        raise TensorLMError(f"{name}: whitening damping must be > 0, got {damp}")
    n = g.shape[0]
    mean = (torch.diagonal(g).sum() / n).item()
    if not mean > 0:
        raise TensorLMError(f"{name}: input second moment has trace {mean * n:g}; the module saw no nonzero input")
    lam, q = torch.linalg.eigh(g)  # ascending (n,), (n, n)
    floor = damp * mean
    root = lam.clamp_min(floor).sqrt()  # (n,)
    return Whitening((q * root) @ q.T, (q / root) @ q.T, lam, floor)


def whitened_svd(w: torch.Tensor, g: torch.Tensor, rank: int, name: str = "weight") -> WhitenedFactors:
    """Best rank-``rank`` ``W~`` in the weighted norm ``||(W - W~) G^{1/2}||_F`` (SVD-LLM).

    SVD-LLM (Wang et al., arXiv 2403.07378, Theorem 3.2; V2 arXiv 2503.12340 eq. 5 for the eigen form):
    with ``S = G^{1/2}`` and ``W S = U diag(s) V^T``, the optimum is ``W~ = U_r diag(s_r) V_r^T S^{-1}``,
    and the loss of truncating at rank ``r`` is ``sum_{k>=r} s_k^2``. Here ``W~ = U_r (U_r^T W)``, the
    projection of ``W`` onto the top ``r`` left singular vectors of ``W S``; it equals SVD-LLM's map-back
    whenever ``S`` is invertible (``U_r diag(s_r) V_r^T = U_r U_r^T W S``) and stays exact without any
    damping when ``G`` is singular (then ``W~ G^{1/2}`` is still the truncated SVD of ``W S``, and the
    part of ``W`` on the null space of ``G``, which the objective ignores, is projected like the rest).
    ``S`` is the undamped root :func:`psd_sqrt`. With ``G = I`` this is the plain truncated SVD
    (:func:`tensorlm.decompose.lowrank.truncated_svd`).

    Cost: one ``(n, n)`` eigendecomposition, one ``(m, n) @ (n, n)`` product and one ``(m, n)`` SVD, float64.

    Args:
        w: ``(m, n)`` weight, ``(out, in)``.
        g: ``(n, n)`` second moment of the inputs, ``sum_t x_t x_t^T``.
        rank: kept rank, ``1..min(m, n)``.
        name: the module's name, for error messages.

    Raises:
        TensorLMError: ``g`` not ``(n, n)`` or not finite, ``w`` not finite, rank out of range.
    """
    m, n = w.shape
    if not 1 <= rank <= min(m, n):
        raise TensorLMError(f"{name} {(m, n)}: SVD rank {rank} must be in 1..{min(m, n)}")
    u, s = whitened_basis(w, g, name)
    return truncate_basis(w, u, s, rank)


def whitened_basis(w: torch.Tensor, g: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """The left singular vectors ``U (m, k)`` and singular values ``s (k,)`` of ``W G^{1/2}``, float64.

    What :func:`whitened_svd` truncates; computed once, it serves every rank (a budget allocation reads
    ``s`` and the build then calls :func:`truncate_basis` at the chosen rank).

    Raises:
        TensorLMError: ``g`` not ``(n, n)`` or not finite, ``w`` not finite.
    """
    check_finite(w, name)
    g = check_second_moment(g, w.shape[1], name)
    root = psd_sqrt(g, name)  # (n, n)
    u, s, _ = torch.linalg.svd(w.detach().to(torch.float64) @ root, full_matrices=False)  # (m, k), (k,)
    return u, s


def truncate_basis(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, rank: int) -> WhitenedFactors:
    """``W~ = U_r (U_r^T W)`` from a :func:`whitened_basis` ``(u, s)`` of ``w (m, n)``; factors in ``w``'s dtype."""
    u = u[:, :rank]  # (m, r)
    v = u.T @ w.detach().to(torch.float64)  # (r, n)
    # balance each term: ||u_k|| = ||v_k|| (with G = I: u_k = sqrt(s_k) U_k, v_k = sqrt(s_k) V_k^T)
    scale = v.norm(dim=1).sqrt()  # (r,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = s.square().sum().sqrt()
    rel = (s[rank:].square().sum().sqrt() / norm).item() if norm > 0 else 0.0
    return WhitenedFactors((u * scale).to(w.dtype), (v / scale[:, None]).to(w.dtype), s, rel)


def weighted_error(w: torch.Tensor, w_approx: torch.Tensor, g: torch.Tensor) -> float:
    """``||(W - W~) G^{1/2}||_F / ||W G^{1/2}||_F`` for ``w, w_approx: (m, n)``, ``g: (n, n)``, in float64.

    Computed as ``sqrt(trace(D G D^T) / trace(W G W^T))`` (``D = W - W~``), clamped at 0 against round-off;
    0 when ``W G W^T`` has zero trace.
    """
    g = g.to(torch.float64)
    w64 = w.to(torch.float64)
    d = w64 - w_approx.to(torch.float64)  # (m, n)
    den = ((w64 @ g) * w64).sum()
    num = ((d @ g) * d).sum().clamp_min(0)
    return (num / den).sqrt().item() if den > 0 else 0.0
