"""``tt_embedding``: every row of the table as a matrix product state by TT-SVD (TensorGPT)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorlm.decompose.tt import rank_caps, suggest_shape, tt_parameter_count
from tensorlm.errors import TensorLMError
from tensorlm.layers.tt import TTEmbedding
from tensorlm.methods.registry import Method, PlanContext, check_head, register_method, tie_by_option
from tensorlm.plan import LayerPlan


@dataclass
class TTEmbeddingConfig:
    """``tt_embedding``: every row of the table as a matrix product state by TT-SVD (TensorGPT).

    ``shape``: tensorisation of ``d`` (default: the most balanced with ``n_modes`` factors);
    ``ranks``: fixed internal TT-ranks (one int or ``N-1`` ints); ``eps``: per-row relative tolerance
    in (0, 1) (with ``ranks`` as caps). ``head``: ``tie`` or ``untie``, as for Kronecker embeddings.
    """

    shape: list[int] | None = None
    ranks: int | list[int] | None = None
    eps: float | None = None
    n_modes: int = 3
    head: str = "tie"

    def __post_init__(self):
        if self.ranks is None and self.eps is None:
            raise TensorLMError("tt_embedding options need ranks, eps, or both")
        check_head(self.head, "tt_embedding")


def accepts(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def plan(module: nn.Module, name: str, options: TTEmbeddingConfig, context: PlanContext) -> LayerPlan:
    """Cores ``(V, r_{k-1}, I_k, r_k)``; with ``eps`` the ranks are caps the data may lower (``exact=False``).

    Raises:
        TensorLMError: a shape whose product is not ``d``, bad ranks.
    """
    vocab, dim = module.num_embeddings, module.embedding_dim
    shape = list(suggest_shape(dim, options.n_modes) if options.shape is None else options.shape)
    ranks = rank_caps(shape, options.ranks)
    full = [1, *ranks, 1]
    config = {"num_embeddings": vocab, "embedding_dim": dim, "shape": shape, "ranks": ranks,
              "padding_idx": module.padding_idx}
    factors = {f"core{k}": [vocab, full[k], size, full[k + 1]] for k, size in enumerate(shape)}
    return LayerPlan(name, "tt_embedding", context.stage, [vocab, dim], "TTEmbedding", config, factors, ranks,
                     vocab * dim, vocab * tt_parameter_count(shape, ranks), exact=options.eps is None)


def build(module: nn.Module, entry: LayerPlan, stats=None) -> TTEmbedding:
    """TT-SVD of every row at the planned shape, with the options' ranks and tolerance."""
    return TTEmbedding.from_dense(module, shape=entry.config["shape"], ranks=entry.options["ranks"],
                                  eps=entry.options["eps"])


register_method(Method("tt_embedding", TTEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       tied_head=tie_by_option))
