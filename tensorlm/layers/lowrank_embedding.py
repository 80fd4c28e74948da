"""Low-rank token table ``E ~ U V`` from a truncated SVD: the baseline of every embedding method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorlm.decompose.lowrank import truncated_svd
from tensorlm.decompose.whitening import whitened_svd
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import fill, project, register_layer


@register_layer
class LowRankEmbedding(nn.Module):
    """Token embedding ``E (V, d) = U V``: ``U (V, r)`` held by ``table`` (an ``nn.Embedding``, so a lookup
    gathers only the rows it needs), ``v: (r, d)``; ``r (V + d)`` parameters.

    Lookup ``ids (...)`` -> ``table(ids) @ v (..., d)``: ``r d`` multiply-adds per token. Logits of a tied head
    ``h @ E^T = (h @ v^T) @ U^T``: ``r (d + V)`` per position instead of ``V d``. ``padding_idx`` as in
    ``nn.Embedding`` (its row of ``U`` gets no gradient). Source: Eckart-Young (1936) truncated SVD, the
    baseline of TensorGPT (Xu et al. 2023) and of Hrinchuk et al. 2020.

    With ``dense_rows = K > 0`` the table is split by token frequency, as adaptive input representations
    split the vocabulary into frequency bands (Baevski & Auli, ICLR 2019): ``K`` rows (the most frequent
    tokens, chosen by :meth:`from_dense`) are stored exactly in ``dense (K, d)``, the other ``V - K`` rows as
    ``U V`` with ``table: (V - K, r)``; the buffer ``slot (V,)`` int64 maps token ``t`` to its row,
    ``slot[t] < K`` in ``dense``, else ``slot[t] - K`` in ``table``. ``K d + r (V - K + d)`` parameters
    (``slot`` is an index, not a parameter, as the Kronecker layers' permutations are). With a split, the
    padding row is not masked from gradients (``padding_idx`` is kept for :meth:`to_dense`).

    Raises:
        TensorLMError: a rank outside ``1..min(V - K, d)``, ``K`` outside ``0..V - 1``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 dense_rows: int = 0, dtype=None, device=None):
        super().__init__()
        if not 0 <= dense_rows < num_embeddings:
            raise TensorLMError(f"LowRankEmbedding: dense_rows {dense_rows} must be in 0..{num_embeddings - 1} for a "
                                f"({num_embeddings}, {embedding_dim}) table")
        factored = num_embeddings - dense_rows
        if not 1 <= rank <= min(factored, embedding_dim):
            raise TensorLMError(f"LowRankEmbedding: rank {rank} must be in 1..{min(factored, embedding_dim)} "
                                f"for a ({num_embeddings}, {embedding_dim}) table with {dense_rows} dense rows")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx, self.dense_rows = padding_idx, dense_rows
        kw = {"dtype": dtype, "device": device}
        self.table = nn.Embedding(factored, rank, padding_idx=None if dense_rows else padding_idx, **kw)  # U
        self.v = nn.Parameter(torch.empty(rank, embedding_dim, **kw))
        if dense_rows:
            self.dense = nn.Embedding(dense_rows, embedding_dim, **kw)  # the frequent tokens' rows, exact
            self.register_buffer("slot", torch.arange(num_embeddings, device=device))  # (V,) token -> row

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, rank: int, name: str = "", row_weights: torch.Tensor | None = None,
                   head_moment: torch.Tensor | None = None, dense_rows: int = 0) -> LowRankEmbedding:
        """Best rank-``rank`` table ``E~`` in the norm ``||D^{1/2} (E - E~) G^{1/2}||_F``.

        ``D = diag(row_weights)`` (``(V,)``, every weight > 0; None: all 1) weights each token's row, ``G``
        (``head_moment``, ``(d, d)``; None: ``I``) the directions of ``d``; without either this is the
        truncated SVD (Eckart-Young), ``U = u_r s_r^{1/2}``, ``V = s_r^{1/2} v_r^T``. With them it is the
        whitened truncated SVD (SVD-LLM, Wang et al. 2024, Theorem 3.2: :func:`~tensorlm.decompose.whitening.
        whitened_svd`) of ``D^{1/2} E``, mapped back by ``D^{-1/2}``: ``E~ = D^{-1/2} U_r U_r^T D^{1/2} E``
        with ``U_r`` the top left singular vectors of ``D^{1/2} E G^{1/2}``, exact for the row scaling as
        ``D`` is invertible. float64 inside.

        ``dense_rows = K > 0`` (needs ``row_weights``): the ``K`` rows of largest weight are kept exactly
        (ties, such as the tokens a calibration text never holds, go to the lower token id: in BPE and
        SentencePiece vocabularies the earlier merge or higher score, a proxy for frequency in the tokenizer's
        training text), and the fit above runs on the other rows alone, which is then the best
        such split table in the same norm (the kept rows' error is zero).

        Raises:
            TensorLMError: not an ``nn.Embedding`` (or ``max_norm`` set), rank or ``dense_rows`` out of range,
                NaN/Inf, row weights not ``(V,)``, finite and > 0 (or missing with ``dense_rows``), a ``G``
                not ``(d, d)`` and finite.
        """
        if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
            raise TensorLMError(f"LowRankEmbedding.from_dense: {name or 'module'} is a {type(embedding).__name__}; "
                                "expected nn.Embedding without max_norm")
        if dense_rows and row_weights is None:
            raise TensorLMError(f"{name or 'embedding'}: dense_rows keeps the most frequent tokens, so it needs row "
                                "weights (token frequencies: calibration 'frequency' or 'frequency-whitened')")
        w = embedding.weight.detach()  # (V, d)
        module = cls(w.shape[0], w.shape[1], rank, embedding.padding_idx, dense_rows, dtype=w.dtype, device=w.device)
        root = None if row_weights is None else _row_roots(row_weights, w, name or "embedding")  # (V,)
        rows = torch.arange(w.shape[0], device=w.device)  # the factored rows, ascending token ids
        if dense_rows:
            order = torch.sort(root, descending=True, stable=True).indices
            rows, kept = order[dense_rows:].sort().values, order[:dense_rows]  # (V - K,), (K,) most frequent first
            with torch.no_grad():
                module.slot[kept] = torch.arange(dense_rows, device=w.device)
                module.slot[rows] = dense_rows + torch.arange(len(rows), device=w.device)
                module.dense.weight.copy_(w[kept])
        if root is None and head_moment is None:
            factors = truncated_svd(w, rank, name or "embedding")  # u (V, r), v (r, d)
            u, v = factors.u, factors.v
        else:
            u, v = _weighted_factors(w[rows], rank, None if root is None else root[rows], head_moment,
                                     name or "embedding")
        with torch.no_grad():
            module.table.weight.copy_(u)
        return fill(module, v=v)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.dense_rows:
            return self.table(ids) @ self.v  # (..., r) @ (r, d) -> (..., d)
        slot, k = self.slot[ids], self.dense_rows  # (...)
        out = self.dense(slot.clamp(max=k - 1))  # (..., d); right for the frequent tokens
        rare = slot >= k  # (...): only these pay for U V
        out[rare] = self.table(slot[rare] - k) @ self.v  # (n_rare, r) @ (r, d)
        return out

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``h @ E^T``: ``(..., d)`` -> ``(..., r)`` -> ``(..., V)``, never forming ``E``."""
        logits = project(self.table, F.linear(h, self.v))  # (..., V - K)
        if not self.dense_rows:
            return logits
        by_slot = torch.cat([F.linear(h, self.dense.weight), logits], dim=-1)  # (..., V), slot order
        return by_slot.index_select(-1, self.slot)

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding (V, d)``: ``E = U V`` (with a split, its rows and ``dense`` by ``slot``)."""
        with torch.no_grad():
            weight = self.table.weight @ self.v  # (V - K, d)
            if self.dense_rows:
                weight = torch.cat([self.dense.weight, weight]).index_select(0, self.slot)  # (V, d)
            return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=self.padding_idx)

    def tensorlm_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "rank": self.rank,
                "padding_idx": self.padding_idx, "dense_rows": self.dense_rows}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> LowRankEmbedding:
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], cfg["rank"], cfg["padding_idx"],
                   cfg.get("dense_rows", 0))

    def extra_repr(self) -> str:
        k = self.dense_rows
        stored = k * self.embedding_dim + self.rank * (self.num_embeddings - k + self.embedding_dim)
        split = f", dense_rows={k}" if k else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}{split}, "
                f"ratio={self.num_embeddings * self.embedding_dim / stored:.2f}x")


