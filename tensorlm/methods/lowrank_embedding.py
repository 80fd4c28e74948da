"""``lowrank_embedding``: truncated SVD of a token table, ``E ~ U V`` (``U (V, r)``, ``V (r, d)``).

The ``lowrank`` method takes linear maps only; this is its token-table twin, the baseline every
embedding method is compared with at equal parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorlm.decompose.lowrank import rank_for_ratio
from tensorlm.errors import TensorLMError
from tensorlm.layers.lowrank_embedding import LowRankEmbedding
from tensorlm.methods.registry import Method, PlanContext, check_head, register_method, tie_by_option
from tensorlm.plan import LayerPlan


@dataclass
class LowRankEmbeddingConfig:
    """``lowrank_embedding``: ``E ~ U V`` at a fixed ``rank`` or a parameter ``ratio`` (the fraction of the
    table's ``V d`` values kept, in (0, 1): the largest ``r`` with ``r (V + d) <= ratio V d``).
    ``head``: ``tie`` (logits ``(h V^T) U^T`` from the factors) or ``untie`` (the dense head stays)."""

    rank: int | None = None
    ratio: float | None = None
    head: str = "tie"

    def __post_init__(self):
        if (self.rank is None) == (self.ratio is None):
            raise TensorLMError("lowrank_embedding options need exactly one of rank or ratio")
        check_head(self.head, "lowrank_embedding")


def accepts(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def plan(module: nn.Module, name: str, options: LowRankEmbeddingConfig, context: PlanContext) -> LayerPlan:
    """``table: (V, r)``, ``v: (r, d)``: ``r (V + d)`` parameters.

    Raises:
        TensorLMError: a rank outside ``1..min(V, d)``, a ratio outside (0, 1).
    """
    vocab, dim = module.num_embeddings, module.embedding_dim
    rank = options.rank if options.rank is not None else rank_for_ratio((vocab, dim), options.ratio)
    if not 1 <= rank <= min(vocab, dim):
        raise TensorLMError(f"{name} ({vocab}, {dim}): SVD rank {rank} must be in 1..{min(vocab, dim)}")
    config = {"num_embeddings": vocab, "embedding_dim": dim, "rank": rank, "padding_idx": module.padding_idx}
    return LayerPlan(name, "lowrank_embedding", context.stage, [vocab, dim], "LowRankEmbedding", config,
                     {"table": [vocab, rank], "v": [rank, dim]}, [rank], vocab * dim, rank * (vocab + dim))


def build(module: nn.Module, entry: LayerPlan, stats=None) -> LowRankEmbedding:
    """Truncated SVD of the table at the planned rank."""
    return LowRankEmbedding.from_dense(module, entry.config["rank"], name=entry.name)


register_method(Method("lowrank_embedding", LowRankEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       tied_head=tie_by_option))
