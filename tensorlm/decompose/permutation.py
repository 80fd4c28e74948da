"""Row and column permutations that make a weight closer to a Kronecker sum (TQCompressor).

Abronin et al. (2024), "TQCompressor: improving tensor decomposition methods in neural networks via
permutations", approximate ``W[p][:, q] ~ sum_k A_k (x) B_k`` instead of ``W`` itself: the factors and
the parameter count do not change, ``p`` and ``q`` are stored as integer buffers. Their public code has
no search for ``p`` and ``q``; this module is ours, for ``B`` with 1, 2 or 4 rows and columns (the
shapes of KnGPT2 and the built-in recipes, and TQCompressor's GPT-2 MLP shapes ``B (4, 2)``, ``B (2, 4)``).

The objective. Write ``K = W[p][:, q]`` as ``(m1, m2, n1, n2)`` and let ``G`` be the ``(m2*n2, m2*n2)``
Gram matrix of the rearrangement ``R(K)`` (Van Loan-Pitsianis). The best rank-``r`` Kronecker sum
captures ``E(p, q) = sum of the top r eigenvalues of G`` and leaves
``rel_error = sqrt(1 - E / ||W||_F^2)``. Equivalently ``E = max over projectors P of rank r of
trace(P G)`` where ``P = V V^T`` projects onto the span of ``vec(B_k)``.

The search (alternating maximisation with restarts):

1. *Fixed subspace, exact structure of the pairs.* With ``m2 = 2`` every block row of ``K`` is a pair
   of rows of ``W`` (first, second), and for a fixed ``P`` the captured energy is a sum over pairs:
   ``w(u -> v) = q_0(u) + q_1(v) + 2 C[u, v]`` with ``q_a(u) = sum_j1 u_j1^T P[a,:,a,:] u_j1`` and
   ``C = X P[0,:,1,:] K^T`` (one ``(m, n) @ (n, m)`` matmul; ``X`` is ``K`` seen as ``(m, n1, n2)``).
   The rows' best pairing is therefore a maximum-weight perfect matching on the complete graph with
   weights ``max(w(u -> v), w(v -> u))``; unlike "fix A and B, then assign rows", ``A`` is refitted
   freely, so the identity is not a fixed point. Columns are the same problem on ``K^T``.
2. *Matching.* A cold matching takes the maximum-weight cycle cover (``linear_sum_assignment`` on the
   symmetric weights, diagonal forbidden), keeps the better alternate edges of every cycle (odd cycles
   leave one vertex, paired greedily), then improves by 2-opt: for all pairs of pairs at once (an
   ``(m/2, m/2)`` gain table), re-pair ``{a,b},{c,d}`` as ``{a,c},{b,d}`` or ``{a,d},{b,c}``, applying
   the best disjoint improvements until none is left. A warm matching runs 2-opt from the current
   pairs. On 120-vertex tests it reached the exact optimum of Edmonds' blossom algorithm.
2b. *Groups of 4* (``m2 = 4``; columns alike). A block row ``(u_0, u_1, u_2, u_3)`` captures
   ``sum_a q_a(u_a) + 2 sum_{a<c} C_ac[u_a, u_c]`` with ``q_a`` as above for ``P[a,:,a,:]`` and
   ``C_ac = X P[a,:,c,:] K^T`` (six matmuls). Cut the 4 positions into two pairs, e.g. ``(0, 1) + (2, 3)``:
   the block row holding pair ``s = (s_0, s_1)`` at ``(0, 1)`` and pair ``t = (t_0, t_1)`` at ``(2, 3)``
   captures exactly ``W(s -> t) = e_01(s) + e_23(t) + 2 (C_02[s_0, t_0] + C_03[s_0, t_1] + C_12[s_1, t_0]
   + C_13[s_1, t_1])`` where ``e_01(s) = q_0(s_0) + q_1(s_1) + 2 C_01[s_0, s_1]`` and
   ``e_23(t) = q_2(t_0) + q_3(t_1) + 2 C_23[t_0, t_1]`` are the pairs' own energies at those positions. For
   fixed pairs, the best grouping is thus again a maximum-weight matching, of the pairs, with weights
   ``max(W(s -> t), W(t -> s))``. Warm: for each of the three cuts ``(0,1)+(2,3)``, ``(0,2)+(1,3)``,
   ``(0,3)+(1,2)``, split the current block rows into their two halves and re-match them by 2-opt (never
   lowers the energy), until nothing changes. Cold: pair the rows with the weights of positions ``(0, 1)``,
   match those pairs as above, run the warm passes, and keep this or the warm result, whichever captures
   more. Unlike pairs, cold building keeps paying after the first step of a cold round (planted
   ``B (4, 2)`` rank 1 at 32 x 16, both sides scrambled, 40 rounds: seeds 0-14 recover 6 times instead of
   once), so groups of 4 build cold at every step of a cold round.
3. *Descent.* Alternate: match rows for ``P``, refit ``P`` (top-``r`` eigenvectors of ``G``), match
   columns, refit ``P``, until ``E`` stops growing. Every step is an ascent of ``E`` (2-opt never
   lowers the matching, refitting ``P`` never lowers ``trace(P G)``), so a descent from the identity
   never ends worse than plain Van Loan-Pitsianis.
4. *Rounds.* Round 0 descends warm from the identity. Every later round descends cold from a start
   subspace: the coordinate subspaces holding ``e_0`` first (for ``B (2, 1)``, ``b = (1, 0)`` is "keep
   the stronger row of every pair", i.e. row pruning; for ``B (2, 2)`` rank 2: keep the first row,
   the first column or the diagonal of every 2 x 2 block), then random (Haar) subspaces. The best
   ``(p, q)`` is kept; the search stops at the budget, at ``max_rounds``, or on an exact fit.

What paid on GPT-2's attention matrices (``benchmarks/permutation_gain.py``): the pair matching from the
identity alone removes most of the error (e.g. 0.706 -> 0.516 for layer 0's Q at ``B (2, 1)``); cold
restarts add up to about 1% more. Kicks of the best solution (shuffling a tenth of its pairs, then a
warm descent) never beat it in 400 tries on four matrices at ``B (2, 1)`` and were dropped.

Cost per descent step on an ``(m, n)`` weight: one ``(m, n) @ (n, m)`` matmul per searched side (none
when ``B`` has one column, or one row for the column side: the weights then come from ``W W^T``
computed once), one
``m x m`` assignment (``O(m^3)``, cold steps only) and 2-opt sweeps of ``O(m^2)`` each. On GPT-2's
768 x 768 attention matrices a cold descent takes about 1 s for ``B (2, 1)`` and 2-4 s for ``B (2, 2)``
on one core. Groups of 4 take six matmuls per step and, in cold rounds, two assignments (``m`` rows, then
``m/2`` pairs); on GPT-2's ``c_attn`` weights seen as ``(2304, 768)``, ``B (4, 2)`` rank 4, a 5 s budget on
one thread stays inside round 0 and takes the error from 0.703-0.705 to 0.483, 0.428, 0.656 and 0.583
(layers 0, 1, 10, 11).

Determinism: the result is a function of ``(w, shapes, rank, seed)`` and of the number of rounds run.
With ``max_rounds`` binding (and a generous ``time_budget_s``) it is reproducible; with the time
budget binding, a slower machine runs fewer rounds.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from tensorlm.decompose.kronecker import KroneckerFactors, KroneckerShape, check_factor_shapes, nearest_kronecker
from tensorlm.decompose.linalg import check_finite
from tensorlm.errors import TensorLMError

SEARCHED_B_SIDES = (1, 2, 4)  # B sides (rows or columns) the search can permute
_MAX_STEPS = 100  # descent steps per round (a descent usually stops after 3-10)
_TOL = 1e-5  # a descent stops when a step adds less than this share of ||W||_F^2


@dataclass
class PermutationResult:
    """Result of :func:`search_permutations`.

    Attributes:
        row_perm: ``(m,)`` int64, ``p``; col_perm: ``(n,)`` int64, ``q``; ``K[i, j] = W[p[i], q[j]]``.
        factors: nearest Kronecker sum of ``W[p][:, q]`` (Van Loan-Pitsianis), in ``w``'s dtype.
        history: best relative error after each round (round 0: descent from the identity); non-increasing.
        rel_error: ``||W[p][:, q] - sum_k A_k (x) B_k||_F / ||W||_F``.
        baseline_error: the same for the identity permutations (plain Van Loan-Pitsianis).
        seconds: wall time of the search.
    """

    row_perm: torch.Tensor
    col_perm: torch.Tensor
    factors: KroneckerFactors
    history: list[float]
    rel_error: float
    baseline_error: float
    seconds: float


@dataclass
class _Side:
    """One searched side (rows, or columns seen as the rows of ``K^T``)."""

    transpose: bool
    gram: np.ndarray | None = None  # ``W W^T`` (or ``W^T W``), W's own order, when B is 1 wide on the other side


def _gram(k: np.ndarray, dims: tuple[int, int, int, int]) -> np.ndarray:
    """``G = R(K)^T R(K)``: ``(m2*n2, m2*n2)`` for ``k: (m1*m2, n1*n2)``."""
    m1, m2, n1, n2 = dims
    k4 = k.reshape(m1, m2, n1, n2)
    return np.einsum("aibj,akbl->ijkl", k4, k4, optimize=True).reshape(m2 * n2, m2 * n2)


def _projector(g: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """Projector onto the top-``rank`` eigenvectors of ``g`` and the energy they capture."""
    vals, vecs = np.linalg.eigh(g)  # ascending
    top = vecs[:, ::-1][:, :rank]  # (d, r)
    return top @ top.T, float(vals[::-1][:rank].sum())


def _matmul_t(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y.T`` in float32 through torch (torch's thread setting), returned as float64."""
    return (torch.from_numpy(x).float() @ torch.from_numpy(y).float().T).double().numpy()


