"""``tt_embedding``: every row of the table as a matrix product state by TT-SVD (TensorGPT).

With ``eps`` (TensorGPT's per-row tolerance) each row keeps its own smallest ranks and is stored at them
(:meth:`~tensorlm.layers.tt.RaggedTTEmbedding.from_tolerance`): the count is known after the data only, and
the plan shows the caps' count as an upper bound (``exact=False``).
``calibration: frequency`` lets the ranks vary per row (:class:`~tensorlm.layers.tt.RaggedTTEmbedding`):
the same parameters as the uniform ``ranks`` plan, spread to minimise ``sum_t f_t ||E_t - E~_t||^2`` with
``f`` the smoothed token frequency on the calibration text (:func:`~tensorlm.calibrate.frequency_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorlm.calibrate import frequency_weights
from tensorlm.decompose.tt import rank_caps, rank_ladder, suggest_shape, tt_parameter_count
from tensorlm.errors import TensorLMError
from tensorlm.layers.tt import RaggedTTEmbedding, TTEmbedding
from tensorlm.methods.registry import Method, PlanContext, check_head, register_method, tie_by_option
from tensorlm.plan import LayerPlan


@dataclass
class TTEmbeddingConfig:
    """``tt_embedding``: every row of the table as a matrix product state by TT-SVD (TensorGPT).

With ``eps`` (TensorGPT's per-row tolerance) each row keeps its own smallest ranks and is stored at them
(:meth:`~tensorlm.layers.tt.RaggedTTEmbedding.from_tolerance`): the count is known after the data only, and
the plan shows the caps' count as an upper bound (``exact=False``).
    ``shape``: tensorisation of ``d`` (default: the most balanced with ``n_modes`` factors);
    ``ranks``: fixed internal TT-ranks (one int or ``N-1`` ints); ``eps``: per-row relative tolerance
    in (0, 1) (with ``ranks`` as caps), every row stored at its own ranks. ``head``: ``tie`` or ``untie``, as
    for Kronecker embeddings.
    ``calibration``: None, or ``frequency``: ragged per-row ranks (rank classes ``r = 1 .. max``, see
    :func:`~tensorlm.decompose.tt.rank_ladder`) in exactly the parameters of the uniform ``ranks`` plan,
    ``V * sum_k r_{k-1} I_k r_k``, chosen to minimise the frequency-weighted squared error (needs ``ranks``,
    not ``eps``).
    """

    shape: list[int] | None = None
    ranks: int | list[int] | None = None
    eps: float | None = None
    n_modes: int = 3
    head: str = "tie"
    calibration: str | None = None

    def __post_init__(self):
        if self.ranks is None and self.eps is None:
            raise TensorLMError("tt_embedding options need ranks, eps, or both")
        check_head(self.head, "tt_embedding")
        if self.calibration not in (None, "frequency"):
            raise TensorLMError(f"tt_embedding calibration must be one of [None, 'frequency'], "
                                f"got {self.calibration!r}")
        if self.calibration == "frequency" and (self.ranks is None or self.eps is not None):
            raise TensorLMError("tt_embedding calibration 'frequency' needs ranks (the uniform plan whose parameter "
                                "count it keeps) and no eps")


def accepts(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def plan(module: nn.Module, name: str, options: TTEmbeddingConfig, context: PlanContext) -> LayerPlan:
    """Cores ``(V, r_{k-1}, I_k, r_k)``; with ``eps`` one ragged ``values`` of at most the caps' count: the
    ranks are caps the data lowers row by row (``exact=False``).

    Raises:
        TensorLMError: a shape whose product is not ``d``, bad ranks.
    """
    vocab, dim = module.num_embeddings, module.embedding_dim
    shape = list(suggest_shape(dim, options.n_modes) if options.shape is None else options.shape)
    ranks = rank_caps(shape, options.ranks)
    if options.calibration == "frequency":
        return _ragged_plan(module, name, shape, ranks, context)
    if options.eps is not None:
        bound = vocab * tt_parameter_count(shape, ranks)
        config = {"num_embeddings": vocab, "embedding_dim": dim, "shape": shape, "classes": [ranks],
                  "stored": bound, "padding_idx": module.padding_idx}  # the skeleton: every row at the caps
        return LayerPlan(name, "tt_embedding", context.stage, [vocab, dim], "RaggedTTEmbedding", config,
                         {"values": [bound]}, ranks, vocab * dim, bound, exact=False)
    full = [1, *ranks, 1]
    config = {"num_embeddings": vocab, "embedding_dim": dim, "shape": shape, "ranks": ranks,
              "padding_idx": module.padding_idx}
    factors = {f"core{k}": [vocab, full[k], size, full[k + 1]] for k, size in enumerate(shape)}
    return LayerPlan(name, "tt_embedding", context.stage, [vocab, dim], "TTEmbedding", config, factors, ranks,
                     vocab * dim, vocab * tt_parameter_count(shape, ranks))


def _ragged_plan(module: nn.Module, name: str, shape: list[int], ranks: list[int], context: PlanContext) -> LayerPlan:
    """``calibration: frequency``: one flat ``values`` parameter of the uniform plan's count ``V * cost(ranks)``;
    the ranks shown are the uniform plan's (each row's own come from the data at build)."""
    vocab, dim = module.num_embeddings, module.embedding_dim
    stored = vocab * tt_parameter_count(shape, ranks)
    config = {"num_embeddings": vocab, "embedding_dim": dim, "shape": shape, "classes": rank_ladder(shape),
              "stored": stored, "padding_idx": module.padding_idx}
    return LayerPlan(name, "tt_embedding", context.stage, [vocab, dim], "RaggedTTEmbedding", config,
                     {"values": [stored]}, ranks, vocab * dim, stored)


def build(module: nn.Module, entry: LayerPlan, stats=None) -> TTEmbedding | RaggedTTEmbedding:
    """TT-SVD of every row at the planned shape: at the options' ranks; with ``eps``, each row at its own
    smallest ranks within the caps; with ``calibration: frequency``, ragged ranks weighted by the smoothed token
    frequency in ``stats``.

    Raises:
        TensorLMError: from TT-SVD; with ``frequency``, no token counts for the module in ``stats``.
    """
    if entry.options.get("calibration") == "frequency":
        cfg = entry.config
        weights = frequency_weights(stats, entry.name, cfg["num_embeddings"])  # (V,)
        return RaggedTTEmbedding.from_dense(module, cfg["shape"], cfg["stored"], weights, cfg["classes"],
                                            reference=entry.ranks)
    if entry.options["eps"] is not None:
        return RaggedTTEmbedding.from_tolerance(module, entry.config["shape"], entry.options["eps"], entry.ranks)
    return TTEmbedding.from_dense(module, shape=entry.config["shape"], ranks=entry.options["ranks"])


register_method(Method("tt_embedding", TTEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       tied_head=tie_by_option))
