"""Linear algebra every decomposition shares: a finiteness check and one Gram-matrix thin SVD.

Pure functions on torch tensors; imports nothing from tensorlm but :mod:`tensorlm.errors`.
"""

from __future__ import annotations

import torch

from tensorlm.errors import TensorLMError


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise :class:`TensorLMError` if ``tensor`` holds NaN or Inf (a decomposition would spread it)."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise TensorLMError(f"weight of {name!r} {tuple(tensor.shape)} holds {bad} NaN/Inf values")


def gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_: object
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a wide ``matrix (m, n)``, ``m <= n``, from the eigenvectors of ``matrix matrix^T``.

    ``eigh`` of the ``(m, m)`` Gram matrix costs ``O(n m^2)``: 10-20x faster than LAPACK's SVD on the
    very wide unfoldings of a Tucker bank (``(384, 27648)`` float64, 1 thread) and far cheaper on a
    19M x 2 rearranged embedding. Singular values below ``1e-12 * s_max`` get zero rows in ``Vt``.
    Follows tensorly's SVD-function interface (``svd=`` callable), hence the ignored keywords.

    Returns:
        ``U: (m, k)``, ``S: (k,)`` (descending), ``Vt: (k, n)`` with ``k = n_eigenvecs or m``.
    """
    eigenvalues, vectors = torch.linalg.eigh(matrix @ matrix.T)  # ascending, (m,), (m, m)
    k = n_eigenvecs or matrix.shape[0]
    U = vectors.flip(1)[:, :k]  # (m, k)
    S = eigenvalues.flip(0)[:k].clamp_min(0).sqrt()  # (k,)
    keep = S > 1e-12 * S[0].clamp_min(torch.finfo(S.dtype).tiny)  # (k,)
    Vt = torch.zeros(k, matrix.shape[1], dtype=matrix.dtype, device=matrix.device)  # (k, n)
    Vt[keep] = (U[:, keep].T @ matrix) / S[keep, None]
    return U, S, Vt


def thin_svd(r: torch.Tensor, gram_max: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``r = U diag(s) V^T`` of a float64 ``(p, k)`` matrix; returns ``(U (p, k'), s (k',), V^T (k', k))``.

    When the short side ``k' = min(p, k)`` is at most ``gram_max`` and the matrix is at least 8x
    longer than wide, the SVD comes from :func:`gram_svd`; otherwise ``torch.linalg.svd``.
    """
    p, k = r.shape
    if min(p, k) > gram_max or max(p, k) < 8 * min(p, k):
        return torch.linalg.svd(r, full_matrices=False)
    if p <= k:
        return gram_svd(r)
    v, s, uh = gram_svd(r.T)  # r^T = V S U^T
    return uh.T, s, v.T
