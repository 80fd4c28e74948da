"""``lowrank_embedding``: truncated SVD of a token table, ``E ~ U V`` (``U (V, r)``, ``V (r, d)``).

The ``lowrank`` method takes linear maps only; this is its token-table twin, the baseline every
embedding method is compared with at equal parameters.

Data-aware forms (``calibration``), with ``f`` the smoothed token frequency on the calibration text
(:func:`~tensorlm.calibrate.frequency_weights`) and ``e_t`` row ``t`` of the table:

* ``frequency``: minimise ``sum_t f_t ||e_t - e~_t||^2``, the lookup error of the tokens the text holds;
* ``frequency-whitened`` (a tied head only): minimise ``sum_t f_t ||(e_t - e~_t) G^{1/2}||^2`` with ``G`` the
  second moment of the tied head's inputs (the final hidden states) on the same text: the squared error of
  token ``t``'s logit ``h . e_t`` over those inputs, weighted by how often ``t`` occurs. SVD-LLM's whitening
  (Wang et al. 2024) applied to the head, row-weighted as TensorGPT's frequency-aware variants are. Both are
  closed forms (:meth:`~tensorlm.layers.lowrank_embedding.LowRankEmbedding.from_dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorlm.calibrate import frequency_weights, head_moment_key
from tensorlm.decompose.lowrank import rank_for_ratio
from tensorlm.errors import TensorLMError
from tensorlm.layers.lowrank_embedding import LowRankEmbedding
from tensorlm.methods.registry import Method, PlanContext, check_head, register_method, tie_by_option
from tensorlm.plan import LayerPlan

CALIBRATIONS = (None, "frequency", "frequency-whitened")


@dataclass
class LowRankEmbeddingConfig:
    """``lowrank_embedding``: ``E ~ U V`` at a fixed ``rank`` or a parameter ``ratio`` (the fraction of the
    table's ``V d`` values kept, in (0, 1): the largest ``r`` with ``r (V + d) <= ratio V d``).
    ``head``: ``tie`` (logits ``(h V^T) U^T`` from the factors) or ``untie`` (the dense head stays).
    ``calibration``: None, ``frequency`` or ``frequency-whitened`` (module docstring; the latter needs
    ``head: tie``)."""

    rank: int | None = None
    ratio: float | None = None
    head: str = "tie"
    calibration: str | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.ratio is None):
            raise TensorLMError("lowrank_embedding options need exactly one of rank or ratio")
        check_head(self.head, "lowrank_embedding")
        if self.calibration not in CALIBRATIONS:
            raise TensorLMError(f"lowrank_embedding calibration must be one of {list(CALIBRATIONS)}, "
                                f"got {self.calibration!r}")
        if self.calibration == "frequency-whitened" and self.head != "tie":
            raise TensorLMError("lowrank_embedding calibration 'frequency-whitened' weights the table by its tied "
                                "head's inputs; it needs head: tie (or use calibration: frequency)")


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
    """Truncated SVD of the table at the planned rank, weighted as ``calibration`` asks.

    Raises:
        TensorLMError: a calibrated entry without its token counts (or, ``frequency-whitened``, without the
            tied head's second moment) in ``stats``.
    """
    how = entry.options.get("calibration")
    if how is None:
        return LowRankEmbedding.from_dense(module, entry.config["rank"], name=entry.name)
    weights = frequency_weights(stats, entry.name, module.num_embeddings)  # (V,)
    head = None
    if how == "frequency-whitened":
        found = stats.get(head_moment_key(entry.name))
        if found is None:
            raise TensorLMError(f"{entry.name}: calibration 'frequency-whitened' needs the second moment of the tied "
                                "head's inputs, but the calibration statistics hold none; use tensorlm.compress "
                                "with tokenizer= and data_dir=, or tensorlm run")
        head = found.second_moment  # (d, d)
    return LowRankEmbedding.from_dense(module, entry.config["rank"], name=entry.name, row_weights=weights,
                                       head_moment=head)


register_method(Method("lowrank_embedding", LowRankEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       tied_head=tie_by_option))
