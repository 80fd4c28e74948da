"""``kronecker``: ``W[p][:, q] ~ sum_k A_k (x) B_k`` for linear maps (KnGPT2; TQCompressor with permutations)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn

from tensorlm.decompose.allocation import RankCurve, rank_window, tail_curve
from tensorlm.decompose.kronecker import KroneckerShape, check_factor_shapes, choose_kronecker_shape, rearrange
from tensorlm.decompose.permutation import SEARCHED_B_SIDES, search_permutations
from tensorlm.decompose.weighted_kronecker import (
    DEFAULT_RIDGE,
    permute_second_moment,
    start_errors,
    weighted_kronecker,
    with_ridge,
)
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import dense_weight
from tensorlm.layers.kronecker import KroneckerLinear
from tensorlm.methods.registry import (
    Method,
    PlanContext,
    check_calibration,
    is_linear,
    linear_shape,
    options_from_dict,
    register_method,
    second_moment,
)
from tensorlm.plan import LayerPlan


@dataclass
class PermuteConfig:
    """Options of the TQCompressor permutation search (:mod:`tensorlm.decompose.permutation`)."""

    time_budget_s: float = 10.0
    seed: int = 0
    max_rounds: int | None = None


def permute_option(value) -> PermuteConfig | None:
    """``permute:`` as written in a recipe (``true``, a mapping, ``false``/absent) -> :class:`PermuteConfig`."""
    if isinstance(value, dict | bool):
        return options_from_dict(PermuteConfig, {} if value is True else value, "permute") if value else None
    return value


@dataclass
class KroneckerConfig:
    """``kronecker``: ``W[p][:, q] ~ sum_k A_k (x) B_k`` for ``nn.Linear``/``Conv1D`` targets.

    Give the factorisation as ``a_shape``/``b_shape``/``rank``; or per dense ``(out, in)`` shape as
    ``shapes: {"OUTxIN": {a_shape, b_shape, rank}}``; or as ``ratio`` (fraction of the dense
    parameters, shapes chosen by :func:`tensorlm.decompose.kronecker.choose_kronecker_shape`).
    ``permute`` turns on the permutation search (TQCompressor).

    ``calibration``: None (Van Loan-Pitsianis, minimises ``||W - W~||_F``) or ``whitened``: the data-aware
    nearest Kronecker sum minimising ``||(W - W~) G^{1/2}||_F`` with ``G`` the second moment of the layer's
    inputs (Kronecker-factored whitening, then ``als_sweeps`` sweeps of exact alternating least squares with
    the full ``G``; :func:`tensorlm.decompose.weighted_kronecker.weighted_kronecker`). With ``permute``,
    the permutations are searched first and ``G`` is permuted with the columns. ``ridge`` (default 0.01)
    adds ``ridge * trace(G) / n`` to ``G``'s diagonal before fitting (GPTQ's dampening; see
    :func:`~tensorlm.decompose.weighted_kronecker.weighted_kronecker` for why a Kronecker fit needs it).
    """

    a_shape: list[int] | None = None
    b_shape: list[int] | None = None
    rank: int = 1
    shapes: dict[str, dict] | None = None
    ratio: float | None = None
    permute: PermuteConfig | None = None
    calibration: str | None = None
    als_sweeps: int = 4
    ridge: float = DEFAULT_RIDGE

    def __post_init__(self):
        self.permute = permute_option(self.permute)
        check_calibration(self.calibration, "kronecker")
        if not isinstance(self.ridge, int | float) or not 0 <= self.ridge < float("inf"):
            raise TensorLMError(f"kronecker ridge must be a number >= 0, got {self.ridge!r}")
        if not isinstance(self.als_sweeps, int) or self.als_sweeps < 0:
            raise TensorLMError(f"kronecker als_sweeps must be an integer >= 0, got {self.als_sweeps!r}")
        given = sum(x is not None for x in (self.a_shape, self.shapes, self.ratio))
        if given != 1:
            raise TensorLMError("kronecker options need exactly one of a_shape/b_shape, shapes, or ratio")
        if (self.a_shape is None) != (self.b_shape is None):
            raise TensorLMError("kronecker options: a_shape and b_shape go together")

    def factorisation(self, shape: tuple[int, int], name: str) -> dict | None:
        """``{a_shape, b_shape, rank}`` for a dense ``(out, in)`` shape, or None when ``ratio`` decides.

        Raises:
            TensorLMError: ``shapes`` has no entry for this shape (the entries are listed).
        """
        if self.a_shape is not None:
            return {"a_shape": tuple(self.a_shape), "b_shape": tuple(self.b_shape), "rank": self.rank}
        if self.shapes is not None:
            key = f"{shape[0]}x{shape[1]}"
            if key not in self.shapes:
                raise TensorLMError(f"module {name!r} has (out, in) = {key}; kronecker 'shapes' lists only "
                                    f"{sorted(self.shapes)}")
            entry = self.shapes[key]
            return {"a_shape": tuple(entry["a_shape"]), "b_shape": tuple(entry["b_shape"]),
                    "rank": int(entry.get("rank", 1))}
        return None


def searched_sides(b_shape, name: str) -> tuple[bool, bool]:
    """Which permutations (rows, columns) the search can find for ``B (m2, n2)``; warns about a side it cannot."""
    rows, cols = (side in SEARCHED_B_SIDES for side in b_shape)
    if not (rows and cols):
        warnings.warn(f"{name}: B {tuple(b_shape)} has a side not in {SEARCHED_B_SIDES}; only the "
                      f"{'row' if rows else 'column' if cols else 'no'} permutation is searched", stacklevel=3)
    return rows, cols


def permute_plan(options: PermuteConfig | None, rows: bool, cols: bool) -> dict | None:
    """The ``LayerPlan.permute`` entry: which sides to search, with the search's bounds; None for none."""
    if options is None or not (rows or cols):
        return None
    return {"rows": rows, "cols": cols, "seed": options.seed, "time_budget_s": options.time_budget_s,
            "max_rounds": options.max_rounds}


