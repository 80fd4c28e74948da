"""``tt_linear``: the weight as a TT-matrix with cores ``(r_{k-1}, m_k, n_k, r_k)`` (Novikov et al. 2015);
``calibration: whitened``, the TT-SVD of ``W`` whitened by a Kronecker-factored input second moment
(:mod:`tensorlm.decompose.weighted_tt`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from tensorlm.decompose.tt import default_shape, rank_caps
from tensorlm.errors import TensorLMError
from tensorlm.layers.tt import TTLinear
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
class TTLinearConfig:
    """``tt_linear``: the weight as a TT-matrix with cores ``(r_{k-1}, m_k, n_k, r_k)`` (TT-SVD).

    ``calibration``: None (minimises ``||W - W~||_F``) or ``whitened`` (``||(W - W~) G^{1/2}||_F``, ``G`` the
    second moment of the layer's inputs on calibration text, through its nearest Kronecker product over the
    input modes; :func:`~tensorlm.decompose.weighted_tt.whitened_tt_matrix`).
    """

    in_shape: list[int] | None = None
    out_shape: list[int] | None = None
    ranks: int | list[int] | None = None
    eps: float | None = None
    n_modes: int = 3
    calibration: str | None = None

    def __post_init__(self):
        if self.ranks is None and self.eps is None:
            raise TensorLMError("tt_linear options need ranks, eps, or both")
        check_calibration(self.calibration, "tt_linear")


def plan(module: nn.Module, name: str, options: TTLinearConfig, context: PlanContext) -> LayerPlan:
    """Tensorisations of both sides (padded when a size factors badly) and TT ranks over the modes ``m_k n_k``.

    Raises:
        TensorLMError: shapes of different lengths or too small for the weight, bad ranks.
    """
    out_features, in_features, bias = linear_shape(module)
    in_shape = list(options.in_shape or default_shape(in_features, options.n_modes))
    out_shape = list(options.out_shape or default_shape(out_features, options.n_modes))
    if len(in_shape) != len(out_shape) or math.prod(in_shape) < in_features or math.prod(out_shape) < out_features:
        raise TensorLMError(f"{name}: TT-matrix out_shape {tuple(out_shape)} x in_shape {tuple(in_shape)} does "
                            f"not fit the weight ({out_features}, {in_features})")
    ranks = rank_caps([m * n for m, n in zip(out_shape, in_shape, strict=True)], options.ranks)
    full = [1, *ranks, 1]
    modes = zip(out_shape, in_shape, strict=True)
    factors = {f"core{k}": [full[k], m, n, full[k + 1]] for k, (m, n) in enumerate(modes)}
    config = {"in_features": in_features, "out_features": out_features, "in_shape": in_shape,
              "out_shape": out_shape, "ranks": ranks, "bias": bias}
    after = sum(math.prod(shape) for shape in factors.values()) + bias * out_features
    return LayerPlan(name, "tt_linear", context.stage, [out_features, in_features], "TTLinear", config, factors,
                     ranks, (in_features + bias) * out_features, after, exact=options.eps is None)


def build(module: nn.Module, entry: LayerPlan, stats=None) -> TTLinear:
    """TT-SVD of the (zero-padded) weight at the planned shapes, with the options' ranks and tolerance; whitened
    by the module's input second moment in ``stats`` with ``calibration: whitened``.

    Raises:
        TensorLMError: from TT-SVD; calibrated without statistics for the module.
    """
    cfg = entry.config
    moment = second_moment(stats, entry) if entry.options.get("calibration") else None
    return TTLinear.from_dense(module, in_shape=cfg["in_shape"], out_shape=cfg["out_shape"],
                               ranks=entry.options["ranks"], eps=entry.options["eps"], second_moment=moment)


register_method(Method("tt_linear", TTLinearConfig, accepts=is_linear, plan=plan, build=build))
