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

``dense_rows: K`` (with either calibration) splits the table by frequency, as adaptive input representations
do (Baevski & Auli, ICLR 2019): the ``K`` most frequent tokens on the calibration text keep their rows
exactly, the rest are the weighted truncated SVD above. Under Zipf's law a few thousand rows carry most of
``f``, so at equal parameters the weighted error falls several times; the rare tokens pay for it. SmolLM2-135M's
tied table at 2x (``benchmarks/results/embeddings.json``, wt2-16k perplexity, dense 18.75): 70.99 without a
split, 26.42 with half the budget on dense rows and token counts on 2.1M tokens (``count_samples``).
"""

from __future__ import annotations

import math
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
    ``head: tie``). ``dense_rows``: keep the ``K`` most frequent tokens' rows exactly (needs a calibration);
    a ``ratio`` then counts them: the largest ``r`` with ``K d + r (V - K + d) <= ratio V d``."""

    rank: int | None = None
    ratio: float | None = None
    head: str = "tie"
    calibration: str | None = None
    dense_rows: int = 0

    def __post_init__(self):
        if (self.rank is None) == (self.ratio is None):
            raise TensorLMError("lowrank_embedding options need exactly one of rank or ratio")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise TensorLMError(f"lowrank_embedding ratio must be in (0, 1), got {self.ratio}")
        check_head(self.head, "lowrank_embedding")
        if self.calibration not in CALIBRATIONS:
            raise TensorLMError(f"lowrank_embedding calibration must be one of {list(CALIBRATIONS)}, "
                                f"got {self.calibration!r}")
        if self.calibration == "frequency-whitened" and self.head != "tie":
            raise TensorLMError("lowrank_embedding calibration 'frequency-whitened' weights the table by its tied "
                                "head's inputs; it needs head: tie (or use calibration: frequency)")
        if self.dense_rows and self.calibration is None:
            raise TensorLMError("lowrank_embedding dense_rows keeps the most frequent tokens on calibration text; "
                                "it needs calibration: frequency or frequency-whitened")


def accepts(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def plan(module: nn.Module, name: str, options: LowRankEmbeddingConfig, context: PlanContext) -> LayerPlan:
    """``table: (V - K, r)``, ``v: (r, d)`` and, with ``K = dense_rows``, ``dense: (K, d)``:
    ``K d + r (V - K + d)`` parameters.

    Raises:
        TensorLMError: ``dense_rows`` outside ``0..V - 1``, a rank outside ``1..min(V - K, d)`` (a ratio too
            small for its dense rows gives rank 0).
    """
    vocab, dim, kept = module.num_embeddings, module.embedding_dim, options.dense_rows
    if not 0 <= kept < vocab:
        raise TensorLMError(f"{name} ({vocab}, {dim}): dense_rows {kept} must be in 0..{vocab - 1}")
    factored = vocab - kept
    if options.rank is not None:
        rank = options.rank
    elif kept:  # the dense rows take K d of the budget
        rank = math.floor((options.ratio * vocab - kept) * dim / (factored + dim))
    else:
        rank = rank_for_ratio((vocab, dim), options.ratio)
    if not 1 <= rank <= min(factored, dim):
        raise TensorLMError(f"{name} ({vocab}, {dim}): SVD rank {rank} must be in 1..{min(factored, dim)}"
                            + (f" with {kept} dense rows ({kept * dim:,} of the budget)" if kept else ""))
    config = {"num_embeddings": vocab, "embedding_dim": dim, "rank": rank, "padding_idx": module.padding_idx,
              "dense_rows": kept}
    shapes = {"table": [factored, rank], "v": [rank, dim], **({"dense": [kept, dim]} if kept else {})}
    return LayerPlan(name, "lowrank_embedding", context.stage, [vocab, dim], "LowRankEmbedding", config,
                     shapes, [rank], vocab * dim, kept * dim + rank * (factored + dim))


def build(module: nn.Module, entry: LayerPlan, stats=None) -> LowRankEmbedding:
    """Truncated SVD of the table at the planned rank, weighted as ``calibration`` asks.

    Raises:
        TensorLMError: a calibrated entry without its token counts (or, ``frequency-whitened``, without the
            tied head's second moment) in ``stats``.
    """
    how, kept = entry.options.get("calibration"), entry.config.get("dense_rows", 0)
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
                                       head_moment=head, dense_rows=kept)


register_method(Method("lowrank_embedding", LowRankEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       tied_head=tie_by_option))
