"""Budget-driven rank allocation across matrices (SVD-LLM V2's idea, generic over methods).

SVD-LLM V2 (Wang et al., arXiv 2503.12340, Sec. 3.1) gives matrices whose whitened truncation loss is
large a larger share of one compression budget instead of one ratio for all. Here every matrix is a
:class:`RankCurve`: the ranks it may take (increasing), the loss at each (non-increasing), and the
parameters one rank unit costs (``m + n`` for a low-rank ``U V``; ``m1*n1 + m2*n2`` for a Kronecker sum).

Greedy on the lower convex hulls. Each curve is reduced to the lower convex hull of its points
``(cost(r), loss(r))``; along a hull the loss saved per parameter of the next segment decreases. All
matrices start at their smallest rank; a heap then repeatedly takes the segment with the largest saving
per parameter (ties: the earlier curve) if it fits in what is left of the budget, else drops that
matrix's remaining segments and goes on with the others. The result therefore never exceeds the budget,
is deterministic, and more budget never gives a larger total loss (the decisions coincide up to the
first segment that fits only the larger budget, whose saving exceeds everything the smaller budget
could still take, since all later segments save at most as much per parameter). When every curve is
convex and all units cost the same, the greedy is optimal (it takes the largest marginal savings);
otherwise it is the classical knapsack greedy, which can leave part of the budget unused.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tensorlm.errors import TensorLMError


@dataclass(frozen=True)
class RankCurve:
    """One matrix's candidates: ``loss[i]`` at ``ranks[i]``, costing ``ranks[i] * cost_per_rank`` parameters.

    Attributes:
        name: the module's name (key of the result).
        ranks: allowed ranks, strictly increasing, ``>= 1``.
        losses: loss at each rank, finite and non-increasing (e.g. weighted squared error).
        cost_per_rank: parameters per rank unit, ``>= 1``.
    """

    name: str
    ranks: tuple[int, ...]
    losses: tuple[float, ...]
    cost_per_rank: int

    def __post_init__(self) -> None:
        if not self.ranks or len(self.ranks) != len(self.losses):
            raise TensorLMError(f"{self.name}: rank curve needs as many losses as ranks (at least one), got "
                                f"{len(self.ranks)} ranks and {len(self.losses)} losses")
        if self.ranks[0] < 1 or any(b <= a for a, b in zip(self.ranks, self.ranks[1:], strict=False)):
            raise TensorLMError(f"{self.name}: allowed ranks must be >= 1 and strictly increasing, got {self.ranks}")
        finite = all(x == x and abs(x) != float("inf") for x in self.losses)
        if not finite or any(b > a for a, b in zip(self.losses, self.losses[1:], strict=False)):
            raise TensorLMError(f"{self.name}: losses must be finite and must not rise with the rank")
        if self.cost_per_rank < 1:
            raise TensorLMError(f"{self.name}: cost per rank must be >= 1, got {self.cost_per_rank}")


@dataclass
class Allocation:
    """Result of :func:`allocate_ranks`: ``ranks[name]``, total ``cost`` (parameters) and total ``loss``."""

    ranks: dict[str, int]
    cost: int
    loss: float


def lowrank_curve(
    name: str, singular_values: torch.Tensor, shape: tuple[int, int], *, normalise: bool = True,
    min_rank: int = 1, max_rank: int | None = None,
) -> RankCurve:
    """Rank curve of a whitened truncated SVD (:func:`tensorlm.decompose.whitening.whitened_svd`).

    Loss at rank ``r`` is ``sum_{k>=r} s_k^2`` (the squared weighted error, SVD-LLM Theorem 3.2), divided by
    ``sum_k s_k^2 = ||W G^{1/2}||_F^2`` when ``normalise`` (so each matrix counts its relative error, as
    SVD-LLM V2 does); cost per rank ``m + n``.

    Args:
        name: module name; singular_values: ``(k,)`` descending; shape: ``(m, n)`` of the weight.
        min_rank: smallest rank offered (a floor, so that no matrix is cut to almost nothing).
        max_rank: largest rank offered (default ``min(m, n)``, at most ``len(singular_values)``).

    Raises:
        TensorLMError: ``min_rank`` outside ``1..max_rank``.
    """
    return tail_curve(name, singular_values, shape[0] + shape[1], normalise=normalise, min_rank=min_rank,
                      max_rank=max_rank or min(shape))


def rank_window(values: int, cost_per_rank: int, floor: float = 0.0) -> tuple[int, int]:
    """``(min_rank, dense)`` of a matrix of ``values`` weights whose factors cost ``cost_per_rank`` a rank:
    ``dense`` the smallest rank whose factors hold at least ``values`` (offered as "keep the matrix dense"),
    ``min_rank`` the rank at ``floor`` of the dense parameters (at least 1, at most ``dense - 1``)."""
    dense = -(-values // cost_per_rank)
    return min(dense - 1, max(1, int(floor * values / cost_per_rank))), dense


def tail_curve(
    name: str, singular_values: torch.Tensor, cost_per_rank: int, *, normalise: bool = True, min_rank: int = 1,
    max_rank: int | None = None,
) -> RankCurve:
    """Rank curve of any truncated-SVD fit: loss ``sum_{k>=r} s_k^2`` at rank ``r`` (relative to
    ``sum_k s_k^2`` when ``normalise``), ``cost_per_rank`` parameters a rank.

    The low-rank ``U V`` (:func:`lowrank_curve`, cost ``m + n``) and the Kronecker sum, whose rank-``r``
    error is the SVD tail of the rearrangement ``R(W)`` (Van Loan-Pitsianis; cost ``m1*n1 + m2*n2``).

    Args:
        name: module name; singular_values: ``(k,)`` descending; cost_per_rank: ``>= 1``.
        min_rank: smallest rank offered; max_rank: largest (default and at most ``len(singular_values)``).

    Raises:
        TensorLMError: ``min_rank`` outside ``1..max_rank``.
    """
    s2 = singular_values.detach().to(torch.float64).square()
    top = min(max_rank or len(s2), len(s2))
    tails = s2.flip(0).cumsum(0).flip(0)  # tails[r] = sum_{k>=r} s_k^2
    total = tails[0].item() if len(s2) else 0.0
    scale = 1.0 / total if normalise and total > 0 else 1.0
    if not 1 <= min_rank <= top:
        raise TensorLMError(f"{name}: minimum rank {min_rank} must be in 1..{top}")
    losses = [(tails[r].item() if r < len(s2) else 0.0) * scale for r in range(min_rank, top + 1)]
    # round-off can make a tail of zeros rise by an ulp; keep the curve non-increasing
    for i in range(1, len(losses)):
        losses[i] = min(losses[i], losses[i - 1])
    return RankCurve(name, tuple(range(min_rank, top + 1)), tuple(losses), cost_per_rank)


def _hull(curve: RankCurve) -> list[int]:
    """Indices of the lower convex hull of ``(ranks[i], losses[i])``, from the first to the last point."""
    out: list[int] = []
    for i, (r, loss) in enumerate(zip(curve.ranks, curve.losses, strict=True)):
        while len(out) >= 2:
            r1, l1 = curve.ranks[out[-2]], curve.losses[out[-2]]
            r2, l2 = curve.ranks[out[-1]], curve.losses[out[-1]]
            # drop the middle point when it lies strictly above the chord from out[-2] to i (collinear stay)
            if (l2 - l1) * (r - r1) > (loss - l1) * (r2 - r1):
                out.pop()
            else:
                break
        out.append(i)
    return out


def allocate_ranks(curves: Sequence[RankCurve], budget: int) -> Allocation:
    """Choose one rank per curve with total cost ``<= budget`` and small total loss (module docstring).

    Args:
        curves: one :class:`RankCurve` per matrix, distinct names.
        budget: total parameters of all factors.

    Returns:
        the chosen ranks (each one of its curve's ``ranks``), their total cost and summed loss.

    Raises:
        TensorLMError: duplicate names, or ``budget`` below the sum of the smallest-rank costs (the message
            gives that minimum).
    """
    names = [c.name for c in curves]
    if len(set(names)) != len(names):
        raise TensorLMError("rank allocation: curve names must be distinct")
    minimum = sum(c.ranks[0] * c.cost_per_rank for c in curves)
    if budget < minimum:
        raise TensorLMError(f"budget of {budget:,} parameters is below the minimum {minimum:,} "
                            f"(every one of the {len(curves)} matrices at its smallest rank)")
    hulls = [_hull(c) for c in curves]
    pos = [0] * len(curves)  # position on each hull
    left = budget - minimum
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h, c = hulls[i], curves[i]
        if pos[i] + 1 < len(h):
            a, b = h[pos[i]], h[pos[i] + 1]
            saving = (c.losses[a] - c.losses[b]) / ((c.ranks[b] - c.ranks[a]) * c.cost_per_rank)
            heapq.heappush(heap, (-saving, i))

    for i in range(len(curves)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        c, h = curves[i], hulls[i]
        step = (c.ranks[h[pos[i] + 1]] - c.ranks[h[pos[i]]]) * c.cost_per_rank
        if step <= left:
            left -= step
            pos[i] += 1
            push(i)
    chosen = [hulls[i][pos[i]] for i in range(len(curves))]
    ranks = {c.name: c.ranks[j] for c, j in zip(curves, chosen, strict=True)}
    return Allocation(ranks, budget - left, sum(c.losses[j] for c, j in zip(curves, chosen, strict=True)))