def _row_roots(row_weights: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
    """``D^{1/2}``: the square roots ``(V,)`` float64 of checked row weights for the table ``w (V, d)``."""
    weights = torch.as_tensor(row_weights, dtype=torch.float64, device=w.device)
    if weights.shape != w.shape[:1] or not (torch.isfinite(weights).all() and (weights > 0).all()):
        raise TensorLMError(f"{name}: row weights {tuple(weights.shape)} must be ({w.shape[0]},), finite and > 0")
    return weights.sqrt()


def _weighted_factors(w: torch.Tensor, rank: int, root: torch.Tensor | None, head_moment: torch.Tensor | None,
                      name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``U (n, r)``, ``V (r, d)`` in ``w``'s dtype of :meth:`LowRankEmbedding.from_dense` for the rows
    ``w (n, d)`` with row-weight roots ``root (n,)`` (None: all 1)."""
    root = torch.ones(w.shape[0], dtype=torch.float64, device=w.device) if root is None else root
    g = torch.eye(w.shape[1], dtype=torch.float64) if head_moment is None else head_moment
    fit = whitened_svd(w.to(torch.float64) * root[:, None], g, rank, name)  # checks rank; (n, r), (r, d)
    return (fit.u.to(torch.float64) / root[:, None]).to(w.dtype), fit.v.to(w.dtype)
