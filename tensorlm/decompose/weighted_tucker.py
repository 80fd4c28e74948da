"""Data-aware Tucker matrix bank: one shared bank fitted in the output-error norm of every matrix.

Setting (:mod:`tensorlm.decompose.tucker`): weights ``W_i (out_i, in_i)`` cut into ``D x D`` blocks, block
``b = (r, c)`` of matrix ``i`` approximated by ``W_b ~ U S_b V^T`` with ``S_b = sum_j P[b, j] C_j``,
``U, V: (D, d)``, ``C: (l, d, d)``, ``P: (M, l)`` (Ren, Wang et al., ICLR 2022). ``G_i = sum_t x_t x_t^T``
``(in_i, in_i)`` is the second moment of matrix ``i``'s inputs (float64). Objective (ours; the data-aware
objective of DESIGN.md summed over the matrices of the bank):

    F = sum_i alpha_i ||(W_i - W~_i) G_i^{1/2}||_F^2 = sum_i alpha_i trace(E_i G_i E_i^T),  E_i = W_i - W~_i,

with the *full* ``G_i`` (the cross terms between the column blocks of one matrix are kept).
``alpha_i = 1`` (the summed output error), or with ``normalise`` ``alpha_i = 1 / trace(W_i G_i W_i^T)``,
so that ``F = sum_i rel_i^2`` is the sum of the matrices' squared relative weighted errors and a matrix of
small norm (k_proj) weighs as much as any other instead of being dropped from the bank's ``l`` slices.
A matrix with ``trace(W_i G_i W_i^T) = 0`` keeps ``alpha_i = 1``. With every ``G_i = I`` and
``alpha_i = 1``, ``F`` is the plain bank objective ``||T - T_hat||_F^2``.

Two steps:

1. *Start.* Approximate each block's metric ``alpha_i G_i[cD:(c+1)D, cD:(c+1)D]`` (the diagonal block of
   ``G_i`` that block column ``c`` sees; cross-block terms dropped) by ``beta_b Gbar`` with one shared
   shape ``Gbar = D * sum_b alpha_b G_b / trace(sum_b alpha_b G_b)`` and ``beta_b = alpha_b trace(G_b) / D``.
   Under that approximation ``F`` is exactly the plain bank objective of the whitened blocks
   ``sqrt(beta_b) W_b L`` (``L = Gbar^{1/2}``, damped by :func:`tensorlm.decompose.whitening.whitening`),
   since ``(U S_b V^T) L = U S_b (L V)^T``; HOOI on them gives ``P', U', V', C`` and maps back as
   ``V = L^{-1} V'``, ``P[b] = P'[b] / sqrt(beta_b)``. Plain HOOI on the unwhitened blocks is the other
   candidate; the start is whichever has the lower true ``F``, so the result is never worse than the
   plain bank in the weighted norm.
2. *Refinement with the full G (block-coordinate descent).* Write ``Vt = I_cols (x) V`` ``(in, cols d)`` and
   ``S_i`` ``(rows d, cols d)`` for the block matrix of matrix ``i``'s cores, so ``W~_i = (I_rows (x) U) S_i Vt^T``.
   Then ``F_i / alpha_i = trace(W G W^T) - 2 <S_i, B_i> + <(I (x) U^T U) S_i K_i, S_i>`` with
   ``K_i = Vt^T G_i Vt`` ``(cols d, cols d)`` and ``B_i = (I (x) U)^T W_i G_i Vt``: for fixed ``U, V`` the
   objective lives in the small core space. ``F`` is quadratic in each of ``U``, ``V``, ``C``, ``P`` with
   the others fixed; one sweep takes, in turn:
   ``U``: exact, ``U M = Q`` with ``M = sum_i alpha_i sum_r S_r K_i S_r^T`` ``(d, d)`` and
   ``Q = sum_i alpha_i sum_r (W_i G_i Vt)_r S_r^T`` (``S_r``, block row ``r`` of ``S_i``);
   ``V``: ``cg_steps`` conjugate-gradient steps on its ``(D d)``-unknown normal equations, matrix-free
   (half-gradient ``sum_i alpha_i sum_c [G_i Vt A_i^T A_i - (W_i G_i)^T A_i]_cc``, ``A_i = (I (x) U) S_i``);
   ``C`` and ``P``: ``cg_steps`` CG steps each, with ``dS_i = alpha_i ((I (x) U^T U) S_i K_i - B_i)`` cut into
   ``d x d`` blocks, ``dC_j = sum_b P[b, j] dS_b``, ``dP[b, j] = <dS_b, C_j>``.
   CG starts at the current factor and never raises the quadratic; a step whose ``F`` (evaluated exactly
   in the core form) rose by round-off is rejected, so ``F`` never increases. After a sweep ``U``, ``V``,
   ``P`` are re-orthonormalised by QR (``R`` factors moved into ``C``; ``W~`` unchanged). A sweep that
   lowers ``F`` by less than ``tol * F`` is discarded and ends the refinement, so a start that is already
   stationary (the plain HOOI fit when every ``G_i = I``) comes back unchanged.

Cost, float64: once ``sum_i out_i in_i^2`` (``W_i G_i``) and two HOOI fits; per sweep about
``(cg_steps + 3) sum_i in_i^2 d`` for ``V`` and ``2 (cg_steps + 2) (2 M l d^2 + sum_i rows_i d (cols_i d)^2)``
for ``C`` and ``P``. all-MiniLM-L6-v2's 1/7 bank (``M = 72``, ``D = 384``, ``(l, d) = (27, 224)``): about
1e11 flops a sweep; SmolLM2-135M's (``M = 2880``, ``D = 192``, ``(l, d) = (530, 160)``): about 3e12 (estimates);
measured, compressing SmolLM2 with that bank (calibration, both HOOI fits, up to 4 sweeps, saving) took 49 minutes
on 2 CPU cores. Memory: the block stack twice, every ``G_i`` and
``W_i G_i`` (SmolLM2: about 3 GB).

Pure tensor code: nothing here knows about ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tensorlm.decompose.linalg import check_finite
from tensorlm.decompose.tucker import (
    BankFactors,
    BlockLayout,
    check_ranks,
    identity_bank,
    merge_blocks,
    split_blocks,
    tucker_bank,
)
from tensorlm.decompose.whitening import DEFAULT_DAMP, check_second_moment, weighted_error, whitening
from tensorlm.errors import TensorLMError

_JITTER = 1e-13


@dataclass
class BankProblem:
    """The data of one weighted bank fit, float64.

    Attributes:
        weights: name -> ``W_i (out_i, in_i)``; moments: name -> ``G_i (in_i, in_i)`` (``I`` when not given);
        alphas: name -> ``alpha_i``; layout: where each matrix's blocks sit in the stack;
        products: name -> ``W_i G_i (out_i, in_i)``; norms: name -> ``trace(W_i G_i W_i^T)``.
    """

    weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]
    alphas: dict[str, float]
    layout: BlockLayout
    products: dict[str, torch.Tensor]
    norms: dict[str, float]

    @property
    def total(self) -> float:
        """``F`` of the zero bank: ``sum_i alpha_i trace(W_i G_i W_i^T)``."""
        return sum(self.alphas[n] * self.norms[n] for n in self.weights)


@dataclass
class WeightedBankFit:
    """Result of :func:`weighted_tucker_bank`.

    Attributes:
        factors: :class:`BankFactors`, float64; ``U``, ``V``, ``P`` with orthonormal columns.
        layout: the block layout; alphas: name -> ``alpha_i``.
        rel_plain, rel_whitened, rel: ``sqrt(F / F_0)`` (``F_0``: ``F`` of the zero bank) of the plain HOOI fit,
            of the whitened start and of the result; ``rel <= min(rel_plain, rel_whitened)``.
        start: ``"whitened"`` or ``"plain"``; history: ``sqrt(F / F_0)`` at the start and after each kept
            sweep (non-increasing); sweeps_run: sweeps kept.
    """

    factors: BankFactors
    layout: BlockLayout
    alphas: dict[str, float]
    rel_plain: float
    rel_whitened: float
    rel: float
    start: str
    history: list[float]
    sweeps_run: int


def bank_problem(weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor] | None,
                 block_size: int | None = None, normalise: bool = False) -> BankProblem:
    """Check and collect the data of a weighted bank fit (module docstring for ``alpha_i``).

    Args:
        weights: name -> ``W (out, in)``, multiples of ``D``; the order fixes the order of the blocks.
        moments: name -> ``G (in, in)`` for every weight, or None for ``G = I`` everywhere.
        block_size: ``D``; default the smallest dimension. normalise: ``alpha_i = 1 / trace(W_i G_i W_i^T)``.

    Raises:
        TensorLMError: a weight that is not a finite matrix, a missing/mis-shaped/non-finite ``G``, or a
            dimension not a multiple of ``D``.
    """
    _, layout = split_blocks(weights, block_size)  # checks the shapes (the stack is rebuilt in float64 later)
    w64, g64, alphas, products, norms = {}, {}, {}, {}, {}
    for name, weight in weights.items():
        check_finite(weight, name)
        w64[name] = weight.detach().to(torch.float64)
        n = weight.shape[1]
        if moments is None:
            g64[name] = torch.eye(n, dtype=torch.float64, device=weight.device)
        elif name not in moments:
            raise TensorLMError(f"tucker bank: no input second moment for {name!r}; moments given for "
                                f"{len(moments)} of {len(weights)} weights")
        else:
            g64[name] = check_second_moment(moments[name], n, name)
        products[name] = w64[name] @ g64[name]  # (out, in)
        norms[name] = (products[name] * w64[name]).sum().item()
        alphas[name] = 1.0 / norms[name] if normalise and norms[name] > 0 else 1.0
    return BankProblem(w64, g64, alphas, layout, products, norms)


def _matrix_cores(problem: BankProblem, factors: BankFactors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_b: (n_i, d, d)`` and ``W~_i: (out_i, in_i)`` of matrix ``name``."""
    cores = torch.einsum("nl,lij->nij", factors.P[problem.layout.blocks_of(name)], factors.C)  # (n_i, d, d)
    blocks = factors.U @ cores @ factors.V.T  # (n_i, D, D)
    return cores, merge_blocks(blocks, *problem.layout.shapes[name])


