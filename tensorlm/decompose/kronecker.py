"""Nearest Kronecker sum by the Van Loan-Pitsianis rearrangement, and factor-shape helpers.

Convention (DESIGN.md): ``W (m x n) ~ sum_k A_k (x) B_k`` with ``A_k: (m1, n1)``, ``B_k: (m2, n2)``,
``m = m1*m2``, ``n = n1*n2`` and ``W[(i1,i2),(j1,j2)] = sum_k A_k[i1,j1] B_k[i2,j2]`` (row-major pairs).

Van Loan and Pitsianis (1993), "Approximation with Kronecker products": the rearrangement ``R(W)``
maps ``||W - sum_k A_k (x) B_k||_F`` to ``||R(W) - sum_k vec(A_k) vec(B_k)^T||_F``, so the best rank-r
Kronecker sum is the rank-r truncated SVD of ``R(W)`` (Eckart-Young).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorlm.decompose.linalg import check_finite, thin_svd
from tensorlm.errors import TensorLMError


@dataclass(frozen=True)
class KroneckerShape:
    """Factor shapes and rank of a Kronecker sum ``sum_{k<rank} A_k (x) B_k``.

    ``a_shape = (m1, n1)``, ``b_shape = (m2, n2)``; the dense shape is ``(m1*m2, n1*n2)``.
    """

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    rank: int

    @property
    def dense_shape(self) -> tuple[int, int]:
        return (self.a_shape[0] * self.b_shape[0], self.a_shape[1] * self.b_shape[1])

    @property
    def params(self) -> int:
        """Parameters of the factors: ``rank * (m1*n1 + m2*n2)``."""
        return self.rank * (self.a_shape[0] * self.a_shape[1] + self.b_shape[0] * self.b_shape[1])

    @property
    def max_rank(self) -> int:
        """Largest useful rank: the rank bound of ``R(W)``, ``min(m1*n1, m2*n2)``."""
        return min(self.a_shape[0] * self.a_shape[1], self.b_shape[0] * self.b_shape[1])


@dataclass
class KroneckerFactors:
    """Result of :func:`nearest_kronecker`.

    Attributes:
        a: ``(rank, m1, n1)``.
        b: ``(rank, m2, n2)``.
        singular_values: all singular values of ``R(W)``, ``(min(m1*n1, m2*n2),)``, descending.
        rel_error: ``||W - sum_k A_k (x) B_k||_F / ||W||_F`` (0 for a zero ``W``).
    """

    a: torch.Tensor
    b: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def valid_factor_shapes(shape: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every split ``((m1, n1), (m2, n2))`` of a dense ``(m, n)`` with ``m1*m2 = m`` and ``n1*n2 = n``.

    Trivial splits (``A`` or ``B`` equal to ``W`` itself, i.e. the other factor is 1 x 1) are left out.
    """
    m, n = shape
    return [
        ((m1, n1), (m // m1, n // n1))
        for m1 in _divisors(m)
        for n1 in _divisors(n)
        if (m1, n1) != (1, 1) and (m1, n1) != (m, n)
    ]


def check_factor_shapes(shape: tuple[int, int], a_shape, b_shape, name: str = "weight") -> None:
    """Raise :class:`TensorLMError` unless ``a_shape (x) b_shape`` has the dense ``shape``.

    The message lists a few valid splits (those with the smallest ``B``) so the user can pick one.
    """
    m1, n1 = a_shape
    m2, n2 = b_shape
    if min(m1, n1, m2, n2) < 1 or (m1 * m2, n1 * n2) != tuple(shape):
        valid = sorted(valid_factor_shapes(shape), key=lambda s: (s[1][0] * s[1][1], s[1]))[:8]
        listed = ", ".join(f"{a}x{b}" for a, b in valid)
        raise TensorLMError(
            f"{name} of shape (out, in) = {tuple(shape)} cannot be split as "
            f"{tuple(a_shape)} x {tuple(b_shape)} "
            f"(need m1*m2 = {shape[0]} and n1*n2 = {shape[1]}); valid splits include {listed}"
        )


def rearrange(w: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> torch.Tensor:
    """Van Loan-Pitsianis rearrangement ``R(W)``.

    Args:
        w: ``(m1*m2, n1*n2)``.
        a_shape: ``(m1, n1)``; b_shape: ``(m2, n2)``.

    Returns:
        ``(m1*n1, m2*n2)``; row ``(i1, j1)`` is ``vec`` (row-major) of the block
        ``W[i1*m2:(i1+1)*m2, j1*n2:(j1+1)*n2]``. A copy.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    # (m1, m2, n1, n2) -> (m1, n1, m2, n2)
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kronecker_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dense ``sum_k A_k (x) B_k`` for ``a: (r, m1, n1)``, ``b: (r, m2, n2)``; returns ``(m1*m2, n1*n2)``."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    # (r, m1, 1, n1, 1) * (r, 1, m2, 1, n2) summed over r -> (m1, m2, n1, n2)
    w = torch.einsum("rac,rbd->abcd", a, b)
    return w.reshape(m1 * m2, n1 * n2)


def nearest_kronecker(
    w: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int = 1, name: str = "weight"
) -> KroneckerFactors:
    """Nearest Kronecker sum of rank ``rank`` in Frobenius norm (Van Loan and Pitsianis, 1993).

    ``R(W) = U S V^T``; ``vec(A_k) = sqrt(s_k) u_k``, ``vec(B_k) = sqrt(s_k) v_k`` for the top ``rank``
    triplets; relative error ``sqrt(sum_{k>=rank} s_k^2) / ||W||_F``. The SVD runs in float64 and the
    factors come back in ``w``'s dtype. Cost: one thin SVD of an ``(m1*n1, m2*n2)`` matrix.

    Args:
        w: ``(m, n)`` in ``(out, in)`` orientation.
        a_shape: ``(m1, n1)``; b_shape: ``(m2, n2)``; rank: number of Kronecker terms.
        name: the module's name, for error messages.

    Raises:
        TensorLMError: shapes that do not divide ``w``, a rank outside ``1..min(m1*n1, m2*n2)``,
            or NaN/Inf in ``w``.
    """
    check_factor_shapes(tuple(w.shape), a_shape, b_shape, name)
    check_finite(w, name)
    shape = KroneckerShape(tuple(a_shape), tuple(b_shape), rank)
    if not 1 <= rank <= shape.max_rank:
        raise TensorLMError(
            f"{name}: Kronecker rank {rank} for {a_shape} x {b_shape} must be in 1..{shape.max_rank}"
        )
    r_w = rearrange(w.detach().to(torch.float64), a_shape, b_shape)  # (m1*n1, m2*n2)
    u, s, vh = thin_svd(r_w)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).T.reshape(rank, *a_shape)  # (r, m1, n1)
    b = (vh[:rank] * root[:, None]).reshape(rank, *b_shape)  # (r, m2, n2)
    norm = s.square().sum().sqrt()
    rel = (s[rank:].square().sum().sqrt() / norm).item() if norm > 0 else 0.0
    return KroneckerFactors(a.to(w.dtype), b.to(w.dtype), s.to(w.dtype), rel)


def choose_kronecker_shape(
    shape: tuple[int, int], ratio: float, *, weight: torch.Tensor | None = None, max_candidates: int = 12
) -> KroneckerShape:
    """Pick factor shapes and a rank whose parameter count is close to ``ratio * m * n``.

    Candidates are every valid split with the largest rank that fits the budget, kept when their
    count lies in ``[0.9, 1.01] * ratio * m * n``. With ``weight`` given, the ``max_candidates`` with
    the smallest ``B`` are decomposed and the lowest Van Loan-Pitsianis error wins; without it, the
    smallest ``B`` (then the larger count) wins.

    Args:
        shape: dense ``(m, n)``; ratio: target fraction of the dense parameters, in (0, 1).
        weight: optional ``(m, n)`` tensor to choose by error.

    Raises:
        TensorLMError: ``ratio`` outside (0, 1) or no split meets the budget.
    """
    if not 0 < ratio < 1:
        raise TensorLMError(f"Kronecker target ratio must be in (0, 1), got {ratio}")
    m, n = shape
    budget = ratio * m * n
    candidates = []
    for a_shape, b_shape in valid_factor_shapes(shape):
        unit = KroneckerShape(a_shape, b_shape, 1)
        rank = min(int(budget * 1.01 // unit.params), unit.max_rank)
        cand = KroneckerShape(a_shape, b_shape, rank)
        if rank >= 1 and 0.9 * budget <= cand.params <= 1.01 * budget:
            candidates.append(cand)
    if not candidates:
        raise TensorLMError(f"no Kronecker split of {tuple(shape)} has about {ratio:.3f} of its parameters")
    candidates.sort(key=lambda c: (c.b_shape[0] * c.b_shape[1], -c.params, c.b_shape))
    if weight is None:
        return candidates[0]
    shortlist = candidates[:max_candidates]
    errors = [nearest_kronecker(weight, c.a_shape, c.b_shape, c.rank).rel_error for c in shortlist]
    return shortlist[min(range(len(shortlist)), key=errors.__getitem__)]
