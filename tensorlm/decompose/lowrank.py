"""Truncated SVD: the baseline every tensor method is compared with (Eckart-Young-Mirsky)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorlm.decompose.linalg import check_finite
from tensorlm.errors import TensorLMError


@dataclass
class LowRankFactors:
    """``W ~ U @ V``: ``u: (m, r)``, ``v: (r, n)``, singular values split evenly (``sqrt(s)`` each side).

    ``singular_values``: all of them, ``(min(m, n),)``; ``rel_error``: ``||W - U V||_F / ||W||_F``.
    """

    u: torch.Tensor
    v: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float


def rank_for_ratio(shape: tuple[int, int], ratio: float) -> int:
    """Largest rank whose ``rank * (m + n)`` does not exceed ``ratio * m * n`` (at least 1).

    Raises:
        TensorLMError: ``ratio`` outside (0, 1).
    """
    if not 0 < ratio < 1:
        raise TensorLMError(f"low-rank target ratio must be in (0, 1), got {ratio}")
    m, n = shape
    return max(1, int(ratio * m * n // (m + n)))


def truncated_svd(w: torch.Tensor, rank: int, name: str = "weight") -> LowRankFactors:
    """Best rank-``rank`` approximation of ``w: (m, n)`` in Frobenius norm, computed in float64.

    Raises:
        TensorLMError: ``rank`` outside ``1..min(m, n)`` or NaN/Inf in ``w``.
    """
    check_finite(w, name)
    if not 1 <= rank <= min(w.shape):
        raise TensorLMError(f"{name} {tuple(w.shape)}: SVD rank {rank} must be in 1..{min(w.shape)}")
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    norm = s.square().sum().sqrt()
    rel = (s[rank:].square().sum().sqrt() / norm).item() if norm > 0 else 0.0
    return LowRankFactors(
        (u[:, :rank] * root).to(w.dtype), (vh[:rank] * root[:, None]).to(w.dtype), s.to(w.dtype), rel
    )
