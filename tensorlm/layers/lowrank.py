"""Low-rank linear map ``W ~ U V`` from a truncated SVD: the baseline a user would reach for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorlm.decompose.lowrank import rank_for_ratio, truncated_svd
from tensorlm.layers.base import dense_linear, dense_weight, fill, register_layer


@register_layer
class LowRankLinear(nn.Module):
    """``y = U (V x) + bias`` with ``u: (out, rank)``, ``v: (rank, in)``; ``rank * (in + out)`` weights.

    Forward costs ``rank * (in + out)`` multiply-adds per token instead of ``in * out``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"dtype": dtype, "device": device}
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: int | None = None, ratio: float | None = None,
                   name: str = "") -> LowRankLinear:
        """Truncated SVD of ``layer``'s weight (``nn.Linear`` or ``Conv1D``, read as ``(out, in)``).

        Exactly one of ``rank`` or ``ratio`` (fraction of the dense weight's parameters) is given.

        Raises:
            TensorLMError: rank out of range, ratio outside (0, 1), NaN/Inf, unsupported layer.
        """
        w, bias = dense_weight(layer, name)
        if (rank is None) == (ratio is None):
            raise TypeError("give exactly one of rank or ratio")
        rank = rank if rank is not None else rank_for_ratio(tuple(w.shape), ratio)
        factors = truncated_svd(w, rank, name or "LowRankLinear")
        module = cls(w.shape[1], w.shape[0], rank, bias is not None, dtype=w.dtype, device=w.device)
        return fill(module, u=factors.u, v=factors.v, bias=bias)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """The layer holding copies of ``u: (out, r)``, ``v: (r, in)`` and ``bias: (out,)`` (e.g. a whitened SVD)."""
        module = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None, dtype=u.dtype, device=u.device)
        return fill(module, u=u, v=v, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)  # (..., in) -> (..., rank) -> (..., out)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` with ``W = U V``."""
        return dense_linear((self.u @ self.v).detach(), None if self.bias is None else self.bias.detach())

    def tensorlm_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> LowRankLinear:
        return cls(cfg["in_features"], cfg["out_features"], cfg["rank"], cfg["bias"])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
