"""Kronecker-factored linear maps and embeddings (KnGPT2, TQCompressor).

``KroneckerLinear``: ``W[p][:, q] ~ sum_k A_k (x) B_k`` (Edalati et al. 2022, eq. 3; Abronin et al.
2024, sec. 3 for the permutations ``p``, ``q``). ``KroneckerEmbedding``: ``E[:, q] ~ A (x) b`` with
``A: (V, d/f)``, ``b: (1, f)``, nested when ``A`` is itself factored (TQ compresses ``wte`` twice).
"""

from __future__ import annotations

import torch
from torch import nn

from tensorlm.decompose.kronecker import (
    KroneckerFactors,
    KroneckerShape,
    check_factor_shapes,
    kronecker_sum,
    nearest_kronecker,
)
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import TiedHead as TiedHead  # the tied head of every factored table
from tensorlm.layers.base import cached, dense_linear, dense_weight, fill, project, register_layer


def check_permutation(perm: torch.Tensor, length: int, name: str) -> torch.Tensor:
    """Return ``perm`` as int64 after checking it is a bijection of ``range(length)``.

    Raises:
        TensorLMError: wrong shape, wrong length, or repeated/out-of-range entries.
    """
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.numel() != length:
        raise TensorLMError(f"{name}: permutation has shape {tuple(perm.shape)}, expected ({length},)")
    if perm.is_meta:  # a skeleton built for planning holds no values to check
        return perm.to(torch.int64)
    if perm.dtype.is_floating_point or not torch.equal(perm.sort().values.cpu(), torch.arange(length)):
        raise TensorLMError(f"{name}: permutation of length {length} is not a bijection of 0..{length - 1}")
    return perm.to(torch.int64)


