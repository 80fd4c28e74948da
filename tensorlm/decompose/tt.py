"""Tensor-train (TT) decomposition: TT-SVD of vectors (matrix product states) and of matrices (TT-matrix).

A vector of length ``d = I_1 ... I_N`` is reshaped (row-major) to an N-way tensor and written as cores
``G_k: (r_{k-1}, I_k, r_k)``, ``r_0 = r_N = 1``, so that
``x[i_1, ..., i_N] = G_1[:, i_1, :] @ G_2[:, i_2, :] @ ... @ G_N[:, i_N, :]``.
TT-SVD (Oseledets 2011, "Tensor-Train Decomposition", Algorithm 1) finds the cores by N-1 successive
truncated SVDs of unfoldings; with a relative tolerance ``eps`` each truncation discards at most
``delta = eps / sqrt(N-1) * ||x||`` in Frobenius norm, so the whole error is at most ``eps * ||x||``.

TensorGPT (Xu, Xu, Mandic 2023) applies this to every row of an embedding table separately;
:func:`tt_svd_rows` does all rows at once with batched SVDs (no Python loop over rows).

A TT-matrix of ``W: (m, n)``, ``m = m_1 ... m_N``, ``n = n_1 ... n_N``, has cores ``(r_{k-1}, m_k, n_k, r_k)``
with ``W[(i_1..i_N), (j_1..j_N)] = prod_k G_k[:, i_k, j_k, :]`` (row-major multi-indices); it is the TT-SVD of
``W`` reshaped to ``(m_1 n_1, ..., m_N n_N)`` (Oseledets 2011, Section 4.1).

Rank policy: ranks larger than an unfolding allows (see :func:`max_ranks`) are clipped to the maximum
with a ``UserWarning`` naming both; the clipped decomposition is exact at that position.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from tensorlm.errors import TensorLMError

Ranks = int | Sequence[int] | None


def max_ranks(shape: Sequence[int]) -> list[int]:
    """Largest useful internal TT-ranks ``r_1 .. r_{N-1}`` for a tensor of ``shape``.

    ``r_k <= min(I_1 ... I_k, I_{k+1} ... I_N)`` (the sizes of the k-th unfolding); at these ranks
    TT-SVD is exact.
    """
    shape = list(shape)
    return [min(math.prod(shape[: k + 1]), math.prod(shape[k + 1:])) for k in range(len(shape) - 1)]


def tensorizations(n: int, n_modes: int, *, min_factor: int = 2) -> list[tuple[int, ...]]:
    """Every ordered way to write ``n`` as a product of ``n_modes`` factors, each ``>= min_factor``.

    Returns:
        tuples sorted most balanced first (smallest largest factor, then smallest spread, then
        lexicographically), e.g. ``tensorizations(384, 3)[0] == (6, 8, 8)``; empty if none exists.

    Raises:
        TensorLMError: ``n < 1`` or ``n_modes < 1``.
    """
    if n < 1 or n_modes < 1:
        raise TensorLMError(f"tensorizations: need n >= 1 and n_modes >= 1, got n={n}, n_modes={n_modes}")

    def split(rest: int, k: int) -> list[tuple[int, ...]]:
        if k == 1:
            return [(rest,)] if rest >= min_factor else []
        out = []
        small = [f for f in range(1, math.isqrt(rest) + 1) if rest % f == 0]
        for f in sorted({*small, *(rest // f for f in small)}):
            if f >= min_factor:
                out += [(f, *tail) for tail in split(rest // f, k - 1)]
        return out

    return sorted(split(n, n_modes), key=lambda s: (max(s), max(s) - min(s), s))


def suggest_shape(n: int, n_modes: int = 3) -> tuple[int, ...]:
    """The most balanced tensorisation of ``n`` into ``n_modes`` factors (768 -> (8, 8, 12)).

    Raises:
        TensorLMError: ``n`` has no such factorisation (use :func:`padded_shape`).
    """
    options = tensorizations(n, n_modes)
    if not options:
        raise TensorLMError(
            f"suggest_shape: {n} cannot be written as a product of {n_modes} factors >= 2; "
            "use padded_shape() or fewer modes"
        )
    return options[0]


def padded_shape(n: int, n_modes: int = 3, *, max_pad: float = 0.01) -> tuple[tuple[int, ...], int]:
    """A balanced tensorisation of some ``n' >= n`` for sizes that factor badly (GPT-2's V = 50257 = 29 x 1733).

    Tries every ``n'`` in ``[n, n * (1 + max_pad)]`` and keeps the one whose most balanced factorisation
    has the smallest largest factor (ties: the smallest ``n'``). Layers that use a padded shape pad with
    zero rows/columns that no valid index reaches.

    Returns:
        ``(shape, n_padded)`` with ``prod(shape) == n_padded >= n``.

    Raises:
        TensorLMError: ``n < 1``, ``n_modes < 1`` or ``max_pad < 0``.
    """
    if max_pad < 0 or n < 1 or n_modes < 1:
        raise TensorLMError(
            f"padded_shape: need n >= 1, n_modes >= 1 and max_pad >= 0, got n={n}, n_modes={n_modes}, "
            f"max_pad={max_pad}"
        )
    best: tuple[int, ...] | None = None
    candidate = n
    while candidate <= n * (1 + max_pad) or best is None:  # 2**(N-1) * m factors for some m: this ends
        options = tensorizations(candidate, n_modes)
        if options and (best is None or max(options[0]) < max(best)):
            best = options[0]
        candidate += 1
    return best, math.prod(best)


def default_shape(n: int, n_modes: int) -> tuple[int, ...]:
    """Most balanced tensorisation of ``n``, padded when it factors badly (a prime, 50257)."""
    options = tensorizations(n, n_modes)
    if options and max(options[0]) <= 4 * round(n ** (1 / n_modes)):
        return options[0]
    return padded_shape(n, n_modes)[0]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run a batch of tiny CPU SVDs on one thread, restoring the thread count after.

    LAPACK threads every small SVD separately; for 30,522 SVDs of 8 x 48 matrices on a shared 2-core
    machine, 2 threads took 178 s against 14 s on one thread (measured, load average ~10).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_eps(eps: float | None) -> None:
    if eps is not None and not 0.0 < eps < 1.0:
        raise TensorLMError(f"TT-SVD: relative tolerance eps must lie in (0, 1), got {eps}")


def rank_caps(shape: Sequence[int], ranks: Ranks) -> list[int]:
    """Fixed ranks as a list of N-1 caps, clipped to :func:`max_ranks` with a warning."""
    bound = max_ranks(shape)
    if ranks is None:
        return bound
    caps = [int(ranks)] * len(bound) if isinstance(ranks, int) else [int(r) for r in ranks]
    if len(caps) != len(bound) or any(r < 1 for r in caps):
        raise TensorLMError(
            f"TT-SVD: ranks {ranks!r} for shape {tuple(shape)}: give one int >= 1 or {len(bound)} ints >= 1"
        )
    if any(r > b for r, b in zip(caps, bound, strict=True)):
        warnings.warn(
            f"TT-SVD: ranks {caps} exceed the maximum {bound} for shape {tuple(shape)}; clipped",
            stacklevel=3,
        )
    return [min(r, b) for r, b in zip(caps, bound, strict=True)]


def _check_rows(x: torch.Tensor, shape: Sequence[int], eps: float | None) -> list[int]:
    """The checked mode sizes of :func:`tt_svd_rows` (its Raises, but for the ranks)."""
    if x.dim() != 2:
        raise TensorLMError(f"tt_svd_rows: x must be 2-D (rows, d), got shape {tuple(x.shape)}")
    shape = [int(s) for s in shape]
    if not shape or any(s < 1 for s in shape) or math.prod(shape) != x.shape[1]:
        raise TensorLMError(
            f"TT-SVD: tensorisation {tuple(shape)} has product {math.prod(shape)}, not d={x.shape[1]}; "
            f"choose factors of {x.shape[1]}, e.g. {tensorizations(x.shape[1], 3)[:3]}"
        )
    _check_eps(eps)
    if not torch.isfinite(x).all():
        raise TensorLMError(f"TT-SVD: input {tuple(x.shape)} holds NaN or Inf")
    return shape


def _kept_ranks(s: torch.Tensor, cap: int, delta2: torch.Tensor | None) -> torch.Tensor:
    """Each row's rank at one TT-SVD step: ``cap`` (clipped to the singular values there are), lowered to
    the smallest rank whose discarded energy ``sum_{i >= rank} s_i^2`` is at most the row's ``delta2``.

    ``s``: ``(B, q)`` singular values per row, descending; returns ``(B,)`` int64.
    """
    n_rows, q = s.shape
    keep = torch.full((n_rows,), min(cap, q), dtype=torch.int64)
    if delta2 is not None:
        tail = s.pow(2).flip(1).cumsum(1).flip(1)  # (B, q): tail[j] = sum_{i >= j} s_i^2
        ok = torch.cat([tail[:, 1:], s.new_zeros(n_rows, 1)], dim=1) <= delta2[:, None]  # rank j+1 suffices
        keep = torch.minimum(keep, q + 1 - ok.sum(1))
    return keep


def tt_svd_rows(
    x: torch.Tensor, shape: Sequence[int], *, ranks: Ranks = None, eps: float | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """TT-SVD of every row of ``x`` at once (one MPS per row), with batched SVDs.

    Args:
        x: ``(B, d)``, ``d = prod(shape)``; each row is reshaped (row-major) to ``shape``.
        shape: mode sizes ``(I_1, ..., I_N)``.
        ranks: fixed internal ranks (one int for all, or ``N-1`` ints); caps when ``eps`` is also given;
            ``None`` means the full ranks :func:`max_ranks` (exact). Too large ranks are clipped with a warning.
        eps: relative tolerance in (0, 1): each row gets its own smallest ranks such that
            ``||row - TT(row)|| <= eps * ||row||`` (Oseledets 2011, Alg. 1, ``delta = eps/sqrt(N-1) ||row||``).

    Returns:
        ``cores``: list of N tensors ``(B, r_{k-1}, I_k, r_k)`` in ``x``'s dtype, where ``r_k`` is the maximum
        over rows; a row of smaller rank is padded with zeros (its reconstruction is unchanged), and
        ``row_ranks``: ``(B, N+1)`` int64, each row's own ranks ``r_0 .. r_N`` (``r_0 = r_N = 1``; at least 1).
        Computed in float64.

    Raises:
        TensorLMError: ``x`` not 2-D, ``prod(shape) != d``, bad ranks, ``eps`` outside (0, 1), NaN/Inf in ``x``.
    """
    shape = _check_rows(x, shape, eps)
    caps = rank_caps(shape, ranks)
    n_rows, n_modes = x.shape[0], len(shape)
    work = x.detach().to(torch.float64)
    delta2 = None
    if eps is not None:
        delta2 = (eps**2 / max(n_modes - 1, 1)) * work.pow(2).sum(dim=1)  # (B,)
    row_ranks = torch.ones(n_rows, n_modes + 1, dtype=torch.int64)
    cores = []
    r_prev = 1
    rest = work.reshape(n_rows, 1, -1)  # (B, r_0, d)
    for k in range(n_modes - 1):
        unfolding = rest.reshape(n_rows, r_prev * shape[k], -1)  # (B, r_{k-1} I_k, I_{k+1}...I_N)
        with _one_thread():
            u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)  # (B, p, q), (B, q), (B, q, n)
        keep = _kept_ranks(s, caps[k], delta2)
        r = int(keep.max())
        mask = (torch.arange(r) < keep[:, None]).to(work.dtype)  # (B, r)
        cores.append((u[:, :, :r] * mask[:, None, :]).reshape(n_rows, r_prev, shape[k], r))
        rest = (s[:, :r] * mask)[:, :, None] * vh[:, :r, :]  # (B, r, I_{k+1}...I_N)
        row_ranks[:, k + 1] = keep
        r_prev = r
    cores.append(rest.reshape(n_rows, r_prev, shape[-1], 1))
    return [c.to(x.dtype) for c in cores], row_ranks


def tt_svd(
    x: torch.Tensor, shape: Sequence[int] | None = None, *, ranks: Ranks = None, eps: float | None = None
) -> list[torch.Tensor]:
    """TT-SVD of one tensor (Oseledets 2011, Alg. 1).

    Args:
        x: any tensor; reshaped (row-major) to ``shape`` (default: ``x.shape``).
        shape, ranks, eps: as in :func:`tt_svd_rows`.

    Returns:
        cores ``G_k: (r_{k-1}, I_k, r_k)``, ``r_0 = r_N = 1``.

    Raises:
        TensorLMError: as :func:`tt_svd_rows`.
    """
    shape = list(x.shape) if shape is None else list(shape)
    cores, _ = tt_svd_rows(x.reshape(1, -1), shape, ranks=ranks, eps=eps)
    return [c[0] for c in cores]


def tt_rows_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract batched MPS cores ``(B, r_{k-1}, I_k, r_k)`` to the rows ``(B, I_1 ... I_N)``."""
    n_rows = cores[0].shape[0]
    acc = cores[0].reshape(n_rows, -1, cores[0].shape[-1])  # (B, I_1, r_1)
    for core in cores[1:]:
        r, size, r_next = core.shape[1:]
        acc = torch.bmm(acc, core.reshape(n_rows, r, size * r_next))  # (B, P, I_k r_k)
        acc = acc.reshape(n_rows, -1, r_next)  # (B, P I_k, r_k)
    return acc.reshape(n_rows, -1)


def tt_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores ``(r_{k-1}, I_k, r_k)`` to the full tensor ``(I_1, ..., I_N)``."""
    shape = [c.shape[1] for c in cores]
    return tt_rows_to_full([c[None] for c in cores]).reshape(shape)


def tt_matrix_svd(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    *,
    ranks: Ranks = None,
    eps: float | None = None,
) -> list[torch.Tensor]:
    """TT-matrix decomposition of ``weight: (m, n)`` (Oseledets 2011, Sec. 4.1; Novikov et al. 2015).

    Args:
        weight: ``(m, n)`` with ``m = prod(out_shape)``, ``n = prod(in_shape)`` (tensorlm orientation: out, in).
        out_shape, in_shape: ``(m_1..m_N)`` and ``(n_1..n_N)``, the same length N.
        ranks, eps: as in :func:`tt_svd_rows`, over the modes ``m_k n_k``.

    Returns:
        cores ``(r_{k-1}, m_k, n_k, r_k)``.

    Raises:
        TensorLMError: shapes whose products differ from ``weight``'s, different lengths, bad ranks or eps.
    """
    out_shape, in_shape = [int(s) for s in out_shape], [int(s) for s in in_shape]
    if weight.dim() != 2 or len(out_shape) != len(in_shape) or (
        math.prod(out_shape), math.prod(in_shape)) != tuple(weight.shape):
        raise TensorLMError(
            f"tt_matrix_svd: weight {tuple(weight.shape)} does not match out_shape {tuple(out_shape)} x "
            f"in_shape {tuple(in_shape)}; need equal lengths and products (m, n)"
        )
    n_modes = len(out_shape)
    order = [i for k in range(n_modes) for i in (k, n_modes + k)]  # (m_1, n_1, m_2, n_2, ...)
    merged = weight.reshape(*out_shape, *in_shape).permute(order)  # (m_1, n_1, ..., m_N, n_N)
    cores = tt_svd(merged, [m * n for m, n in zip(out_shape, in_shape, strict=True)], ranks=ranks, eps=eps)
    return [c.reshape(c.shape[0], m, n, c.shape[-1]) for c, m, n in zip(cores, out_shape, in_shape, strict=True)]


def tt_matrix_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT-matrix cores ``(r_{k-1}, m_k, n_k, r_k)`` to ``W: (prod m_k, prod n_k)``."""
    out_shape = [c.shape[1] for c in cores]
    in_shape = [c.shape[2] for c in cores]
    n_modes = len(cores)
    full = tt_to_full([c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores])  # (m_1 n_1, ..., m_N n_N)
    full = full.reshape([s for m, n in zip(out_shape, in_shape, strict=True) for s in (m, n)])
    order = list(range(0, 2 * n_modes, 2)) + list(range(1, 2 * n_modes, 2))  # back to (m_1..m_N, n_1..n_N)
    return full.permute(order).reshape(math.prod(out_shape), math.prod(in_shape))


def tt_parameter_count(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Entries of the cores of one MPS: ``sum_k r_{k-1} I_k r_k`` with ``ranks = (r_1..r_{N-1})``."""
    full = [1, *ranks, 1]
    return sum(full[k] * shape[k] * full[k + 1] for k in range(len(shape)))


# --- ragged TT-ranks: one rank class per row under a total parameter budget -------------------------------


def rank_ladder(shape: Sequence[int]) -> list[list[int]]:
    """Uniform rank classes of an MPS of ``shape``: class ``r`` has internal ranks ``min(r, cap_k)``.

    ``r = 1 .. max(max_ranks(shape))``; the costs :func:`tt_parameter_count` strictly increase along the
    ladder and its last class is :func:`max_ranks` (TT-SVD exact). E.g. ``(8, 8, 9)``: ``[1, 1], ..., [8, 8],
    [8, 9]``, costing 25 .. 721 values per row.
    """
    caps = max_ranks(shape)
    return [[min(r, cap) for cap in caps] for r in range(1, max(caps, default=1) + 1)]


def tt_row_errors(x: torch.Tensor, shape: Sequence[int], classes: Sequence[Sequence[int]],
                  *, chunk: int = 8192) -> torch.Tensor:
    """Squared TT-SVD error of every row of ``x`` at every rank class: ``||x_v - TT_c(x_v)||^2``.

    TT-SVD's error is exactly the sum of the energies each step discards, ``sum_k sum_{i > r_k} s_{k,i}^2``
    (the steps' residuals are orthogonal; Oseledets 2011, Thm. 2.2 holds with equality), and step ``k``'s
    singular values depend only on the ranks before it. So each distinct rank prefix is decomposed once and
    shared by the classes that start with it, and nothing is reconstructed: for :func:`rank_ladder` of
    ``(8, 8, 10)``, 9 batched SVDs instead of 20 and 10 reconstructions.

    Args:
        x: ``(B, d)``, ``d = prod(shape)``; shape: ``(I_1, ..., I_N)``; classes: ``C`` lists of ``N-1``
            internal ranks (e.g. :func:`rank_ladder`); chunk: rows decomposed at a time (bounds memory).

    Returns:
        ``(B, C)`` float64, equal (to rounding) to reconstructing each row by :func:`tt_svd_rows`.

    Raises:
        TensorLMError: as :func:`tt_svd_rows`.
    """
    shape = _check_rows(x, shape, None)
    caps = [rank_caps(shape, list(ranks)) for ranks in classes]
    work = x.detach().to(torch.float64)
    out = work.new_zeros(work.shape[0], len(classes))  # (B, C)
    for start in range(0, work.shape[0], chunk):
        rows = work[start:start + chunk]  # (b, d)
        steps: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # rank prefix -> (s, vh) there
        for c, ranks in enumerate(caps):
            rest, r_prev = rows.reshape(rows.shape[0], 1, -1), 1  # (b, r_0, d)
            for k, cap in enumerate(ranks):
                prefix = tuple(ranks[:k])
                if prefix not in steps:
                    unfolding = rest.reshape(rows.shape[0], r_prev * shape[k], -1)  # (b, r_{k-1} I_k, rest)
                    with _one_thread():
                        _, s, vh = torch.linalg.svd(unfolding, full_matrices=False)  # (b, q), (b, q, n)
                    steps[prefix] = (s, vh)
                s, vh = steps[prefix]
                r_prev = min(cap, s.shape[1])
                out[start:start + chunk, c] += s[:, r_prev:].pow(2).sum(dim=1)  # energy step k discards
                rest = s[:, :r_prev, None] * vh[:, :r_prev, :]  # (b, r_k, I_{k+1}...I_N)
    return out


def _lagrangian_choice(errors: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """Each row's class minimising ``errors[v, c] + lam * costs[c]`` for the smallest ``lam`` (bisection)
    whose total cost is within ``budget``; ties go to the cheaper class. ``errors: (B, C)``, ``costs: (C,)``
    float64, increasing; returns ``(B,)`` int64. Points on every row's lower convex hull (Everett 1963)."""
    def pick(lam: float) -> torch.Tensor:
        return torch.argmin(errors + lam * costs, dim=1)  # the first minimum: the cheapest class

    if costs[pick(0.0)].sum() <= budget:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    for _ in range(2000):  # at lam > (error range) / (smallest cost step) every row takes class 0
        if costs[pick(hi)].sum() <= budget:
            break
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if costs[pick(mid)].sum() <= budget else (mid, hi)
    return pick(hi)


def _fill(errors: torch.Tensor, costs: torch.Tensor, choice: torch.Tensor, left: int) -> torch.Tensor:
    """Spend ``left`` more parameters greedily: upgrades by weighted error reduction per parameter, largest
    first, each row at most once a round, until no upgrade fits. Shapes as :func:`_lagrangian_choice`."""
    choice = choice.clone()
    while True:
        step = costs[None, :] - costs[choice][:, None]  # (B, C) extra parameters of each upgrade
        gain = errors.gather(1, choice[:, None]) - errors  # (B, C) error removed
        ok = (step > 0) & (step <= left) & (gain > 0)
        if not ok.any():
            return choice
        ratio = torch.where(ok, gain / step.clamp_min(1), torch.full_like(gain, -1.0))
        best_ratio, best = ratio.max(dim=1)  # (B,), (B,)
        rows = torch.nonzero(best_ratio > 0).squeeze(1)
        rows = rows[torch.argsort(best_ratio[rows], descending=True)]
        spent = 0
        for row, target, extra in zip(rows.tolist(), best[rows].tolist(), step[rows, best[rows]].tolist(),
                                      strict=True):
            if spent + extra <= left:
                choice[row], spent = target, spent + int(extra)
        if spent == 0:
            return choice
        left -= spent


def allocate_row_classes(errors: torch.Tensor, costs: Sequence[int], budget: int,
                         reference: int | None = None) -> torch.Tensor:
    """Rank class per row minimising ``sum_v errors[v, class_v]`` with ``sum_v costs[class_v] <= budget``.

    Lagrangian relaxation (Everett 1963: every row on its lower convex hull, one multiplier found by
    bisection), then a greedy fill of what is left by error reduction per parameter. With ``reference``,
    the uniform assignment to that class is kept instead if it fits and has the lower total error, so the
    result is never worse than the uniform plan it replaces.

    Args:
        errors: ``(B, C)`` (weighted) squared errors, e.g. ``f_v * tt_row_errors(...)``; costs: ``C``
            parameters per row, strictly increasing; budget: total parameters; reference: a class index.

    Returns:
        ``(B,)`` int64 class indices; ``sum(costs[class]) <= budget``.

    Raises:
        TensorLMError: costs not strictly increasing or of the wrong length, NaN/Inf errors, or a budget
            below every row at the cheapest class (``B * costs[0]``).
    """
    cost = torch.as_tensor(list(costs), dtype=torch.float64)  # (C,)
    errors = errors.detach().to(torch.float64)
    n_rows = errors.shape[0]
    if errors.dim() != 2 or cost.shape[0] != errors.shape[1] or (cost.diff() <= 0).any():
        raise TensorLMError(f"allocate_row_classes: errors {tuple(errors.shape)} need (rows, C) with C = "
                            f"{cost.shape[0]} strictly increasing costs, got costs {list(costs)}")
    if not torch.isfinite(errors).all():
        raise TensorLMError(f"allocate_row_classes: errors {tuple(errors.shape)} hold NaN or Inf")
    if n_rows * cost[0] > budget:
        raise TensorLMError(f"allocate_row_classes: budget {budget} is below {n_rows} rows at the cheapest class "
                            f"({int(cost[0])} each, {n_rows * int(cost[0])} in all)")
    choice = _lagrangian_choice(errors, cost, budget)
    choice = _fill(errors, cost, choice, budget - int(cost[choice].sum()))
    if reference is not None and n_rows * cost[reference] <= budget:
        uniform = torch.full_like(choice, reference)
        if errors[:, reference].sum() < errors.gather(1, choice[:, None]).sum():
            choice = uniform
    return choice


def class_slots(row_class: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, list[int]]:
    """Each row's position inside its rank class (rows of a class in increasing order): ``slot (B,)`` int64,
    and the rows per class, ``sizes`` (``C`` ints). ``row_class``: ``(B,)`` int64 in ``[0, C)``."""
    order = torch.argsort(row_class, stable=True)  # (B,) rows grouped by class, increasing within a class
    sizes = torch.bincount(row_class, minlength=n_classes)  # (C,)
    starts = torch.cumsum(sizes, 0) - sizes  # (C,) first position of each class in ``order``
    slot = torch.empty_like(row_class)
    slot[order] = torch.arange(row_class.numel(), device=row_class.device) - starts[row_class[order]]
    return slot, sizes.tolist()


def tt_svd_ragged(x: torch.Tensor, shape: Sequence[int], classes: Sequence[Sequence[int]],
                  row_class: torch.Tensor) -> torch.Tensor:
    """TT-SVD of every row at its own rank class, the cores of all rows in one flat vector.

    Layout: one block per class ``c`` (ranks ``classes[c]``, ``cost_c = sum_k r_{k-1} I_k r_k`` values per row),
    in class order; block ``c`` is ``(sizes[c], cost_c)`` row-major, its rows the class's rows in increasing
    order (:func:`class_slots`), each row its cores ``G_1 .. G_N`` (``(r_{k-1}, I_k, r_k)``, row-major) back to back.

    Args:
        x: ``(B, d)``; shape: ``(I_1..I_N)``; classes: ``C`` rank lists; row_class: ``(B,)`` int64 in ``[0, C)``.

    Returns:
        ``values`` ``(sum_c sizes[c] cost_c,)`` float64.

    Raises:
        TensorLMError: as :func:`tt_svd_rows`; ``row_class`` not ``(B,)`` in range.
    """
    shape = _check_rows(x, shape, None)
    if row_class.shape != (x.shape[0],) or (row_class.numel() and not 0 <= int(row_class.min()) <= int(
            row_class.max()) < len(classes)):
        raise TensorLMError(f"tt_svd_ragged: row_class {tuple(row_class.shape)} must be ({x.shape[0]},) with "
                            f"values in [0, {len(classes)})")
    work = x.detach().to(torch.float64)
    blocks = []
    for c, ranks in enumerate(classes):
        rows = torch.nonzero(row_class == c).squeeze(1)  # (n_c,) increasing
        if rows.numel():
            cores, _ = tt_svd_rows(work[rows], shape, ranks=list(ranks))
            blocks.append(torch.cat([core.reshape(rows.numel(), -1) for core in cores], dim=1).reshape(-1))
    return torch.cat(blocks) if blocks else work.new_zeros(0)


def tt_flat_rows_to_full(flat: torch.Tensor, shape: Sequence[int], ranks: Sequence[int]) -> torch.Tensor:
    """Rows ``(n, d)`` from the flat cores ``(n, sum_k r_{k-1} I_k r_k)`` of one rank class (layout of
    :func:`tt_svd_ragged`)."""
    full = [1, *ranks, 1]
    sizes = [full[k] * shape[k] * full[k + 1] for k in range(len(shape))]
    cores = [part.reshape(-1, full[k], shape[k], full[k + 1])
             for k, part in enumerate(torch.split(flat, sizes, dim=1))]  # each (n, r_{k-1}, I_k, r_k)
    return tt_rows_to_full(cores)