def bank_objective(problem: BankProblem, factors: BankFactors) -> float:
    """``F = sum_i alpha_i trace((W_i - W~_i) G_i (W_i - W~_i)^T)``, clamped at 0 against round-off."""
    total = 0.0
    for name, weight in problem.weights.items():
        diff = weight - _matrix_cores(problem, factors, name)[1]  # (out, in)
        total += problem.alphas[name] * ((diff @ problem.moments[name]) * diff).sum().item()
    return max(total, 0.0)


@dataclass
class _Projection:
    """What ``F`` needs for fixed ``U``, ``V`` (``Vt = I_cols (x) V``: ``(in, cols d)``), per matrix.

    Attributes:
        wgv: ``W G Vt (out, cols d)``; gram: ``K = Vt^T G Vt (cols d, cols d)``;
        rhs: ``B = (I_rows (x) U)^T W G Vt (rows d, cols d)``; utu: ``U^T U (d, d)``.
    """

    wgv: dict[str, torch.Tensor]
    gram: dict[str, torch.Tensor]
    rhs: dict[str, torch.Tensor]
    utu: torch.Tensor


def _project(problem: BankProblem, u: torch.Tensor, v: torch.Tensor) -> _Projection:
    """:class:`_Projection` of ``U, V: (D, d)``; costs ``sum_i (in_i^2 + out_i in_i) d``."""
    size, rank = v.shape
    wgv, gram = {}, {}
    for name, g in problem.moments.items():
        out, inp = problem.layout.shapes[name]
        cols = inp // size
        gv = (g.reshape(inp, cols, size) @ v).reshape(inp, cols * rank)  # G Vt: (in, cols d)
        gram[name] = (v.T @ gv.reshape(cols, size, cols * rank)).reshape(cols * rank, cols * rank)  # K
        wgv[name] = (problem.products[name].reshape(out, cols, size) @ v).reshape(out, cols * rank)  # (out, cols d)
    return _with_u(problem, _Projection(wgv, gram, {}, u.T @ u), u)


