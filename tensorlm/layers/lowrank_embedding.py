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

    Raises:
        TensorLMError: a rank outside ``1..min(V, d)``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 dtype=None, device=None):
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise TensorLMError(f"LowRankEmbedding: rank {rank} must be in 1..{min(num_embeddings, embedding_dim)} "
                                f"for a ({num_embeddings}, {embedding_dim}) table")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        kw = {"dtype": dtype, "device": device}
        self.table = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, **kw)  # U (V, r)
        self.v = nn.Parameter(torch.empty(rank, embedding_dim, **kw))

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, rank: int, name: str = "", row_weights: torch.Tensor | None = None,
                   head_moment: torch.Tensor | None = None) -> LowRankEmbedding:
        """Best rank-``rank`` table ``E~`` in the norm ``||D^{1/2} (E - E~) G^{1/2}||_F``.

        ``D = diag(row_weights)`` (``(V,)``, every weight > 0; None: all 1) weights each token's row, ``G``
        (``head_moment``, ``(d, d)``; None: ``I``) the directions of ``d``; without either this is the
        truncated SVD (Eckart-Young), ``U = u_r s_r^{1/2}``, ``V = s_r^{1/2} v_r^T``. With them it is the
        whitened truncated SVD (SVD-LLM, Wang et al. 2024, Theorem 3.2: :func:`~tensorlm.decompose.whitening.
        whitened_svd`) of ``D^{1/2} E``, mapped back by ``D^{-1/2}``: ``E~ = D^{-1/2} U_r U_r^T D^{1/2} E``
        with ``U_r`` the top left singular vectors of ``D^{1/2} E G^{1/2}``, exact for the row scaling as
        ``D`` is invertible. float64 inside.

        Raises:
            TensorLMError: not an ``nn.Embedding`` (or ``max_norm`` set), rank out of range, NaN/Inf, row
                weights not ``(V,)``, finite and > 0, a ``G`` not ``(d, d)`` and finite.
        """
        if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
            raise TensorLMError(f"LowRankEmbedding.from_dense: {name or 'module'} is a {type(embedding).__name__}; "
                                "expected nn.Embedding without max_norm")
        w = embedding.weight.detach()  # (V, d)
        if row_weights is None and head_moment is None:
            factors = truncated_svd(w, rank, name or "embedding")  # u (V, r), v (r, d)
            u, v = factors.u, factors.v
        else:
            u, v = _weighted_factors(w, rank, row_weights, head_moment, name or "embedding")
        module = cls(w.shape[0], w.shape[1], rank, embedding.padding_idx, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            module.table.weight.copy_(u)
        return fill(module, v=v)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids) @ self.v  # (..., r) @ (r, d) -> (..., d)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``h @ E^T``: ``(..., d)`` -> ``(..., r)`` -> ``(..., V)``, never forming ``E``."""
        return project(self.table, F.linear(h, self.v))

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding (V, d)`` with ``E = U V``."""
        with torch.no_grad():
            return nn.Embedding.from_pretrained(self.table.weight @ self.v, freeze=False,
                                                padding_idx=self.padding_idx)

    def tensorlm_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "rank": self.rank,
                "padding_idx": self.padding_idx}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> LowRankEmbedding:
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], cfg["rank"], cfg["padding_idx"])

    def extra_repr(self) -> str:
        stored = self.rank * (self.num_embeddings + self.embedding_dim)
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, "
                f"ratio={self.num_embeddings * self.embedding_dim / stored:.2f}x")


def _weighted_factors(w: torch.Tensor, rank: int, row_weights: torch.Tensor | None, head_moment: torch.Tensor | None,
                      name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``U (V, r)``, ``V (r, d)`` in ``w``'s dtype of :meth:`LowRankEmbedding.from_dense` with weights."""
    vocab, dim = w.shape
    root = torch.ones(vocab, dtype=torch.float64, device=w.device)  # D^{1/2} (V,)
    if row_weights is not None:
        weights = torch.as_tensor(row_weights, dtype=torch.float64, device=w.device)
        if weights.shape != (vocab,) or not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise TensorLMError(f"{name}: row weights {tuple(weights.shape)} must be ({vocab},), finite and > 0")
        root = weights.sqrt()
    g = torch.eye(dim, dtype=torch.float64) if head_moment is None else head_moment
    fit = whitened_svd(w.to(torch.float64) * root[:, None], g, rank, name)  # checks rank; (V, r), (r, d)
    return (fit.u.to(torch.float64) / root[:, None]).to(w.dtype), fit.v.to(w.dtype)
