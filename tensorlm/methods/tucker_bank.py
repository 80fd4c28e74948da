"""``tucker_bank``: all targets cut into ``D x D`` blocks sharing one Tucker decomposition (Ren, Wang et al.)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tensorlm.decompose.tucker import BankFactors, bank_parameter_count, block_layout, check_ranks
from tensorlm.decompose.weighted_tucker import weighted_tucker_bank
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import dense_weight
from tensorlm.layers.tucker import bank_from_dense, default_bank_id, layers_from_factors
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
class TuckerBankConfig:
    """``tucker_bank``: all targets cut into ``D x D`` blocks sharing one Tucker decomposition
    ``W_i ~ U (sum_j P[i, j] C_j) V^T`` with ranks ``(l, d)`` (Ren, Wang et al., ICLR 2022), fitted by HOOI.
    ``block_size``: ``D`` (default: the smallest weight dimension, the hidden size).

    ``calibration``: None (HOOI, minimises ``sum_i ||W_i - W~_i||_F^2``) or ``whitened``: minimises the
    summed output error ``sum_i alpha_i ||(W_i - W~_i) G_i^{1/2}||_F^2`` (``G_i`` the second moment of matrix
    ``i``'s inputs on calibration text) by a whitened HOOI start and block-coordinate refinement with the
    full ``G_i`` (:mod:`tensorlm.decompose.weighted_tucker`; ours, after SVD-LLM's objective, Wang et al.,
    arXiv 2403.07378). ``normalise``: ``alpha_i = 1 / ||W_i G_i^{1/2}||_F^2`` (``G_i = I`` without
    calibration), so that the fit minimises the sum of the matrices' squared relative errors and no matrix
    of small norm (k_proj) is left out of the bank; it changes the plain fit too, hence off by default.
    ``sweeps``: refinement sweeps of a calibrated or normalised fit. Parameter counts do not depend on
    these three options.
    """

    ranks: list[int] = field(default_factory=list)
    block_size: int | None = None
    n_iter_max: int = 10
    seed: int = 0
    calibration: str | None = None
    normalise: bool = False
    sweeps: int = 4

    def __post_init__(self):
        if len(self.ranks) != 2:
            raise TensorLMError(f"tucker_bank ranks must be [l, d], got {self.ranks!r}")
        check_calibration(self.calibration, "tucker_bank")
        if self.sweeps < 0:
            raise TensorLMError(f"tucker_bank sweeps must be >= 0, got {self.sweeps}")


def plan(modules: dict[str, nn.Module], options: TuckerBankConfig, context: PlanContext
         ) -> tuple[list[LayerPlan], dict[str, int]]:
    """One entry per weight (its rows of ``P: (n_blocks, l)`` and its bias) and the bank shared by all
    (``U, V: (D, d)``, ``C: (l, d, d)``), counted once under the bank's id.

    Raises:
        TensorLMError: a dimension not a multiple of ``D``, ranks out of range.
    """
    shapes = {name: linear_shape(module) for name, module in modules.items()}
    layout = block_layout({name: shape[:2] for name, shape in shapes.items()}, options.block_size)
    rank_blocks, rank = options.ranks
    check_ranks(layout.n_blocks, layout.block_size, rank_blocks, rank)
    bank = {"id": default_bank_id(list(modules)), "block_size": layout.block_size, "rank_blocks": rank_blocks,
            "rank": rank}
    entries = []
    for name, (out_features, in_features, bias) in shapes.items():
        rows, cols = layout.grid(name)
        config = {"in_features": in_features, "out_features": out_features, "bias": bias, "bank": bank}
        entries.append(LayerPlan(name, "tucker_bank", context.stage, [out_features, in_features], "BankLinear",
                                 config, {"P": [rows * cols, rank_blocks]}, [rank_blocks, rank],
                                 (in_features + bias) * out_features, rows * cols * rank_blocks + bias * out_features,
                                 group=bank["id"]))
    shared = bank_parameter_count(0, layout.block_size, rank_blocks, rank)
    return entries, {bank["id"]: shared}


def build(modules: dict[str, nn.Module], entries: list[LayerPlan], stats=None) -> dict[str, nn.Module]:
    """Fit the one bank by HOOI (or exactly, at full ranks) and slice it into one layer per weight; with
    ``calibration`` or ``normalise``, by :func:`tensorlm.decompose.weighted_tucker.weighted_tucker_bank` on
    the second moments in ``stats`` (``G = I`` without calibration).

    Raises:
        TensorLMError: a calibrated stage without statistics for one of its modules, or see ``bank_from_dense``.
    """
    bank, options = entries[0].config["bank"], entries[0].options
    ranks = (bank["rank_blocks"], bank["rank"])
    if not options.get("calibration") and not options.get("normalise"):
        return bank_from_dense(modules, ranks=ranks, block_size=bank["block_size"], n_iter_max=options["n_iter_max"],
                               seed=options["seed"], bank_id=bank["id"])
    dense = {name: dense_weight(module, name) for name, module in modules.items()}
    weights = {name: weight for name, (weight, _) in dense.items()}
    moments = {e.name: second_moment(stats, e) for e in entries} if options.get("calibration") else None
    fit = weighted_tucker_bank(weights, moments, ranks, block_size=bank["block_size"], normalise=options["normalise"],
                               n_iter_max=options["n_iter_max"], sweeps=options["sweeps"], seed=options["seed"])
    like = next(iter(weights.values()))
    factors = BankFactors(*(getattr(fit.factors, k).to(like) for k in ("U", "V", "C", "P")))
    return layers_from_factors({name: bias for name, (_, bias) in dense.items()}, factors, fit.layout, bank["id"])


register_method(Method("tucker_bank", TuckerBankConfig, accepts=is_linear, plan=plan, build=build, joint=True))
