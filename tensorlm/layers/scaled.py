"""A factored token table whose looked-up rows are multiplied by a constant (Gemma's ``embed_scale``).

Gemma 3 (Google, 2025) embeds token ``t`` as ``sqrt(d) * E[t]`` (``Gemma3TextScaledWordEmbedding``, a
subclass of ``nn.Embedding`` with ``embed_scale``), while its tied LM head computes ``h @ E^T`` with the
unscaled table. A factored replacement of such a table must keep both: :class:`ScaledEmbedding` wraps
the factored table, scales its lookups, and leaves the table itself (what a tied head projects with)
unscaled. :func:`row_scale` reads the scale of the module being replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.layers.base import project, reconstructed, register_layer


def row_scale(module: nn.Module) -> float | None:
    """The constant a token table multiplies its looked-up rows by, or None for a plain table.

    Reads ``scalar_embed_scale`` (a Python float, present on the meta device too) or else the
    ``embed_scale`` buffer of an ``nn.Embedding`` subclass such as transformers'
    ``Gemma3TextScaledWordEmbedding``; a :class:`ScaledEmbedding` reports its own.
    """
    if isinstance(module, ScaledEmbedding):
        return module.scale
    scalar = getattr(module, "scalar_embed_scale", None)
    if scalar is not None:
        return float(scalar)
    buffer = getattr(module, "embed_scale", None)
    if isinstance(buffer, torch.Tensor) and buffer.numel() == 1 and not buffer.is_meta:
        return float(buffer)
    return None


class ScaledDenseEmbedding(nn.Embedding):
    """``nn.Embedding (V, d)`` whose lookup is ``embed_scale * E[ids]``: the dense form of a
    :class:`ScaledEmbedding` (what ``decompress``/``to_dense`` return). Its ``weight`` is the unscaled
    table, as in ``Gemma3TextScaledWordEmbedding``, so an exported folder loads in transformers as the
    original model."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float, padding_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.scalar_embed_scale = float(scale)
        self.register_buffer("embed_scale", torch.tensor(float(scale), device=device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)  # (..., d)


@register_layer
class ScaledEmbedding(nn.Module):
    """A factored token table ``embedding`` (any module mapping ids ``(...)`` to rows ``(..., d)``) whose
    lookups are multiplied by ``scale``: ``forward(ids) = scale * embedding(ids)``, as the
    ``Gemma3TextScaledWordEmbedding`` it replaces (the scale held, as there, in a non-persistent buffer
    ``embed_scale`` cast to the rows' dtype before the product).

    ``project(h)`` (logits of a tied head) is the unscaled ``h @ E^T`` of the wrapped table. Parameters:
    those of ``embedding``; nothing of its own is stored. Source: Gemma Team 2025, "Gemma 3 Technical
    Report"; transformers' ``Gemma3TextScaledWordEmbedding``.

    Raises:
        TensorLMError: ``scale`` is not a finite positive number.
    """

    def __init__(self, embedding: nn.Module, scale: float):
        super().__init__()
        scale = float(scale)
        if not (scale > 0 and scale < float("inf")):
            raise TensorLMError(f"ScaledEmbedding: scale must be finite and > 0, got {scale}")
        self.embedding, self.scale = embedding, scale
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)
        self.__dict__["_tensorlm_scaled"] = None  # (key, scaled dense table) of the reconstructed forward

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return getattr(self.embedding, "padding_idx", None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.embedding(ids)  # (..., d)
        return rows * self.embed_scale.to(rows.dtype)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``h @ E^T`` with the unscaled table: ``(..., d)`` -> ``(..., V)``."""
        return project(self.embedding, h)

    def reconstructed_tensors(self) -> tuple[str, torch.Tensor, None]:
        """The reconstructed forward's ``("embedding", scale * E (V, d), None)``, rebuilt when the wrapped
        table's cached dense form changes (:func:`tensorlm.layers.base.reconstructed`)."""
        _, table, _ = reconstructed(self.embedding)  # (V, d), cached on the wrapped table
        key = (table.data_ptr(), table._version, table.dtype, table.device, self.embed_scale.dtype)
        cached = self.__dict__["_tensorlm_scaled"]
        if cached is None or cached[0] != key:
            self.__dict__["_tensorlm_scaled"] = None
            cached = (key, table * self.embed_scale.to(table.dtype))
            self.__dict__["_tensorlm_scaled"] = cached
        return "embedding", cached[1], None

    def to_dense(self) -> ScaledDenseEmbedding:
        """A :class:`ScaledDenseEmbedding` holding the unscaled table ``(V, d)`` and the scale."""
        table = self.embedding.to_dense().weight.detach()  # (V, d)
        dense = ScaledDenseEmbedding(table.shape[0], table.shape[1], self.scale, self.padding_idx,
                                     device=table.device, dtype=table.dtype)
        with torch.no_grad():
            dense.weight.copy_(table)
        return dense

    def tensorlm_config(self) -> dict:
        return {"scale": self.scale}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> ScaledEmbedding:
        """An empty wrapper; the saved folder's next entry (``<name>.embedding``) rebuilds the table inside."""
        return cls(nn.Identity(), cfg["scale"])

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"
