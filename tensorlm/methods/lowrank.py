"""``lowrank``: truncated SVD ``W ~ U V``, the baseline every tensor method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorlm.decompose.lowrank import rank_for_ratio
from tensorlm.errors import TensorLMError
from tensorlm.layers.lowrank import LowRankLinear
from tensorlm.methods.registry import Method, PlanContext, is_linear, linear_shape, register_method
from tensorlm.plan import LayerPlan


@dataclass
class LowRankConfig:
    """``lowrank``: truncated SVD ``W ~ U V`` with a fixed ``rank`` or a parameter ``ratio``."""

    rank: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.ratio is None):
            raise TensorLMError("lowrank options need exactly one of rank or ratio")


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


def build(module: nn.Module, entry: LayerPlan, stats=None) -> LowRankLinear:
    """Truncated SVD at the planned rank."""
    return LowRankLinear.from_dense(module, rank=entry.config["rank"], name=entry.name)


register_method(Method("lowrank", LowRankConfig, accepts=is_linear, plan=plan, build=build))
