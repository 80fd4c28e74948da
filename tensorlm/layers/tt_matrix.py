"""TT-matrix token table: the vocabulary axis is factored too (Hrinchuk et al., "Tensorized Embedding
Layers", Findings of EMNLP 2020).

The table ``E (V, d)``, zero-padded to ``V' = v_1 ... v_N >= V`` rows, with ``d = d_1 ... d_N``, is a
TT-matrix: ``E[(i_1..i_N), (j_1..j_N)] = G_1[:, i_1, j_1, :] @ ... @ G_N[:, i_N, j_N, :]`` with cores
``G_k: (r_{k-1}, v_k, d_k, r_k)``, ``r_0 = r_N = 1`` (row-major multi-indices: token ``t`` has the mixed-radix
digits ``t = sum_k i_k prod_{j>k} v_j``). Unlike TensorGPT's one MPS per row (:mod:`tensorlm.layers.tt`),
all rows share the cores, so the parameters ``sum_k r_{k-1} v_k d_k r_k`` grow with ``V`` only through
the small ``v_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tensorlm.decompose.linalg import check_finite
from tensorlm.decompose.tt import Ranks, default_shape, suggest_shape, tt_matrix_svd, tt_matrix_to_full
from tensorlm.decompose.weighted_tt import row_weighted_tt_matrix
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import register_layer


def mixed_radix_digits(ids: torch.Tensor, radices: Sequence[int]) -> list[torch.Tensor]:
    """Digits ``i_1 .. i_N`` of ``ids (n,)`` in the mixed radix ``(v_1..v_N)``, most significant first:
    ``ids = sum_k i_k prod_{j>k} v_j``; each ``(n,)`` int64."""
    digits, rest = [], ids
    for radix in reversed(radices):
        digits.append(rest % radix)
        rest = torch.div(rest, radix, rounding_mode="floor")
    return digits[::-1]


def tt_matrix_rows(cores: Sequence[torch.Tensor], digits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows ``(n, d_1 ... d_N)`` of a TT-matrix for the row multi-indices ``digits`` (N tensors ``(n,)``).

    Token by token the row is ``G_1[:, i_1] ... G_N[:, i_N]`` contracted over the ranks. Core 1 is gathered
    per token (``(n, d_1, r_1)``); every later core is applied by one GEMM per distinct digit value (tokens
    sorted by their digit), so no per-token copy of a ``(r_{k-1}, d_k, r_k)`` core is made. Cost per token
    ``sum_k (d_1 .. d_{k-1}) r_{k-1} d_k r_k`` multiply-adds. Differentiable in the cores.
    """
    first = cores[0]  # (1, v_1, d_1, r_1)
    acc = F.embedding(digits[0], first.reshape(first.shape[1], -1)).reshape(-1, first.shape[2], first.shape[3])
    n = acc.shape[0]  # acc: (n, D, r) with D = d_1 .. d_k
    for core, digit in zip(cores[1:], digits[1:], strict=True):
        r_prev, _, size, r_next = core.shape
        order = torch.argsort(digit, stable=True)  # (n,)
        values, counts = torch.unique_consecutive(digit[order], return_counts=True)
        sorted_acc = acc[order]  # (n, D, r_prev)
        parts = [block.reshape(-1, r_prev) @ core[:, int(v)].reshape(r_prev, size * r_next)  # (m D, d_k r_k)
                 for block, v in zip(torch.split(sorted_acc, counts.tolist()), values.tolist(), strict=True)]
        out = torch.cat(parts).reshape(n, -1, r_next)  # (n, D d_k, r_k) in sorted order
        acc = out[torch.argsort(order)]  # back to the tokens' order
    return acc.reshape(n, -1)  # (n, d)


