"""``lowrank``: truncated SVD ``W ~ U V``, the baseline every tensor method is compared with; with
``calibration: whitened``, SVD-LLM's data-aware truncation of ``W G^{1/2}``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tensorlm.decompose.allocation import RankCurve, lowrank_curve, rank_window
from tensorlm.decompose.lowrank import rank_for_ratio
from tensorlm.decompose.whitening import truncate_basis, whitened_basis, whitened_svd
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import dense_weight
from tensorlm.layers.lowrank import LowRankLinear
from tensorlm.methods.registry import (
    Method,
    PlanContext,
    check_calibration,
    is_linear,
    linear_shape,
    register_method,
    second_moment,
)
from tensorlm.plan import LayerPlan


@dataclass
class LowRankConfig:
    """``lowrank``: truncated SVD ``W ~ U V`` with a fixed ``rank`` or a parameter ``ratio``.

    ``calibration``: None (plain SVD, minimises ``||W - U V||_F``) or ``whitened`` (minimises
    ``||(W - U V) G^{1/2}||_F`` with ``G`` the second moment of the layer's inputs on calibration text;
    SVD-LLM, Wang et al., arXiv 2403.07378, Theorem 3.2). Under a stage ``budget`` the rank or ratio is
    the starting point that ``tensorlm plan`` shows; the allocator then chooses every rank.
    """

    rank: int | None = None
    ratio: float | None = None
    calibration: str | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.ratio is None):
            raise TensorLMError("lowrank options need exactly one of rank or ratio")
        check_calibration(self.calibration, "lowrank")


def plan(module: nn.Module, name: str, options: LowRankConfig, context: PlanContext) -> LayerPlan:
    """``u: (out, r)``, ``v: (r, in)``: ``r (in + out)`` weights (+ the bias).

    Raises:
        TensorLMError: a rank outside ``1..min(out, in)`` or a ratio outside (0, 1).
    """
    out_features, in_features, bias = linear_shape(module)
    rank = options.rank if options.rank is not None else rank_for_ratio((out_features, in_features), options.ratio)
    if not 1 <= rank <= min(out_features, in_features):
        raise TensorLMError(f"{name} {(out_features, in_features)}: SVD rank {rank} must be in "
                            f"1..{min(out_features, in_features)}")
    config = {"in_features": in_features, "out_features": out_features, "rank": rank, "bias": bias}
    return LayerPlan(name, "lowrank", context.stage, [out_features, in_features], "LowRankLinear", config,
                     {"u": [out_features, rank], "v": [rank, in_features]}, [rank],
                     (in_features + bias) * out_features, rank * (in_features + out_features) + bias * out_features)


def rerank(entry: LayerPlan, rank: int) -> LayerPlan | None:
    """``entry`` at another rank (what the budget allocator chose); None (keep the dense matrix) at a rank
    whose factors would hold at least as many values as ``W``."""
    out_features, in_features = entry.dense_shape
    if rank * (in_features + out_features) >= in_features * out_features:
        return None
    bias = entry.config["bias"]
    return LayerPlan(entry.name, entry.method, entry.stage, entry.dense_shape, entry.layer,
                     {**entry.config, "rank": rank}, {"u": [out_features, rank], "v": [rank, in_features]}, [rank],
                     entry.params_before, rank * (in_features + out_features) + bias * out_features,
                     options=entry.options, prepared=entry.prepared)


def rank_curve(module: nn.Module, entry: LayerPlan, stats, normalise: bool = True, floor: float = 0.0) -> RankCurve:
    """Loss of every rank from ``floor`` of the dense parameters up: the tail energy of the singular values of
    ``W G^{1/2}`` (whitened) or of ``W``, and a last point of loss 0 at the first rank whose factors would
    hold as many values as ``W`` itself, which stands for keeping ``W`` dense (its cost ``r (m + n) >= m n``
    is charged, so the budget holds). A whitened basis is kept in ``entry.prepared`` for the build."""
    w, _ = dense_weight(module, entry.name)
    if entry.options.get("calibration"):
        basis, s = whitened_basis(w, second_moment(stats, entry), entry.name)  # (out, k), (k,)
        entry.prepared = basis
    else:
        s = torch.linalg.svdvals(w.to(torch.float64))
    m, n = entry.dense_shape
    min_rank, dense = rank_window(m * n, m + n, floor)  # dense: the rank that stands for keeping W itself
    tails = lowrank_curve(entry.name, s, (m, n), normalise=normalise, min_rank=min_rank, max_rank=dense - 1)
    return RankCurve(entry.name, (*tails.ranks, dense), (*tails.losses, 0.0), m + n)


def build(module: nn.Module, entry: LayerPlan, stats=None) -> LowRankLinear:
    """Truncated SVD at the planned rank, whitened by the calibration statistics when the options ask (from
    the basis the allocation computed, when there was one)."""
    if not entry.options.get("calibration"):
        return LowRankLinear.from_dense(module, rank=entry.config["rank"], name=entry.name)
    w, bias = dense_weight(module, entry.name)
    if entry.prepared is not None:
        u = entry.prepared  # (out, k) left singular vectors of W G^{1/2}
        found = truncate_basis(w, u, torch.zeros(u.shape[1], dtype=u.dtype), entry.config["rank"])
    else:
        found = whitened_svd(w, second_moment(stats, entry), entry.config["rank"], entry.name)
    entry.prepared = None  # the basis is used once; free it
    return LowRankLinear.from_factors(found.u, found.v, bias)


register_method(Method("lowrank", LowRankConfig, accepts=is_linear, plan=plan, build=build, rank_curve=rank_curve,
                       rerank=rerank))