def _pair_weights(k: np.ndarray | None, p4: np.ndarray, n_dims: tuple[int, int], cached: np.ndarray | None):
    """Ordered pair weights ``w(u -> v)`` of the rows of ``k: (m, n1*n2)`` for ``p4: (2, n2, 2, n2)``.

    Returns ``(m, m)``: the energy in subspace ``P`` of the block row ``(u first, v second)``.
    ``cached``: ``k k^T`` when ``n2 == 1`` (every term is then a multiple of it and ``k`` is not read).
    """
    n1, n2 = n_dims
    if cached is not None:  # n2 == 1: P[a, 0, b, 0] are scalars
        norms = np.diag(cached)
        return p4[0, 0, 0, 0] * norms[:, None] + p4[1, 0, 1, 0] * norms[None, :] + 2 * p4[0, 0, 1, 0] * cached
    m = k.shape[0]
    x = k.reshape(m, n1, n2)
    q0 = ((x @ p4[0, :, 0, :]) * x).sum(axis=(1, 2))  # (m,)
    q1 = ((x @ p4[1, :, 1, :]) * x).sum(axis=(1, 2))
    cross = _matmul_t(np.ascontiguousarray((x @ p4[0, :, 1, :]).reshape(m, -1)), k)  # (m, m)
    return q0[:, None] + q1[None, :] + 2 * cross