def _with_u(problem: BankProblem, proj: _Projection, u: torch.Tensor) -> _Projection:
    """``proj`` for another ``U: (D, d)`` (same ``V``)."""
    size, rank = u.shape
    rhs = {}
    for name, wgv in proj.wgv.items():
        rows = problem.layout.shapes[name][0] // size
        rhs[name] = (u.T @ wgv.reshape(rows, size, -1)).reshape(rows * rank, -1)  # B: (rows d, cols d)
    return _Projection(proj.wgv, proj.gram, rhs, u.T @ u)


def _stacked(problem: BankProblem, factors: BankFactors, name: str) -> torch.Tensor:
    """``S_i: (rows d, cols d)``, block ``(r, c)`` = ``S_b = sum_j P[b, j] C_j`` of matrix ``name``."""
    rows, cols = problem.layout.grid(name)
    rank = factors.C.shape[-1]
    cores = torch.einsum("nl,lij->nij", factors.P[problem.layout.blocks_of(name)], factors.C)  # (n, d, d)
    return merge_blocks(cores, rows * rank, cols * rank)


def _left(utu: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``(I_rows (x) U^T U) S`` for ``S: (rows d, cols d)``."""
    rank = utu.shape[0]
    return (utu @ stacked.reshape(-1, rank, stacked.shape[1])).reshape(stacked.shape)


def _core_objective(problem: BankProblem, proj: _Projection, factors: BankFactors) -> float:
    """``F = sum_i alpha_i (trace(W G W^T) - 2 <S_i, B_i> + <(I (x) U^T U) S_i K_i, S_i>)`` (``U, V`` of ``proj``)."""
    total = 0.0
    for name in problem.weights:
        stacked = _stacked(problem, factors, name)  # (rows d, cols d)
        quad = (_left(proj.utu, stacked @ proj.gram[name]) * stacked).sum()
        total += problem.alphas[name] * (problem.norms[name] - 2 * (stacked * proj.rhs[name]).sum() + quad).item()
    return max(total, 0.0)


def _core_gradient(problem: BankProblem, proj: _Projection, factors: BankFactors, which: str,
                   homogeneous: bool) -> torch.Tensor:
    """Half-gradient ``H X - R`` of ``F`` in ``which`` (``"C"``: ``(l, d, d)`` or ``"P"``: ``(M, l)``), or ``H X``."""
    rank = factors.C.shape[-1]
    grad = torch.zeros_like(getattr(factors, which))
    for name in problem.weights:
        stacked = _stacked(problem, factors, name)  # (rows d, cols d)
        d_stacked = _left(proj.utu, stacked @ proj.gram[name]) - (0 if homogeneous else proj.rhs[name])
        d_cores = problem.alphas[name] * split_blocks({name: d_stacked}, rank)[0]  # (n, d, d)
        rows = problem.layout.blocks_of(name)
        if which == "C":
            grad += torch.einsum("nl,nij->lij", factors.P[rows], d_cores)  # (l, d, d)
        else:
            grad[rows] = torch.einsum("nij,lij->nl", d_cores, factors.C)  # (n, l)
    return grad


def _conjugate_gradient(x: torch.Tensor, resid: torch.Tensor, apply_h, steps: int) -> torch.Tensor:
    """Up to ``steps`` CG steps on ``H x = R`` from ``x``; ``resid = R - H x``, ``apply_h(p) = H p``."""
    rs0 = rs = resid.square().sum()
    direction = resid.clone()
    for _ in range(steps):
        if not rs > 1e-28 * rs0 or not rs0 > 0:
            break
        h_dir = apply_h(direction)
        curvature = (direction * h_dir).sum()
        if not curvature > 0:
            break
        step = rs / curvature
        x = x + step * direction
        resid = resid - step * h_dir
        rs_new = resid.square().sum()
        direction = resid + (rs_new / rs) * direction
        rs = rs_new
    return x


def _step_core(problem: BankProblem, proj: _Projection, factors: BankFactors, which: str, steps: int
               ) -> BankFactors:
    """CG on ``C`` or ``P`` with the other factors fixed."""
    def apply_h(direction):
        return _core_gradient(problem, proj, dataclasses.replace(factors, **{which: direction}), which, True)

    resid = -_core_gradient(problem, proj, factors, which, False)
    return dataclasses.replace(factors, **{which: _conjugate_gradient(getattr(factors, which), resid, apply_h,
                                                                       steps)})


def _step_u(problem: BankProblem, proj: _Projection, factors: BankFactors) -> BankFactors:
    """The exact ``U`` for fixed ``V``, ``C``, ``P``: ``U M = Q`` with ``M = sum_i alpha_i sum_r S_r K_i S_r^T``,
    ``Q = sum_i alpha_i sum_r (W G Vt)_r S_r^T`` (``S_r``: block row ``r`` of ``S_i``, ``(d, cols d)``)."""
    size, rank = factors.U.shape
    m = torch.zeros(rank, rank, dtype=factors.U.dtype, device=factors.U.device)
    q = torch.zeros_like(factors.U)  # (D, d)
    for name in problem.weights:
        stacked = _stacked(problem, factors, name).reshape(-1, rank, proj.gram[name].shape[0])  # (rows, d, cols d)
        alpha = problem.alphas[name]
        m += alpha * ((stacked @ proj.gram[name]) @ stacked.transpose(1, 2)).sum(0)
        q += alpha * (proj.wgv[name].reshape(-1, size, stacked.shape[2]) @ stacked.transpose(1, 2)).sum(0)
    jitter = _JITTER * torch.trace(m).clamp_min(torch.finfo(m.dtype).tiny) / rank
    u = torch.linalg.solve(m + jitter * torch.eye(rank, dtype=m.dtype, device=m.device), q.T).T  # (D, d)
    return dataclasses.replace(factors, U=u)


def _step_v(problem: BankProblem, factors: BankFactors, steps: int) -> BankFactors:
    """CG on ``V`` for fixed ``U``, ``C``, ``P``.

    With ``A_i = (I (x) U) S_i (out, cols d)`` the half-gradient is ``sum_i alpha_i sum_c [G Vt A^T A - (W G)^T A]_cc``
    (the diagonal ``(D, d)`` blocks); ``H p`` is the first term with ``p`` for ``V``.
    """
    size, rank = factors.V.shape
    data, resid = [], torch.zeros_like(factors.V)
    for name, weight in problem.weights.items():
        out, inp = weight.shape
        cols = inp // size
        a = (factors.U @ _stacked(problem, factors, name).reshape(-1, rank, cols * rank)).reshape(out, cols * rank)
        ata = (problem.alphas[name] * a.T @ a).reshape(cols * rank, cols, rank)  # alpha A^T A, split by columns c
        resid += problem.alphas[name] * torch.einsum("ocD,ocd->Dd", problem.products[name].reshape(out, cols, size),
                                                     a.reshape(out, cols, rank))
        data.append((problem.moments[name].reshape(cols, size, cols, size), ata))

    def apply_h(direction):
        total = torch.zeros_like(direction)
        for g4, ata in data:
            gv = (g4 @ direction).reshape(g4.shape[0], size, -1)  # G Vt: (cols, D, cols d)
            total += torch.einsum("cDk,kcd->Dd", gv, ata)
        return total

    return dataclasses.replace(factors, V=_conjugate_gradient(factors.V, resid - apply_h(factors.V), apply_h, steps))



def orthonormalised(factors: BankFactors) -> BankFactors:
    """The same bank with ``U``, ``V``, ``P`` orthonormalised by QR and the ``R`` factors moved into ``C``.

    ``U = Q_U R_U``, ``V = Q_V R_V``, ``P = Q_P R_P``: ``C_j <- sum_k R_P[j, k] R_U C_k R_V^T``, so every
    ``W~_b = U S_b V^T`` is unchanged (up to round-off).
    """
    q_u, r_u = torch.linalg.qr(factors.U)  # (D, d), (d, d)
    q_v, r_v = torch.linalg.qr(factors.V)  # (D, d), (d, d)
    q_p, r_p = torch.linalg.qr(factors.P)  # (M, l), (l, l)
    core = torch.einsum("jk,kab->jab", r_p, r_u @ factors.C @ r_v.T)  # (l, d, d)
    return BankFactors(U=q_u, V=q_v, C=core, P=q_p)


def _whitened_start(problem: BankProblem, blocks: torch.Tensor, ranks: tuple[int, int], damp: float,
                    hooi: dict) -> BankFactors:
    """Step 1 of the module docstring: HOOI on ``sqrt(beta_b) W_b L``, mapped back; ``blocks: (M, D, D)``.

    Raises:
        TensorLMError: every ``G_i`` has a zero diagonal block sum (the matrices saw no nonzero input).
    """
    size = problem.layout.block_size
    g_sum = torch.zeros(size, size, dtype=torch.float64, device=blocks.device)
    betas = []
    for name in problem.weights:
        rows, cols = problem.layout.grid(name)
        g4 = problem.moments[name].reshape(cols, size, cols, size)
        diag = torch.diagonal(g4, dim1=0, dim2=2).permute(2, 0, 1)  # (cols, D, D): G_cc
        alpha = problem.alphas[name]
        g_sum += alpha * rows * diag.sum(0)
        traces = alpha * torch.diagonal(diag, dim1=1, dim2=2).sum(1) / size  # (cols,)
        betas.append(traces.repeat(rows))  # (rows * cols,), row-major over (r, c)
    beta = torch.cat(betas).clamp_min(0)  # (M,)
    trace = torch.trace(g_sum).item()
    if not trace > 0:
        raise TensorLMError("tucker bank: every input second moment has zero trace on its diagonal blocks; "
                            "the matrices saw no nonzero input")
    root = whitening(g_sum * size / trace, damp, "tucker bank")  # Gbar = root.sqrt @ root.sqrt
    scale = beta.sqrt()  # (M,)
    found = tucker_bank(blocks * scale[:, None, None] @ root.sqrt, ranks, **hooi)
    inv_scale = torch.where(scale > 0, 1 / torch.where(scale > 0, scale, torch.ones_like(scale)), 0)  # (M,)
    return BankFactors(U=found.U, V=root.inv_sqrt @ found.V, C=found.C, P=found.P * inv_scale[:, None])


def _block_step(problem: BankProblem, proj: _Projection, factors: BankFactors, which: str, cg_steps: int
                ) -> tuple[BankFactors, _Projection]:
    """One block-coordinate step on factor ``which``: the candidate factors and their :class:`_Projection`."""
    if which == "U":
        candidate = _step_u(problem, proj, factors)
        return candidate, _with_u(problem, proj, candidate.U)
    if which == "V":
        candidate = _step_v(problem, factors, cg_steps)
        return candidate, _project(problem, candidate.U, candidate.V)
    return _step_core(problem, proj, factors, which, cg_steps), proj


def _refine(problem: BankProblem, factors: BankFactors, sweeps: int, cg_steps: int, tol: float, bar: tqdm
            ) -> tuple[BankFactors, list[float], int]:
    """Step 2 of the module docstring; returns ``(factors, F after each kept sweep, sweeps kept)``; ``bar``
    advances by one a sweep."""
    proj = _project(problem, factors.U, factors.V)
    value = _core_objective(problem, proj, factors)
    history, kept = [value], 0
    for _ in range(sweeps):
        before, before_value = factors, value
        for which in ("U", "V", "C", "P"):
            candidate, cand_proj = _block_step(problem, proj, factors, which, cg_steps)
            found = _core_objective(problem, cand_proj, candidate)
            if found <= value:  # False for NaN: a failed step is rejected
                factors, value, proj = candidate, found, cand_proj
        bar.set_postfix_str(f"relative error {_relative(value, problem.total):.4f}")
        bar.update()
        if before_value - value <= tol * before_value:
            factors, value = before, before_value  # too small a gain: keep the stationary start as it was
            break
        factors = orthonormalised(factors)
        proj = _project(problem, factors.U, factors.V)
        history.append(value)
        kept += 1
    return factors, history, kept


def weighted_tucker_bank(
    weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor] | None, ranks: tuple[int, int], *,
    block_size: int | None = None, normalise: bool = False, n_iter_max: int = 10, tol: float = 1e-4,
    sweeps: int = 4, cg_steps: int = 8, damp: float = DEFAULT_DAMP, seed: int = 0,
) -> WeightedBankFit:
    """Fit one bank to many weights in the weighted norm ``sum_i alpha_i ||(W_i - W~_i) G_i^{1/2}||_F^2``.

    Module docstring for the objective, the whitened start and the refinement. With ``moments=None`` (or
    every ``G_i = I``) and ``normalise=False`` the result is the plain HOOI bank
    (:func:`tensorlm.decompose.tucker.tucker_bank`) unless a refinement sweep lowers the plain error by more
    than ``tol``; at full ranks ``(M, D)`` it is the exact identity bank.

    Args:
        weights: name -> ``W (out, in)``; moments: name -> ``G (in, in)`` float64, or None.
        ranks: ``(l, d)``; block_size: ``D``; normalise: per-matrix weights ``1 / ||W_i G_i^{1/2}||_F^2``.
        n_iter_max, tol, seed: HOOI's (``tol`` also ends the refinement); sweeps: refinement sweeps (>= 0);
        cg_steps: CG steps per factor and sweep; damp: eigenvalue floor of ``Gbar``'s inverse root.

    Raises:
        TensorLMError: see :func:`bank_problem`; ranks out of range (:func:`check_ranks`); ``sweeps`` or
            ``cg_steps`` negative; no nonzero input.
    """
    if sweeps < 0 or cg_steps < 0:
        raise TensorLMError(f"tucker bank: sweeps={sweeps} and cg_steps={cg_steps} must be >= 0")
    problem = bank_problem(weights, moments, block_size, normalise)
    blocks, layout = split_blocks(problem.weights, block_size)  # (M, D, D) float64
    check_ranks(layout.n_blocks, layout.block_size, *ranks)
    total = problem.total
    if tuple(ranks) == (layout.n_blocks, layout.block_size):
        return WeightedBankFit(identity_bank(blocks), layout, problem.alphas, 0.0, 0.0, 0.0, "plain", [0.0], 0)
    hooi = {"n_iter_max": n_iter_max, "tol": tol, "seed": seed}
    with tqdm(total=2 + sweeps, desc=f"tucker bank ({layout.n_blocks} blocks): plain HOOI", unit="step",
              disable=None) as bar:  # shown on a terminal only
        plain = tucker_bank(blocks, ranks, **hooi)
        bar.update()
        bar.set_description_str(f"tucker bank ({layout.n_blocks} blocks): whitened HOOI")
        white = orthonormalised(_whitened_start(problem, blocks, ranks, damp, hooi))
        bar.update()
        f_plain, f_white = bank_objective(problem, plain), bank_objective(problem, white)
        start = "whitened" if f_white < f_plain else "plain"
        bar.set_description_str(f"tucker bank ({layout.n_blocks} blocks): refinement")
        factors, history, kept = _refine(problem, white if start == "whitened" else plain, sweeps, cg_steps, tol,
                                         bar)
    return WeightedBankFit(factors, layout, problem.alphas, _relative(f_plain, total), _relative(f_white, total),
                           _relative(history[-1], total), start, [_relative(v, total) for v in history], kept)


def _relative(value: float, total: float) -> float:
    """``sqrt(F / F_0)``; 0 when ``F_0 = 0``."""
    return (value / total) ** 0.5 if total > 0 else 0.0


def weighted_relative_errors(weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor] | None,
                             factors: BankFactors, layout: BlockLayout) -> dict[str, float]:
    """``||(W_i - W~_i) G_i^{1/2}||_F / ||W_i G_i^{1/2}||_F`` per weight (``G_i = I`` when ``moments`` is None)."""
    factors64 = BankFactors(*(getattr(factors, k).to(torch.float64) for k in ("U", "V", "C", "P")))
    problem = bank_problem(weights, moments, layout.block_size)
    return {name: weighted_error(w, _matrix_cores(problem, factors64, name)[1], problem.moments[name])
            for name, w in problem.weights.items()}