def search(w, a_shape, b_shape, rank: int, permute: dict, name: str):
    """Run the permutation search an entry's ``permute`` describes; returns its ``PermutationResult``."""
    return search_permutations(w, a_shape, b_shape, rank, rows=permute["rows"], cols=permute["cols"],
                               seed=permute["seed"], time_budget_s=permute["time_budget_s"],
                               max_rounds=permute["max_rounds"], name=name)


def plan(module: nn.Module, name: str, options: KroneckerConfig, context: PlanContext) -> LayerPlan:
    """Factor shapes and rank from the options (by ``ratio``: the candidate of least error when the
    weights are real, else the smallest ``B``), and which permutations the search will look for.

    Raises:
        TensorLMError: shapes that do not divide the weight, a rank out of range, no ``shapes`` entry.
    """
    out_features, in_features, bias = linear_shape(module)
    dense = (out_features, in_features)
    fact = options.factorisation(dense, name)
    if fact is None:
        weight = dense_weight(module, name)[0] if context.weights else None
        chosen = choose_kronecker_shape(dense, options.ratio, weight=weight)
        fact = {"a_shape": chosen.a_shape, "b_shape": chosen.b_shape, "rank": chosen.rank}
    check_factor_shapes(dense, fact["a_shape"], fact["b_shape"], name)
    shape = KroneckerShape(tuple(fact["a_shape"]), tuple(fact["b_shape"]), int(fact["rank"]))
    if not 1 <= shape.rank <= shape.max_rank:
        raise TensorLMError(f"{name}: Kronecker rank {shape.rank} for {shape.a_shape} x {shape.b_shape} must be "
                            f"in 1..{shape.max_rank}")
    rows, cols = searched_sides(shape.b_shape, name) if options.permute else (False, False)
    permute = permute_plan(options.permute, rows, cols)
    config = {"a_shape": list(shape.a_shape), "b_shape": list(shape.b_shape), "rank": shape.rank, "bias": bias,
              "row_perm": bool(permute and rows), "col_perm": bool(permute and cols)}
    return LayerPlan(name, "kronecker", context.stage, list(dense), "KroneckerLinear", config,
                     {"a": [shape.rank, *shape.a_shape], "b": [shape.rank, *shape.b_shape]}, [shape.rank],
                     out_features * in_features + bias * out_features, shape.params + bias * out_features,
                     permute=permute)


def prepare(module: nn.Module, entry: LayerPlan) -> None:
    """Search the entry's permutations; ``entry.prepared`` holds the result (its factors included)."""
    if entry.permute is not None and entry.prepared is None:
        w, _ = dense_weight(module, entry.name)
        entry.prepared = search(w, entry.config["a_shape"], entry.config["b_shape"], entry.config["rank"],
                                entry.permute, entry.name)


CURVE_POINTS = 33  # ranks at which a whitened curve measures the weighted error (each costs O(m n^2))


def rerank(entry: LayerPlan, rank: int) -> LayerPlan | None:
    """``entry`` with ``rank`` Kronecker terms (what the budget allocator chose), same factor shapes and
    permutation search; None (keep the dense matrix) at a rank whose factors would hold at least as many
    values as ``W``."""
    shape = KroneckerShape(tuple(entry.config["a_shape"]), tuple(entry.config["b_shape"]), rank)
    m, n = entry.dense_shape
    if shape.params >= m * n:
        return None
    bias = entry.config["bias"]
    return LayerPlan(entry.name, entry.method, entry.stage, entry.dense_shape, entry.layer,
                     {**entry.config, "rank": rank}, {"a": [rank, *shape.a_shape], "b": [rank, *shape.b_shape]},
                     [rank], entry.params_before, shape.params + bias * m, options=entry.options,
                     permute=entry.permute)


