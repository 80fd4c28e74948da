"""``kronecker_embedding``: ``E[:, q] ~ A (x) b``, ``A: (V, d/f)``, ``b: (1, f)`` (KnGPT2, TQCompressor)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.layers.kronecker import KroneckerEmbedding
from tensorlm.methods.kronecker import PermuteConfig, permute_option, permute_plan, search
from tensorlm.methods.registry import Method, PlanContext, check_head, register_method, tie_by_option
from tensorlm.plan import LayerPlan


@dataclass
class KroneckerEmbeddingConfig:
    """``kronecker_embedding``: ``E[:, q] ~ A (x) b``, ``b: (1, factor)``.

    ``head``: when the replaced table was tied to the LM head, ``tie`` computes logits from the
    factors, ``untie`` keeps the dense head (TQ's released model). ``permute``: search a column
    permutation first.
    """

    factor: int = 2
    head: str = "tie"
    permute: PermuteConfig | None = None

    def __post_init__(self):
        self.permute = permute_option(self.permute)
        check_head(self.head, "kronecker_embedding")


def accepts(module: nn.Module) -> bool:
    """A dense table, or a Kronecker table whose own table is factored again (TQ's nested stages)."""
    return isinstance(module, nn.Embedding | KroneckerEmbedding)


def plan(module: nn.Module, name: str, options: KroneckerEmbeddingConfig, context: PlanContext) -> LayerPlan:
    """``A: (V, d/f)`` (an ``nn.Embedding``) and ``b: (1, f)``; ``V d / f + f`` parameters.

    Raises:
        TensorLMError: ``factor`` does not divide ``d``.
    """
    vocab, dim = module.num_embeddings, module.embedding_dim
    if options.factor < 1 or dim % options.factor:
        raise TensorLMError(f"KroneckerEmbedding: factor {options.factor} does not divide embedding_dim {dim}")
    width = dim // options.factor
    permute = permute_plan(options.permute, False, True)
    config = {"num_embeddings": vocab, "embedding_dim": dim, "factor": options.factor,
              "padding_idx": module.padding_idx, "col_perm": permute is not None}
    return LayerPlan(name, "kronecker_embedding", context.stage, [vocab, dim], "KroneckerEmbedding", config,
                     {"a": [vocab, width], "b": [1, options.factor]}, [1], sum(p.numel() for p in module.parameters()),
                     vocab * width + options.factor, permute=permute)


def _table(module: nn.Module) -> nn.Embedding:
    return module if isinstance(module, nn.Embedding) else module.to_dense()


def prepare(module: nn.Module, entry: LayerPlan) -> None:
    """Search the column permutation of the table ``(V, d)``; ``entry.prepared`` holds the result."""
    if entry.permute is not None and entry.prepared is None:
        w = _table(module).weight.detach()  # (V, d)
        factor = entry.config["factor"]
        entry.prepared = search(w, (w.shape[0], w.shape[1] // factor), (1, factor), 1, entry.permute, entry.name)


def build(module: nn.Module, entry: LayerPlan, stats=None) -> KroneckerEmbedding:
    """Nearest ``A (x) b`` of the (column-permuted) table; a search's factors are used as they are."""
    if entry.permute is None:
        return KroneckerEmbedding.from_dense(module, entry.config["factor"], name=entry.name)
    prepare(module, entry)
    return KroneckerEmbedding.from_factors(entry.prepared.factors, entry.prepared.col_perm,
                                           entry.config["padding_idx"])


register_method(Method("kronecker_embedding", KroneckerEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       prepare=prepare, tied_head=tie_by_option))