def _padded_weights(f: torch.Tensor, vocab: int, padded: int) -> torch.Tensor:
    """``f (V,)`` as float64 ``(V',)``, the padded rows (never looked up) at the smallest weight.

    Raises:
        TensorLMError: ``f`` not ``(V,)``, positive and finite.
    """
    f = f.detach().to(torch.float64)
    if f.shape != (vocab,) or not (torch.isfinite(f).all() and (f > 0).all()):
        raise TensorLMError(f"TTMatrixEmbedding.from_dense: row weights {tuple(f.shape)} must be ({vocab},), "
                            "finite and > 0")
    return torch.cat([f, f.min().expand(padded - vocab)])


@register_layer
class TTMatrixEmbedding(nn.Module):
    """A token table ``E (V, d)`` stored as a TT-matrix over ``V' = prod vocab_shape >= V`` padded rows and
    ``d = prod dim_shape`` columns (Hrinchuk et al. 2020, eq. 2-3).

    Parameters: ``cores[k]: (r_{k-1}, v_k, d_k, r_k)``, ``sum_k r_{k-1} v_k d_k r_k`` values (the padded rows
    are part of the cores, so counted). Lookup ``ids (...)`` int64 -> ``(..., d)``: the distinct ids of the
    batch only, each contracted from its digits' slices of the cores (:func:`tt_matrix_rows`). Logits of a
    tied head ``h @ E^T`` form the table once per call (:meth:`project`). ``padding_idx`` is recorded (the
    dense form keeps it) but its row shares the cores, so unlike ``nn.Embedding`` it is not frozen.

    Raises:
        TensorLMError: shapes that do not fit ``(V, d)`` or ranks of the wrong length;
        ``IndexError`` (forward) for an id outside ``[0, V)``, as ``nn.Embedding``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_shape: Sequence[int], dim_shape: Sequence[int],
                 ranks: Sequence[int], padding_idx: int | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        vocab_shape, dim_shape = [int(s) for s in vocab_shape], [int(s) for s in dim_shape]
        ranks = [int(r) for r in ranks]
        if (len(vocab_shape) != len(dim_shape) or len(ranks) != len(dim_shape) - 1 or any(r < 1 for r in ranks)
                or math.prod(dim_shape) != embedding_dim or math.prod(vocab_shape) < num_embeddings):
            raise TensorLMError(f"TTMatrixEmbedding: vocab_shape {tuple(vocab_shape)} (product "
                                f"{math.prod(vocab_shape)}), "
                                f"dim_shape {tuple(dim_shape)} and ranks {ranks} do not fit ({num_embeddings}, "
                                f"{embedding_dim}); need N modes each, N-1 ranks >= 1, prod(vocab_shape) >= V and "
                                "prod(dim_shape) == d")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_shape, self.dim_shape, self.ranks = vocab_shape, dim_shape, ranks
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        full = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(full[k], vocab_shape[k], dim_shape[k], full[k + 1], dtype=dtype))
            for k in range(len(dim_shape)))

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], num_embeddings: int,
                   padding_idx: int | None = None) -> TTMatrixEmbedding:
        """Wrap TT-matrix cores ``(r_{k-1}, v_k, d_k, r_k)`` (e.g. from :func:`tt_matrix_svd`) as a table of
        ``num_embeddings`` rows."""
        vocab_shape, dim_shape = [int(c.shape[1]) for c in cores], [int(c.shape[2]) for c in cores]
        ranks = [int(c.shape[-1]) for c in cores[:-1]]
        layer = cls(num_embeddings, math.prod(dim_shape), vocab_shape, dim_shape, ranks, padding_idx, cores[0].dtype)
        with torch.no_grad():
            for param, core in zip(layer.cores, cores, strict=True):
                param.copy_(core)
        return layer

    @classmethod
    def from_dense(cls, layer: nn.Embedding, vocab_shape: Sequence[int] | None = None,
                   dim_shape: Sequence[int] | None = None, ranks: Ranks = None, eps: float | None = None,
                   n_modes: int = 3, row_weights: torch.Tensor | None = None) -> TTMatrixEmbedding:
        """TT-SVD of the zero-padded table ``(V', d)`` as a TT-matrix (Oseledets 2011, Sec. 4.1), in float64.

        Args:
            layer: an ``nn.Embedding`` (``max_norm`` unsupported).
            vocab_shape: ``(v_1..v_N)``, product ``>= V`` (default :func:`default_shape`: exact when ``V``
                factors well, else padded); dim_shape: ``(d_1..d_N)``, product ``d`` (default
                :func:`suggest_shape`).
            ranks, eps: fixed internal ranks and/or relative tolerance over the whole padded table, as in
                :func:`tt_matrix_svd`; ``None``/``None`` is exact.
            row_weights: ``(V,)`` positive token weights ``f``: the fit minimising ``sum_t f_t ||e_t - e~_t||^2``
                (:func:`~tensorlm.decompose.weighted_tt.row_weighted_tt_matrix`; padded rows get the smallest
                weight) instead of the plain one.

        Raises:
            TensorLMError: not an ``nn.Embedding``, ``max_norm`` set, shapes that do not fit, bad ranks or eps,
                NaN/Inf weights.
        """
        if not isinstance(layer, nn.Embedding) or layer.max_norm is not None:
            raise TensorLMError(f"TTMatrixEmbedding.from_dense: expected nn.Embedding without max_norm, got "
                                f"{type(layer).__name__}")
        weight = layer.weight.detach()  # (V, d)
        check_finite(weight, "embedding")
        vocab, dim = weight.shape
        vocab_shape = list(default_shape(vocab, n_modes) if vocab_shape is None else vocab_shape)
        dim_shape = list(suggest_shape(dim, len(vocab_shape)) if dim_shape is None else dim_shape)
        if math.prod(vocab_shape) < vocab or math.prod(dim_shape) != dim or len(vocab_shape) != len(dim_shape):
            raise TensorLMError(f"TTMatrixEmbedding.from_dense: vocab_shape {tuple(vocab_shape)} x dim_shape "
                                f"{tuple(dim_shape)} does not fit the table {tuple(weight.shape)}")
        padded = weight.new_zeros(math.prod(vocab_shape), dim, dtype=torch.float64)  # (V', d)
        padded[:vocab] = weight
        if row_weights is None:
            cores = tt_matrix_svd(padded, vocab_shape, dim_shape, ranks=ranks, eps=eps)
        else:
            f = _padded_weights(row_weights, vocab, padded.shape[0])  # (V',)
            cores = row_weighted_tt_matrix(padded, f, vocab_shape, dim_shape, ranks=ranks, eps=eps)
        del padded
        return cls.from_cores([c.to(weight.dtype) for c in cores], vocab, layer.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range in self: TTMatrixEmbedding ids span [{int(ids.min())}, "
                             f"{int(ids.max())}], valid [0, {self.num_embeddings})")
        distinct, inverse = torch.unique(ids.reshape(-1), return_inverse=True)  # (u,), (n,)
        rows = tt_matrix_rows(list(self.cores), mixed_radix_digits(distinct, self.vocab_shape))  # (u, d)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)  # (..., d)

    def dense_table(self) -> torch.Tensor:
        """The dense table ``(V, d)`` (contracts the cores; the padded rows are dropped)."""
        return tt_matrix_to_full(list(self.cores))[: self.num_embeddings]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``hidden @ E^T``: ``(..., d)`` -> ``(..., V)``, forming the table once."""
        return hidden @ self.dense_table().T

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding (V, d)``."""
        with torch.no_grad():
            return nn.Embedding.from_pretrained(self.dense_table(), freeze=False, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        stored = sum(c.numel() for c in self.cores)
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_shape={tuple(self.vocab_shape)}, "
                f"dim_shape={tuple(self.dim_shape)}, ranks={self.ranks}, padding_idx={self.padding_idx}, "
                f"ratio={self.num_embeddings * self.embedding_dim / stored:.2f}x")

    def tensorlm_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "vocab_shape": list(self.vocab_shape), "dim_shape": list(self.dim_shape), "ranks": list(self.ranks),
                "padding_idx": self.padding_idx}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> TTMatrixEmbedding:
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], cfg["vocab_shape"], cfg["dim_shape"], cfg["ranks"],
                   cfg["padding_idx"])
