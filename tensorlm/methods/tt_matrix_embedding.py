"""``tt_matrix_embedding``: the token table as a TT-matrix that factors the vocabulary axis too
(Hrinchuk et al., "Tensorized Embedding Layers", 2020), initialised by TT-SVD of the padded table."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from tensorlm.calibrate import frequency_weights
from tensorlm.decompose.tt import default_shape, rank_caps, suggest_shape
from tensorlm.errors import TensorLMError
from tensorlm.layers.tt_matrix import TTMatrixEmbedding
from tensorlm.methods.registry import Method, PlanContext, check_head, register_method, tie_by_option
from tensorlm.plan import LayerPlan


@dataclass
class TTMatrixEmbeddingConfig:
    """``tt_matrix_embedding``: cores ``(r_{k-1}, v_k, d_k, r_k)`` over ``V' = prod vocab_shape >= V`` padded
    rows and ``d = prod dim_shape`` columns.

    ``vocab_shape``/``dim_shape``: the factorisations (default: ``n_modes`` balanced factors each, the
    vocabulary padded when it factors badly); ``ranks``: fixed internal TT-ranks (one int or ``N-1``);
    ``eps``: relative tolerance over the whole padded table (with ``ranks`` as caps). ``head``: ``tie``
    (logits from the cores) or ``untie`` (the dense head stays). ``calibration``: None or ``frequency``
    (minimise ``sum_t f_t ||e_t - e~_t||^2``, ``f`` the smoothed token frequency on the calibration text,
    through its nearest Kronecker product over the vocabulary modes;
    :func:`~tensorlm.decompose.weighted_tt.row_weighted_tt_matrix`).
    """

    vocab_shape: list[int] | None = None
    dim_shape: list[int] | None = None
    ranks: int | list[int] | None = None
    eps: float | None = None
    n_modes: int = 3
    head: str = "tie"
    calibration: str | None = None

    def __post_init__(self):
        if self.ranks is None and self.eps is None:
            raise TensorLMError("tt_matrix_embedding options need ranks, eps, or both")
        if self.calibration not in (None, "frequency"):
            raise TensorLMError(f"tt_matrix_embedding calibration must be one of [None, 'frequency'], "
                                f"got {self.calibration!r}")
        check_head(self.head, "tt_matrix_embedding")
        if self.eps is not None and not 0 < self.eps < 1:
            raise TensorLMError(f"tt_matrix_embedding eps must lie in (0, 1), got {self.eps}")


def accepts(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def plan(module: nn.Module, name: str, options: TTMatrixEmbeddingConfig, context: PlanContext) -> LayerPlan:
    """Cores ``(r_{k-1}, v_k, d_k, r_k)``: ``sum_k r_{k-1} v_k d_k r_k`` parameters, the padded rows included;
    with ``eps`` the ranks are caps the data may lower (``exact=False``).

    Raises:
        TensorLMError: shapes of different lengths, ``prod(vocab_shape) < V`` or ``prod(dim_shape) != d``, bad ranks.
    """
    vocab, dim = module.num_embeddings, module.embedding_dim
    vocab_shape = list(options.vocab_shape or default_shape(vocab, options.n_modes))
    dim_shape = list(options.dim_shape or suggest_shape(dim, len(vocab_shape)))
    if len(vocab_shape) != len(dim_shape) or math.prod(vocab_shape) < vocab or math.prod(dim_shape) != dim:
        raise TensorLMError(f"{name} ({vocab}, {dim}): tt_matrix_embedding vocab_shape {tuple(vocab_shape)} x "
                            f"dim_shape {tuple(dim_shape)} does not fit; need equal lengths, prod(vocab_shape) >= "
                            f"{vocab} and prod(dim_shape) == {dim}")
    ranks = rank_caps([v * d for v, d in zip(vocab_shape, dim_shape, strict=True)], options.ranks)
    full = [1, *ranks, 1]
    modes = enumerate(zip(vocab_shape, dim_shape, strict=True))
    factors = {f"core{k}": [full[k], v, d, full[k + 1]] for k, (v, d) in modes}
    config = {"num_embeddings": vocab, "embedding_dim": dim, "vocab_shape": vocab_shape, "dim_shape": dim_shape,
              "ranks": ranks, "padding_idx": module.padding_idx}
    return LayerPlan(name, "tt_matrix_embedding", context.stage, [vocab, dim], "TTMatrixEmbedding", config, factors,
                     ranks, vocab * dim, sum(math.prod(shape) for shape in factors.values()),
                     exact=options.eps is None)


def build(module: nn.Module, entry: LayerPlan, stats=None) -> TTMatrixEmbedding:
    """TT-SVD of the zero-padded table at the planned shapes, with the options' ranks and tolerance; rows
    weighted by the smoothed token frequency in ``stats`` with ``calibration: frequency``.

    Raises:
        TensorLMError: from TT-SVD; with ``frequency``, no token counts for the module in ``stats``.
    """
    cfg = entry.config
    weights = None
    if entry.options.get("calibration") == "frequency":
        weights = frequency_weights(stats, entry.name, cfg["num_embeddings"])  # (V,)
    return TTMatrixEmbedding.from_dense(module, cfg["vocab_shape"], cfg["dim_shape"], ranks=entry.options["ranks"],
                                        eps=entry.options["eps"], row_weights=weights)


register_method(Method("tt_matrix_embedding", TTMatrixEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       tied_head=tie_by_option))