def _ordered_pairs(wo: np.ndarray, cold: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best pairing for directed weights ``wo[u, v]`` (u first, v second), each pair in its better order.

    The pairing maximises ``max(wo, wo.T)`` summed over pairs: a cycle cover + 2-opt when ``cold``,
    else 2-opt from the current pairs ``(0, 1), (2, 3), ...``. Returns ``(first, second)``, ``(N/2,)`` each.
    """
    ws = np.maximum(wo, wo.T)
    if cold:
        a, b = _cycle_cover_matching(ws)
    else:
        a, b = np.arange(0, len(wo), 2), np.arange(1, len(wo), 2)
    a, b = _two_opt(ws, a, b)
    flip = wo[a, b] < wo[b, a]
    return np.where(flip, b, a), np.where(flip, a, b)


def _cycle_cover_matching(ws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A perfect matching from the maximum-weight cycle cover of symmetric ``ws: (m, m)``, ``m`` even."""
    m = ws.shape[0]
    cost = ws.copy()
    np.fill_diagonal(cost, ws.min() - 1.0 - np.abs(ws).max() * m)
    _, succ = linear_sum_assignment(cost, maximize=True)
    seen = np.zeros(m, dtype=bool)
    first, second, left = [], [], []
    for start in range(m):
        if seen[start]:
            continue
        cycle = [start]
        seen[start] = True
        nxt = succ[start]
        while nxt != start:
            cycle.append(nxt)
            seen[nxt] = True
            nxt = succ[nxt]
        cycle = np.array(cycle)
        odd = len(cycle) % 2
        options = []
        for shift in range(len(cycle) if odd else 2):
            rolled = np.roll(cycle, -shift)
            rest = rolled[odd:]
            options.append((ws[rest[0::2], rest[1::2]].sum(), shift))
        shift = max(options)[1]
        rolled = np.roll(cycle, -shift)
        rest = rolled[odd:]
        first.extend(rest[0::2])
        second.extend(rest[1::2])
        if odd:
            left.append(rolled[0])
    left = list(left)
    while left:  # odd cycles left one vertex each: pair them greedily
        sub = ws[np.ix_(left, left)].copy()
        np.fill_diagonal(sub, -np.inf)
        i, j = np.unravel_index(np.argmax(sub), sub.shape)
        first.append(left[i])
        second.append(left[j])
        left = [v for t, v in enumerate(left) if t not in (i, j)]
    return np.array(first, dtype=np.int64), np.array(second, dtype=np.int64)


def _two_opt(ws: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-opt on a perfect matching of symmetric ``ws``: re-pair two pairs while the total weight grows."""
    a, b = first.copy(), second.copy()
    while True:
        half = len(a)
        both = np.concatenate([a, b])
        sub = ws.take(both, axis=0).take(both, axis=1)  # (2M, 2M): ws in the order a..., b...
        cur = sub[np.arange(half), np.arange(half) + half]  # (M,)
        base = cur[:, None] + cur[None, :]  # (M, M)
        same = sub[:half, :half] + sub[half:, half:] - base  # {a_k,a_j}, {b_k,b_j}
        cross = sub[:half, half:] + sub[half:, :half] - base  # {a_k,b_j}, {b_k,a_j}
        gain = np.triu(np.maximum(same, cross), 1)
        tol = 1e-12 * (np.abs(cur).sum() + 1e-300)
        ks, ls = np.nonzero(gain > tol)
        if len(ks) == 0:
            return a, b
        used = np.zeros(len(a), dtype=bool)
        for t in np.argsort(-gain[ks, ls], kind="stable"):
            k, j = ks[t], ls[t]
            if used[k] or used[j]:
                continue
            used[k] = used[j] = True
            if cross[k, j] > same[k, j]:  # -> {a_k, b_j}, {a_j, b_k}
                b[k], b[j] = b[j], b[k]
            else:  # -> {a_k, a_j}, {b_k, b_j}
                b[k], a[j] = a[j], b[k]


_SPLITS = (((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2)))  # the ways to cut 4 positions into two pairs


def _position_terms(k: np.ndarray | None, p4: np.ndarray, n_dims: tuple[int, int], cached: np.ndarray | None):
    """Terms of the energy of a block row for ``p4: (g, n2, g, n2)``, rows of ``k: (m, n1*n2)``.

    Returns ``q: (g, m)``, ``q[a, u] = sum_j1 u_j1^T P[a,:,a,:] u_j1`` (row ``u`` alone at position ``a``)
    and ``cross[(a, c)]: (m, m)`` for ``a < c``, ``cross[(a, c)][u, v] = sum_j1 u_j1^T P[a,:,c,:] v_j1``.
    The block row ``(u_0, ..., u_{g-1})`` captures ``sum_a q[a, u_a] + 2 sum_{a<c} cross[(a, c)][u_a, u_c]``.
    ``cached``: ``k k^T`` when ``n2 == 1`` (``k`` is then not read).
    """
    g = p4.shape[0]
    pairs = list(itertools.combinations(range(g), 2))
    if cached is not None:  # n2 == 1: P[a, 0, c, 0] are scalars
        norms = np.diag(cached)
        return np.stack([p4[a, 0, a, 0] * norms for a in range(g)]), {(a, c): p4[a, 0, c, 0] * cached for a, c in pairs}
    m = k.shape[0]
    x = k.reshape(m, *n_dims)  # (m, n1, n2)
    q = np.stack([((x @ p4[a, :, a, :]) * x).sum(axis=(1, 2)) for a in range(g)])  # (g, m)
    cross = {(a, c): _matmul_t(np.ascontiguousarray((x @ p4[a, :, c, :]).reshape(m, -1)), k) for a, c in pairs}
    return q, cross


def _cross(cross: dict, a: int, c: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(len(u), len(v))``: ``sum_j1 u_j1^T P[a,:,c,:] v_j1`` for rows ``u`` at position ``a``, ``v`` at ``c``."""
    return cross[(a, c)][np.ix_(u, v)] if a < c else cross[(c, a)][np.ix_(v, u)].T


def _joined(q: np.ndarray, cross: dict, units: np.ndarray, lo: tuple, hi: tuple) -> np.ndarray:
    """``(N, N)``: energy of the block row holding unit ``s`` at positions ``lo`` and unit ``t`` at ``hi``.

    ``units: (N, h)`` rows; ``W[s, t] = e_lo(s) + e_hi(t) + 2 sum_{i, j} cross(lo_i, hi_j)[s_i, t_j]`` where
    ``e_pos(s)`` is the energy of unit ``s`` alone at ``pos`` (its own ``q`` and cross terms).
    """
    def alone(pos):  # (N,)
        e = sum(q[a, units[:, i]] for i, a in enumerate(pos))
        for (i, a), (j, c) in itertools.combinations(enumerate(pos), 2):
            e = e + 2 * _cross(cross, a, c, units[:, i], units[:, j]).diagonal()
        return e

    between = sum(_cross(cross, a, c, units[:, i], units[:, j])
                  for i, a in enumerate(lo) for j, c in enumerate(hi))
    return alone(lo)[:, None] + alone(hi)[None, :] + 2 * between


def _match_units(q, cross, units: np.ndarray, lo: tuple, hi: tuple, cold: bool) -> np.ndarray:
    """Pair ``units: (N, h)`` into block rows ``(N/2, 2h)``: the first unit at positions ``lo``, the other at ``hi``.

    Cold: cycle cover + 2-opt; warm: 2-opt from the pairs ``(0, 1), (2, 3), ...`` (never lowers the energy).
    """
    first, second = _ordered_pairs(_joined(q, cross, units, lo, hi), cold)  # weights (N, N)
    rows = np.empty((len(first), 2 * units.shape[1]), dtype=np.int64)
    rows[:, list(lo)], rows[:, list(hi)] = units[first], units[second]
    return rows


def _group_energy(q: np.ndarray, cross: dict, groups: np.ndarray) -> float:
    """Energy captured by the block rows ``groups: (m/4, 4)`` (row indices) for fixed position terms."""
    alone = sum(q[a, groups[:, a]].sum() for a in range(4))
    pairs = sum(cross[(a, c)][groups[:, a], groups[:, c]].sum() for a, c in itertools.combinations(range(4), 2))
    return float(alone + 2 * pairs)


def _group_order(q, cross, m: int, cold: bool, deadline: float) -> np.ndarray:
    """New order of ``m`` rows in block rows of 4 for fixed position terms (``_position_terms``).

    Warm: from the current block rows, re-pair the halves for every cut of the 4 positions into two pairs
    until the energy stops growing or the deadline passes (never lowers it). Cold: also build block rows
    from scratch (pair the rows at positions ``(0, 1)``, then the pairs at ``(0, 1) + (2, 3)``, then the
    warm passes) and keep the better of the two.
    """
    def improve(groups):
        for _ in range(_MAX_STEPS):
            before = groups
            for lo, hi in _SPLITS:
                units = np.stack([groups[:, list(lo)], groups[:, list(hi)]], axis=1).reshape(-1, 2)  # (m/2, 2)
                groups = _match_units(q, cross, units, lo, hi, cold=False)
            if np.array_equal(groups, before) or time.perf_counter() > deadline:
                break
        return groups

    best = improve(np.arange(m).reshape(-1, 4))  # (m/4, 4)
    if cold and time.perf_counter() < deadline:
        pairs = _match_units(q, cross, np.arange(m)[:, None], (0,), (1,), cold=True)  # (m/2, 2)
        fresh = improve(_match_units(q, cross, pairs, (0, 1), (2, 3), cold=True))
        if _group_energy(q, cross, fresh) > _group_energy(q, cross, best):
            best = fresh
    return best.reshape(-1)


class _Search:
    """One search: the weight as float64 numpy, its shapes ``(m1, m2, n1, n2)``, the rank and the searched sides."""

    def __init__(self, w: np.ndarray, dims: tuple[int, int, int, int], rank: int, rows: bool, cols: bool):
        m1, m2, n1, n2 = dims
        self.w, self.dims, self.rank = w, dims, rank
        self.total = float(np.square(w).sum())
        self.sides = []
        if rows and m1 > 1 and m2 in (2, 4):
            self.sides.append(_Side(False, _matmul_t(w, w) if n2 == 1 else None))
        if cols and n1 > 1 and n2 in (2, 4):
            self.sides.append(_Side(True, _matmul_t(w.T.copy(), w.T.copy()) if m2 == 1 else None))

    def error(self, energy: float) -> float:
        return float(np.sqrt(max(0.0, 1.0 - energy / self.total))) if self.total > 0 else 0.0

    def _order(self, k: np.ndarray, perm: np.ndarray, side: _Side, proj: np.ndarray, cold: bool,
               cold_round: bool, deadline: float) -> np.ndarray:
        """New order of the rows (or columns) of ``k``: pairs ``(first, second)`` laid out block row by block row."""
        m1, m2, n1, n2 = self.dims
        p4 = proj.reshape(m2, n2, m2, n2)
        if side.transpose:
            p4, other = p4.transpose(1, 0, 3, 2), (m1, m2)
        else:
            other = (n1, n2)
        cached = None if side.gram is None else side.gram[np.ix_(perm, perm)]
        mat = None if cached is not None else np.ascontiguousarray(k.T if side.transpose else k)
        if p4.shape[0] == 4:  # cold: every step of a cold round, as building afresh keeps paying (module doc)
            return _group_order(*_position_terms(mat, p4, other, cached), len(perm), cold_round, deadline)
        first, second = _ordered_pairs(_pair_weights(mat, p4, other, cached), cold)  # weights (len(perm),) * 2
        return np.stack([first, second], axis=1).reshape(-1)

    def descend(self, p, q, proj, cold: bool, deadline: float):
        """Alternate matchings and subspace refits until the captured energy stops growing."""
        k = self.w[p][:, q]
        proj, energy = _projector(_gram(k, self.dims), self.rank) if proj is None else (proj, -np.inf)
        for step in range(_MAX_STEPS):
            before = energy
            for side in self.sides:
                if side.transpose:
                    order = self._order(k, q, side, proj, cold and step == 0, cold, deadline)
                    k, q = k[:, order], q[order]
                else:
                    order = self._order(k, p, side, proj, cold and step == 0, cold, deadline)
                    k, p = k[order], p[order]
                proj, energy = _projector(_gram(k, self.dims), self.rank)
                if time.perf_counter() > deadline:
                    return p, q, proj, energy
            if energy <= before + _TOL * self.total:
                break
        return p, q, proj, energy


def _start_subspaces(d: int, rank: int, rng: np.random.Generator):
    """Start projectors: the coordinate subspaces of dimension ``rank`` that hold ``e_0``, then random ones.

    Swapping the two slots of every pair maps any coordinate subspace to one holding ``e_0``, so these
    are all the coordinate starts up to symmetry; with ``B (2, 1)``, ``e_0`` is row pruning.
    """
    eye = np.eye(d)
    for axes in itertools.combinations(range(1, d), rank - 1):
        keep = [0, *axes]
        yield eye[:, keep] @ eye[:, keep].T
    while True:
        v, _ = np.linalg.qr(rng.standard_normal((d, rank)))  # (d, r), Haar-distributed span
        yield v @ v.T


def _check_search(w: torch.Tensor, a_shape, b_shape, rank: int, time_budget_s: float, max_rounds: int | None,
                  rows: bool, cols: bool, name: str) -> None:
    """The argument checks of :func:`search_permutations` (its Raises)."""
    check_factor_shapes(tuple(w.shape), a_shape, b_shape, name)
    check_finite(w, name)
    (m1, n1), (m2, n2) = a_shape, b_shape
    if not 1 <= rank <= KroneckerShape(tuple(a_shape), tuple(b_shape), rank).max_rank:
        raise TensorLMError(f"{name}: Kronecker rank {rank} for {a_shape} x {b_shape} must be in "
                            f"1..{min(m1 * n1, m2 * n2)}")
    if not time_budget_s > 0:
        raise TensorLMError(f"{name}: permutation time_budget_s must be > 0 seconds, got {time_budget_s}")
    if max_rounds is not None and max_rounds < 1:
        raise TensorLMError(f"{name}: permutation max_rounds must be >= 1 or None, got {max_rounds}")
    for side, on, outer, inner in (("row", rows, m1, m2), ("column", cols, n1, n2)):
        if on and outer > 1 and inner not in SEARCHED_B_SIDES:
            raise TensorLMError(f"{name}: the permutation search pairs {side}s, so it needs B {tuple(b_shape)} "
                                f"to have 1, 2 or 4 {side}s; choose such a B or pass {side}s=False")


def _search_rounds(search: _Search, base_energy: float, rng: np.random.Generator, deadline: float,
                   max_rounds: int | None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The rounds of the search: a warm descent from the identity, then cold descents from start subspaces.

    Returns the best ``(p, q)`` found and the best error after each round (never rising).
    """
    m1, m2, n1, n2 = search.dims
    ident_p, ident_q = np.arange(m1 * m2), np.arange(n1 * n2)
    best = (ident_p, ident_q, None, base_energy)
    history: list[float] = []
    starts = _start_subspaces(m2 * n2, search.rank, rng)
    while search.sides and (max_rounds is None or len(history) < max_rounds):
        if history:  # cold descent from the next start subspace
            found = search.descend(ident_p, ident_q, next(starts), cold=True, deadline=deadline)
        else:  # round 0: warm descent from the identity
            found = search.descend(ident_p, ident_q, None, cold=False, deadline=deadline)
        if found[3] > best[3]:
            best = found
        history.append(search.error(best[3]))
        if time.perf_counter() > deadline or history[-1] < 1e-7:
            break
    return best[0], best[1], history


def search_permutations(
    w: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int,
    *,
    seed: int = 0,
    time_budget_s: float = 10.0,
    max_rounds: int | None = None,
    rows: bool = True,
    cols: bool = True,
    name: str = "weight",
) -> PermutationResult:
    """Search ``p, q`` so that ``W[p][:, q]`` is close to a rank-``rank`` Kronecker sum (TQCompressor).

    The algorithm (module docstring): descent from the identity, cold descents from coordinate and
    random start subspaces, then kicks of the best solution; each descent alternates maximum-weight
    pair matchings (cycle cover + 2-opt) of rows and columns with refits of the ``B`` subspace.

    Args:
        w: ``(m, n) = (m1*m2, n1*n2)`` in ``(out, in)`` orientation.
        a_shape: ``(m1, n1)``; b_shape: ``(m2, n2)`` with ``m2, n2`` in ``SEARCHED_B_SIDES`` (1, 2, 4).
        rank: Kronecker terms.
        seed: seeds the start subspaces and the kicks.
        time_budget_s: wall-clock budget in seconds (> 0); the round running at the deadline stops early.
        max_rounds: at most this many rounds (round 0 included); ``None`` for no limit.
        rows, cols: search the row / column permutation (a side whose factor dimension is 1 on either
            factor cannot change the error and is left as the identity).
        name: the module's name, for error messages.

    Returns:
        :class:`PermutationResult`; its error is never above ``baseline_error``.

    Raises:
        TensorLMError: shapes that do not divide ``w``, a rank outside ``1..min(m1*n1, m2*n2)``, a searched
            side with ``B`` not 1, 2 or 4 on it, a non-positive budget or ``max_rounds``, NaN/Inf in ``w``.
    """
    started = time.perf_counter()
    _check_search(w, a_shape, b_shape, rank, time_budget_s, max_rounds, rows, cols, name)
    (m1, n1), (m2, n2) = a_shape, b_shape
    search = _Search(w.detach().to(torch.float64).cpu().numpy(), (m1, m2, n1, n2), rank, rows, cols)
    _, base_energy = _projector(_gram(search.w, search.dims), rank)
    p, q, history = _search_rounds(search, base_energy, np.random.default_rng(seed), started + time_budget_s,
                                   max_rounds)
    perm_w = w.detach()[torch.from_numpy(p)][:, torch.from_numpy(q)]
    factors = nearest_kronecker(perm_w, a_shape, b_shape, rank, name)
    return PermutationResult(
        row_perm=torch.from_numpy(p.astype(np.int64)),
        col_perm=torch.from_numpy(q.astype(np.int64)),
        factors=factors,
        history=history or [search.error(base_energy)],
        rel_error=factors.rel_error,
        baseline_error=search.error(base_energy),
        seconds=time.perf_counter() - started,
    )
