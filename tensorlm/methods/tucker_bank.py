"""``tucker_bank``: all targets cut into ``D x D`` blocks sharing one Tucker decomposition (Ren, Wang et al.)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tensorlm.decompose.tucker import bank_parameter_count, block_layout, check_ranks
from tensorlm.errors import TensorLMError
from tensorlm.layers.tucker import bank_from_dense, default_bank_id
from tensorlm.methods.registry import Method, PlanContext, is_linear, linear_shape, register_method
from tensorlm.plan import LayerPlan


@dataclass
class TuckerBankConfig:
    """``tucker_bank``: all targets cut into ``D x D`` blocks sharing one Tucker decomposition
    ``W_i ~ U (sum_j P[i, j] C_j) V^T`` with ranks ``(l, d)`` (Ren, Wang et al., ICLR 2022), fitted by HOOI.
    ``block_size``: ``D`` (default: the smallest weight dimension, the hidden size)."""

    ranks: list[int] = field(default_factory=list)
    block_size: int | None = None
    n_iter_max: int = 10
    seed: int = 0

    def __post_init__(self):
        if len(self.ranks) != 2:
            raise TensorLMError(f"tucker_bank ranks must be [l, d], got {self.ranks!r}")


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
    """Fit the one bank by HOOI (or exactly, at full ranks) and slice it into one layer per weight."""
    bank = entries[0].config["bank"]
    return bank_from_dense(modules, ranks=(bank["rank_blocks"], bank["rank"]), block_size=bank["block_size"],
                           n_iter_max=entries[0].options["n_iter_max"], seed=entries[0].options["seed"],
                           bank_id=bank["id"])


register_method(Method("tucker_bank", TuckerBankConfig, accepts=is_linear, plan=plan, build=build, joint=True))
