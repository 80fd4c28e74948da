"""``kronecker_embedding``: ``E[:, q] ~ A (x) b``, ``A: (V, d/f)``, ``b: (1, f)`` (KnGPT2, TQCompressor).

``calibration: frequency`` minimises ``sum_t f_t ||E_t[q] - A_t (x) b||^2`` with ``f`` the smoothed token
frequency on the calibration text (:func:`~tensorlm.calibrate.frequency_weights`), by
:func:`~tensorlm.decompose.weighted_kronecker.row_weighted_kronecker`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorlm.calibrate import frequency_weights
from tensorlm.decompose.weighted_kronecker import row_weighted_kronecker
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
    permutation first (by weight-space error; with ``calibration`` the factors are then refitted).
    ``calibration``: None (Van Loan-Pitsianis, ``||E[:, q] - A (x) b||_F``) or ``frequency``: rows weighted by
    the smoothed token frequency ``f``, minimising ``sum_t f_t ||E_t[q] - A_t (x) b||^2``; the row weight
    ``diag(f) = diag(f) (x) 1`` is its own nearest Kronecker product, so Van Loan-Pitsianis on
    ``diag(f)^{1/2} E`` mapped back is exact (Van Loan and Pitsianis 1993).
    """

    factor: int = 2
    head: str = "tie"
    permute: PermuteConfig | None = None
    calibration: str | None = None

    def __post_init__(self):
        self.permute = permute_option(self.permute)
        check_head(self.head, "kronecker_embedding")
        if self.calibration not in (None, "frequency"):
            raise TensorLMError(f"kronecker_embedding calibration must be one of [None, 'frequency'], "
                                f"got {self.calibration!r}")


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
    """Nearest ``A (x) b`` of the (column-permuted) table; a search's factors are used as they are, unless
    ``calibration: frequency`` refits them with the rows weighted by token frequency.

    Raises:
        TensorLMError: from the decomposition; with ``frequency``, no token counts for the module in ``stats``.
    """
    if entry.permute is not None:
        prepare(module, entry)
    col_perm = None if entry.permute is None else entry.prepared.col_perm
    if entry.options.get("calibration") == "frequency":
        table = _table(module)
        w = table.weight.detach()  # (V, d)
        w = w if col_perm is None else w[:, col_perm]
        vocab, dim = w.shape
        factor = entry.config["factor"]
        weights = frequency_weights(stats, entry.name, vocab)  # (V,)
        factors = row_weighted_kronecker(w, weights, (vocab, dim // factor), (1, factor), 1, name=entry.name)
        return KroneckerEmbedding.from_factors(factors, col_perm, entry.config["padding_idx"])
    if entry.permute is None:
        return KroneckerEmbedding.from_dense(module, entry.config["factor"], name=entry.name)
    return KroneckerEmbedding.from_factors(entry.prepared.factors, col_perm, entry.config["padding_idx"])


register_method(Method("kronecker_embedding", KroneckerEmbeddingConfig, accepts=accepts, plan=plan, build=build,
                       prepare=prepare, tied_head=tie_by_option))