def _unpermute(y: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Inverse of gathering with ``perm`` on the last axis: ``out[..., perm] = y``."""
    if perm is None:
        return y
    return torch.zeros_like(y).index_copy(-1, perm, y)


def _contract_b_first(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Y = sum_k A_k (X B_k^T)``: one GEMM with all ``B_k`` (thin), then one GEMM with all ``A_k``.

    ``a: (r, m1, n1)``, ``b: (r, m2, n2)``, ``x: (N, n1, n2)`` -> ``(N, m1, m2)``; copies the
    intermediate ``(N, n1, r, m2)`` once to bring ``(k, j1)`` next to each other.
    """
    (r, m1, n1), (_, m2, n2), n = a.shape, b.shape, x.shape[0]
    if m2 == 1:  # B_k are rows: reduce X over n2, then one GEMM straight to (N, m1), no transposed copy
        if r == 1 and n2 <= 4:  # a few strided multiply-adds beat a GEMM of output width 1
            t = sum(x[:, :, j] * b[0, 0, j] for j in range(n2))  # (N, n1)
        else:
            t = x.reshape(n * n1, n2) @ b.reshape(r, n2).T  # (N*n1, r)
            t = t.reshape(n, n1, r).transpose(1, 2).reshape(n, r * n1)  # (N, r*n1)
        return (t @ a.permute(1, 0, 2).reshape(m1, r * n1).T).reshape(n, m1, 1)  # (N, m1, 1)
    t = x.reshape(n * n1, n2) @ b.permute(2, 0, 1).reshape(n2, r * m2)  # (N*n1, r*m2)
    t = t.reshape(n, n1, r, m2).permute(2, 1, 0, 3).reshape(r * n1, n * m2)  # (r*n1, N*m2)
    y = a.permute(1, 0, 2).reshape(m1, r * n1) @ t  # (m1, N*m2)
    return y.reshape(m1, n, m2).transpose(0, 1)  # (N, m1, m2)


def _contract_a_first(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Y = sum_k (A_k X) B_k^T``: one large GEMM with all ``A_k`` on ``X`` laid out ``(n1, N*n2)`` (a copy
    of the input), then one thin GEMM with all ``B_k``. Shapes as :func:`_contract_b_first`."""
    (r, m1, n1), (_, m2, n2), n = a.shape, b.shape, x.shape[0]
    if n2 == 1:  # B_k are columns: X is (N, n1), one GEMM on it in place, then the outer products with B_k
        t = x.reshape(n, n1) @ a.reshape(r * m1, n1).T  # (N, r*m1)
        if r == 1:  # the outer product by broadcasting (a GEMM of inner size 1 is slower)
            return t.unsqueeze(-1) * b.reshape(1, 1, m2)  # (N, m1, m2)
        t = t.reshape(n, r, m1).transpose(1, 2).reshape(n * m1, r)  # (N*m1, r)
        return (t @ b.reshape(r, m2)).reshape(n, m1, m2)  # (N, m1, m2)
    t = a.reshape(r * m1, n1) @ x.transpose(0, 1).reshape(n1, n * n2)  # (r*m1, N*n2)
    t = t.reshape(r, m1, n, n2).permute(2, 1, 0, 3).reshape(n * m1, r * n2)  # (N*m1, r*n2)
    return (t @ b.permute(0, 2, 1).reshape(r * n2, m2)).reshape(n, m1, m2)  # (N, m1, m2)


def _contract_a_batched(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Y = sum_k (A_k X) B_k^T`` with the ``A`` side as one batched matmul over the ``N`` inputs, reading
    ``x`` in place (no copy of the input; fastest for few tokens). Shapes as :func:`_contract_b_first`."""
    (r, m1, n1), (_, m2, n2), n = a.shape, b.shape, x.shape[0]
    t = torch.matmul(a.reshape(r * m1, n1), x)  # (N, r*m1, n2)
    t = t.reshape(n, r, m1, n2).permute(0, 2, 1, 3).reshape(n * m1, r * n2)  # (N*m1, r*n2)
    return (t @ b.permute(0, 2, 1).reshape(r * n2, m2)).reshape(n, m1, m2)  # (N, m1, m2)


CONTRACTIONS = {"b_first": _contract_b_first, "a_first": _contract_a_first, "a_batched": _contract_a_batched}
"""The factored forwards of :class:`KroneckerLinear` by name; all compute the same ``(N, m1, m2)``."""


@register_layer
class KroneckerLinear(nn.Module):
    """Linear map whose weight is a (row/column-permuted) sum of Kronecker products.

    ``W (m x n) = P^T (sum_k A_k (x) B_k) Q^T``: with integer permutations ``row_perm = p`` (m,) and
    ``col_perm = q`` (n,), ``W[p][:, q] = sum_k A_k (x) B_k``. Forward never forms ``W``:
    ``x_q = x[..., q]`` reshaped to ``X (..., n1, n2)``, ``Y = sum_k A_k X B_k^T (..., m1, m2)``,
    flattened and scattered back to ``y[..., p] = Y``. The contraction ``order`` (one of
    :data:`CONTRACTIONS`: ``B`` first, ``A`` first, or ``A`` first batched over tokens) defaults to the
    smaller multiply-add count; :func:`tensorlm.layers.base.choose_forward` replaces it by the measured
    fastest, and ``tensorlm_config`` stores it.

    Multiply-adds per token: ``B`` first ``r n1 m2 (n2 + m1)``, ``A`` first ``r m1 n2 (n1 + m2)``, dense
    ``m1 m2 n1 n2``: about ``r / n2`` and ``r / m2`` of dense, so a rank-``r`` sum saves time only when
    ``r < max(m2, n2)`` (rank 2 with 2 x 2 ``B`` costs as much as dense).

    Args:
        a_shape: ``(m1, n1)``; b_shape: ``(m2, n2)``; rank: number of terms.
        bias: keep a bias of shape ``(m,)``.
        row_perm, col_perm: optional int64 permutations (validated as bijections).
        order: contraction order (default: the fewer multiply-adds).

    Raises:
        TensorLMError: an unknown ``order``; what :class:`KroneckerShape` and :func:`check_permutation` raise.

    Parameters: ``a (rank, m1, n1)``, ``b (rank, m2, n2)``, ``bias (m,)``; buffers ``row_perm (m,)``,
    ``col_perm (n,)`` (int64, never trained).
    """

    FACTORED_ORDERS = tuple(CONTRACTIONS)

    def __init__(self, a_shape, b_shape, rank: int = 1, bias: bool = True, row_perm=None, col_perm=None,
                 dtype=None, device=None, order: str | None = None):
        super().__init__()
        self.shape = KroneckerShape(tuple(a_shape), tuple(b_shape), int(rank))
        (m1, n1), (m2, n2), r = self.shape.a_shape, self.shape.b_shape, self.shape.rank
        self.out_features, self.in_features = self.shape.dense_shape
        kw = {"dtype": dtype, "device": device}
        self.a = nn.Parameter(torch.empty(r, m1, n1, **kw))
        self.b = nn.Parameter(torch.empty(r, m2, n2, **kw))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None
        for attr, perm, length in (("row_perm", row_perm, self.out_features), ("col_perm", col_perm, self.in_features)):
            value = None if perm is None else check_permutation(perm, length, f"KroneckerLinear.{attr}")
            self.register_buffer(attr, value)
        # flops per token: B first = r*n1*n2*m2 + r*m1*n1*m2; A first = r*m1*n1*n2 + r*m1*n2*m2
        b_first = n1 * n2 * m2 + m1 * n1 * m2 <= m1 * n1 * n2 + m1 * n2 * m2
        self.order = order or ("b_first" if b_first else "a_first")
        if self.order not in CONTRACTIONS:
            raise TensorLMError(f"KroneckerLinear: order {self.order!r} is not one of {tuple(CONTRACTIONS)}")

    @classmethod
    def from_dense(cls, layer: nn.Module, a_shape, b_shape, rank: int = 1, row_perm=None, col_perm=None,
                   name: str = "") -> KroneckerLinear:
        """Nearest Kronecker sum of ``layer``'s (permuted) weight, by Van Loan-Pitsianis.

        Args:
            layer: ``nn.Linear`` or GPT-2 ``Conv1D``; its weight is read as ``(out, in)``.
            a_shape, b_shape, rank: the factorisation; ``(m1*m2, n1*n2)`` must equal ``(out, in)``.
            row_perm, col_perm: permutations found by :mod:`tensorlm.decompose.permutation` (optional).

        Raises:
            TensorLMError: shapes that do not divide the weight (the valid splits are listed), a bad
                permutation, NaN/Inf in the weight.
        """
        w, bias = dense_weight(layer, name)
        check_factor_shapes(tuple(w.shape), a_shape, b_shape, name or "KroneckerLinear")
        if row_perm is not None:
            w = w[check_permutation(row_perm, w.shape[0], f"{name}.row_perm")]
        if col_perm is not None:
            w = w[:, check_permutation(col_perm, w.shape[1], f"{name}.col_perm")]
        factors = nearest_kronecker(w, a_shape, b_shape, rank, name or "KroneckerLinear")
        return cls.from_factors(factors, bias, row_perm, col_perm)

    @classmethod
    def from_factors(cls, factors: KroneckerFactors, bias: torch.Tensor | None = None, row_perm=None,
                     col_perm=None) -> KroneckerLinear:
        """The layer holding copies of ``factors.a (r, m1, n1)``, ``factors.b (r, m2, n2)`` and ``bias (m,)``.

        The factors approximate the permuted weight ``W[p][:, q]`` (e.g. :attr:`PermutationResult.factors`).

        Raises:
            TensorLMError: a permutation that is not a bijection of the right length.
        """
        rank, m1, n1 = factors.a.shape
        _, m2, n2 = factors.b.shape
        module = cls((m1, n1), (m2, n2), rank, bias is not None, row_perm, col_perm, dtype=factors.a.dtype,
                     device=factors.a.device)
        return fill(module, a=factors.a, b=factors.b, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)`` by the contraction :attr:`order`, never forming ``W``."""
        (m1, n1), (m2, n2) = self.shape.a_shape, self.shape.b_shape
        lead = x.shape[:-1]
        if self.col_perm is not None:
            x = x.index_select(-1, self.col_perm)
        y = CONTRACTIONS[self.order](self.a, self.b, x.reshape(-1, n1, n2))  # (N, m1, m2)
        y = y.reshape(*lead, m1 * m2)
        if self.row_perm is not None:  # y[..., p] = Y as one gather (no zero fill): Y[..., argsort(p)]
            y = y.index_select(-1, cached(self, "_tensorlm_row_gather", lambda: torch.argsort(self.row_perm)))
        return y if self.bias is None else y + self.bias

    def kronecker_weight(self) -> torch.Tensor:
        """``sum_k A_k (x) B_k``: the permuted dense weight ``W[p][:, q]``, ``(out, in)``."""
        return kronecker_sum(self.a, self.b)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (permutations undone)."""
        w = _unpermute(self.kronecker_weight(), self.col_perm)  # undo columns: W[:, q] = K
        w = _unpermute(w.T, self.row_perm).T  # undo rows: W[p] = .
        return dense_linear(w.detach(), None if self.bias is None else self.bias.detach())

    def tensorlm_config(self) -> dict:
        return {"a_shape": list(self.shape.a_shape), "b_shape": list(self.shape.b_shape), "rank": self.shape.rank,
                "bias": self.bias is not None, "row_perm": self.row_perm is not None,
                "col_perm": self.col_perm is not None, "order": self.order}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> KroneckerLinear:
        """An uninitialised layer of ``cfg``'s shapes; ``order`` absent (older folders): the default."""
        (m1, _), (m2, _) = cfg["a_shape"], cfg["b_shape"]
        n = cfg["a_shape"][1] * cfg["b_shape"][1]
        return cls(cfg["a_shape"], cfg["b_shape"], cfg["rank"], cfg["bias"],
                   torch.arange(m1 * m2) if cfg["row_perm"] else None, torch.arange(n) if cfg["col_perm"] else None,
                   order=cfg.get("order"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for attr, length in (("row_perm", self.out_features), ("col_perm", self.in_features)):
            if prefix + attr in state_dict:
                check_permutation(state_dict[prefix + attr], length, f"{prefix}{attr}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.shape
        return (f"in={self.in_features}, out={self.out_features}, A={s.a_shape}, B={s.b_shape}, rank={s.rank}, "
                f"bias={self.bias is not None}, permuted rows={self.row_perm is not None}, "
                f"cols={self.col_perm is not None}, order={self.order}")


@register_layer
class KroneckerEmbedding(nn.Module):
    """Token embedding ``E (V x d)`` with ``E[:, q] = A (x) b``: row t is ``A[t] (x) b``, column-permuted.

    ``A (V, d/f)`` is held by ``table``: an ``nn.Embedding``, or another factored embedding (TQ's
    nested stages compress ``wte`` 2x, then the remaining table 2x again: replace ``<name>.table``).
    ``b: (1, f)``. Lookup: ``a = table(ids) (..., d/f)``, ``row = (a[..., :, None] * b[0]) (..., d/f, f)``
    flattened to ``(..., d)`` and scattered by ``col_perm``. Parameters: those of ``table`` plus ``f``.

    Source: Edalati et al. 2022 (KnGPT2), sec. 3.1; Abronin et al. 2024 (TQCompressor), sec. 3.3.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, factor: int, col_perm=None,
                 padding_idx: int | None = None, dtype=None, device=None):
        super().__init__()
        if factor < 1 or embedding_dim % factor:
            raise TensorLMError(f"KroneckerEmbedding: factor {factor} does not divide embedding_dim {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.factor = num_embeddings, embedding_dim, factor
        self.padding_idx = padding_idx
        kw = {"dtype": dtype, "device": device}
        self.table = nn.Embedding(num_embeddings, embedding_dim // factor, padding_idx=padding_idx, **kw)
        self.b = nn.Parameter(torch.empty(1, factor, **kw))
        value = None if col_perm is None else check_permutation(col_perm, embedding_dim, "KroneckerEmbedding.col_perm")
        self.register_buffer("col_perm", value)

    @classmethod
    def from_dense(cls, embedding: nn.Module, factor: int = 2, col_perm=None, name: str = "") -> KroneckerEmbedding:
        """Nearest ``A (x) b`` to ``embedding``'s (column-permuted) table by Van Loan-Pitsianis.

        Args:
            embedding: ``nn.Embedding (V, d)`` or a factored table with ``to_dense()``.
            factor: ``f``, the width of ``b``; must divide ``d``.
            col_perm: optional permutation of the ``d`` columns.

        Raises:
            TensorLMError: ``factor`` does not divide ``d``; NaN/Inf; a bad permutation.
        """
        dense = embedding if isinstance(embedding, nn.Embedding) else embedding.to_dense()
        w = dense.weight.detach()  # (V, d)
        if col_perm is not None:
            w = w[:, check_permutation(col_perm, w.shape[1], f"{name or 'embedding'}.col_perm")]
        v, d = w.shape
        if factor < 1 or d % factor:
            raise TensorLMError(f"KroneckerEmbedding: factor {factor} does not divide embedding_dim {d}")
        factors = nearest_kronecker(w, (v, d // factor), (1, factor), 1, name or "embedding")
        return cls.from_factors(factors, col_perm, dense.padding_idx)

    @classmethod
    def from_factors(cls, factors: KroneckerFactors, col_perm=None, padding_idx: int | None = None
                     ) -> KroneckerEmbedding:
        """The table ``A (x) b`` from rank-1 factors ``a: (1, V, d/f)``, ``b: (1, 1, f)`` of ``E[:, q]``."""
        _, v, width = factors.a.shape
        factor = factors.b.shape[-1]
        module = cls(v, width * factor, factor, col_perm, padding_idx, dtype=factors.a.dtype,
                     device=factors.a.device)
        with torch.no_grad():
            module.table.weight.copy_(factors.a[0])
            module.b.copy_(factors.b[0])
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        a = self.table(ids)  # (..., d/f)
        rows = (a.unsqueeze(-1) * self.b[0]).flatten(-2)  # (..., d/f, f) -> (..., d)
        return _unpermute(rows, self.col_perm)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``h @ E^T (..., V)`` from the factors: ``sum_c h[c] E[t, c] = (h[q] -> (d/f, f)) b^T . A[t]``."""
        if self.col_perm is not None:
            h = h.index_select(-1, self.col_perm)  # (..., d) in Kronecker order
        g = h.unflatten(-1, (self.embedding_dim // self.factor, self.factor)) @ self.b[0]  # (..., d/f)
        return project(self.table, g)

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding (V, d)``."""
        ids = torch.arange(self.num_embeddings, device=self.b.device)
        with torch.no_grad():
            return nn.Embedding.from_pretrained(self(ids), freeze=False, padding_idx=self.padding_idx)

    def tensorlm_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "factor": self.factor,
                "padding_idx": self.padding_idx, "col_perm": self.col_perm is not None}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> KroneckerEmbedding:
        perm = torch.arange(cfg["embedding_dim"]) if cfg["col_perm"] else None
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], cfg["factor"], perm, cfg["padding_idx"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "col_perm" in state_dict:
            check_permutation(state_dict[prefix + "col_perm"], self.embedding_dim, f"{prefix}col_perm")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, factor={self.factor}, "
                f"permuted={self.col_perm is not None}")