def rank_curve(module: nn.Module, entry: LayerPlan, stats, normalise: bool = True, floor: float = 0.0) -> RankCurve:
    """Loss of every number of Kronecker terms at the planned factor shapes, from ``floor`` of the dense
    parameters up, for the budget allocator.

    Plain: the SVD tail of ``R(W)``, exactly the Van Loan-Pitsianis error, at every rank. Whitened: the
    weighted squared error ``||(W - W~) G^{1/2}||_F^2`` of the ALS start at ``CURVE_POINTS`` ranks spread
    evenly (:func:`tensorlm.decompose.weighted_kronecker.start_errors`; the build starts there and its sweeps
    only lower it), made non-increasing; relative to ``||W G^{1/2}||_F^2`` when ``normalise``. A
    permutation search runs after the allocation, at the chosen rank; the curve is the unpermuted weight's.
    A last point of loss 0 at the first rank whose factors hold ``m n`` values stands for keeping ``W``
    dense (its cost is charged, so the budget holds).
    """
    w, _ = dense_weight(module, entry.name)
    a_shape, b_shape = tuple(entry.config["a_shape"]), tuple(entry.config["b_shape"])
    m, n = entry.dense_shape
    unit = KroneckerShape(a_shape, b_shape, 1).params
    min_rank, dense = rank_window(m * n, unit, floor)  # dense: the rank that stands for keeping W itself
    if dense == 1:  # even one term costs as much as W
        return RankCurve(entry.name, (1,), (0.0,), unit)
    if not entry.options.get("calibration"):
        s = torch.linalg.svdvals(rearrange(w.detach().to(torch.float64), a_shape, b_shape))
        tails = tail_curve(entry.name, s, unit, normalise=normalise, min_rank=min_rank, max_rank=dense - 1)
        return RankCurve(entry.name, (*tails.ranks, dense), (*tails.losses, 0.0), unit)
    g = second_moment(stats, entry)  # (n, n)
    ranks = sorted({round(min_rank + i * (dense - 1 - min_rank) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)})
    ridge = entry.options.get("ridge", DEFAULT_RIDGE)
    losses = start_errors(w, g, a_shape, b_shape, ranks, ridge=ridge, name=entry.name)
    w64 = w.detach().to(torch.float64)
    total = ((w64 @ with_ridge(g, ridge)) * w64).sum().item()  # ||W G_ridge^{1/2}||_F^2
    if normalise and total > 0:
        losses = [x / total for x in losses]
    return RankCurve(entry.name, (*ranks, dense), (*accumulate(losses, min), 0.0), unit)


def build(module: nn.Module, entry: LayerPlan, stats=None) -> KroneckerLinear:
    """Nearest Kronecker sum of the (permuted) weight; with a search, its factors are used as they are; with
    ``calibration: whitened``, the data-aware sum of the (permuted) weight under its (permuted) ``G``."""
    cfg = entry.config
    calibrated = entry.options.get("calibration")
    if entry.permute is None and not calibrated:
        return KroneckerLinear.from_dense(module, cfg["a_shape"], cfg["b_shape"], cfg["rank"], name=entry.name)
    w, bias = dense_weight(module, entry.name)
    row_perm = col_perm = None
    factors = None
    if entry.permute is not None:
        prepare(module, entry)
        factors = entry.prepared.factors
        row_perm = entry.prepared.row_perm if cfg["row_perm"] else None
        col_perm = entry.prepared.col_perm if cfg["col_perm"] else None
    if calibrated:
        g = second_moment(stats, entry)  # (in, in)
        if row_perm is not None:
            w = w[row_perm]
        if col_perm is not None:
            w, g = w[:, col_perm], permute_second_moment(g, col_perm)
        factors = weighted_kronecker(w, g, cfg["a_shape"], cfg["b_shape"], cfg["rank"],
                                     sweeps=entry.options.get("als_sweeps", 4),
                                     ridge=entry.options.get("ridge", DEFAULT_RIDGE), name=entry.name)
    return KroneckerLinear.from_factors(factors, bias, row_perm, col_perm)


register_method(Method("kronecker", KroneckerConfig, accepts=is_linear, plan=plan, build=build, prepare=prepare,
                       rank_curve=rank_curve, rerank=rerank,
                       plan_reads_weights=lambda options: options.a_shape is None and options.shapes is None))
