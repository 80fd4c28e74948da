"""What every factorized layer shares: reading a dense weight, a registry for save/load, and the tied LM head.

A factorized layer class implements

* ``from_dense(layer, ...)``: build it from an ``nn.Linear`` or GPT-2 ``Conv1D`` (or ``nn.Embedding``);
* ``tensorlm_config() -> dict``: JSON-able constructor arguments (shapes, ranks, flags, never tensors);
* ``from_tensorlm_config(cfg, shared)``: an uninitialised module of the same shapes, whose state dict
  the saved file then fills; ``shared`` is one dict per model that the loader passes to every layer it
  rebuilds, mapping the paths of modules rebuilt earlier to those modules, and holding objects that
  several layers share (a Tucker bank) under keys the layers choose;
* ``to_dense()``: the equivalent dense module.

and is registered with :func:`register_layer` so that :mod:`tensorlm.io` can rebuild it by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorlm.decompose.linalg import check_finite
from tensorlm.errors import TensorLMError

LAYERS: dict[str, type[nn.Module]] = {}


def register_layer(cls: type[nn.Module] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: make ``cls`` loadable by name from a saved ``tensorlm.json``.

    ``aliases``: former class names that folders saved by earlier versions still carry
    (``@register_layer(aliases=("TTTiedHead",))``).
    """
    def register(layer_cls: type[nn.Module]) -> type[nn.Module]:
        for name in (layer_cls.__name__, *aliases):
            LAYERS[name] = layer_cls
        return layer_cls

    return register if cls is None else register(cls)


def is_conv1d(layer: nn.Module) -> bool:
    """True for GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored ``(in, out)``)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "nx")


def dense_weight(layer: nn.Module, name: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight of a linear map in tensorlm's orientation, and its bias.

    Args:
        layer: ``nn.Linear`` (weight ``(out, in)``) or GPT-2 ``Conv1D`` (weight ``(in, out)``).
        name: the module's name, for error messages.

    Returns:
        ``W: (out_features, in_features)`` (detached; a transposed view for ``Conv1D``) and
        ``bias: (out_features,)`` or ``None``.

    Raises:
        TensorLMError: ``layer`` is neither, or its weight holds NaN or Inf.
    """
    if isinstance(layer, nn.Linear):
        weight = layer.weight.detach()
    elif is_conv1d(layer):
        weight = layer.weight.detach().T  # (in, out) -> (out, in)
    else:
        raise TensorLMError(
            f"module {name or type(layer).__name__!r} is a {type(layer).__name__}; "
            "expected nn.Linear or transformers Conv1D"
        )
    check_finite(weight, name or type(layer).__name__)
    bias = None if layer.bias is None else layer.bias.detach()
    return weight, bias


def fill(module: nn.Module, **values: torch.Tensor | None) -> nn.Module:
    """Copy ``values`` into ``module``'s parameters of the same names (None: skipped); returns ``module``."""
    with torch.no_grad():
        for name, value in values.items():
            if value is not None:
                getattr(module, name).copy_(value)
    return module


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight: (out, in)`` and ``bias: (out,)`` (copies)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def project(table: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits ``h @ E^T`` of an embedding table without forming ``E`` where it is factored.

    Args:
        table: ``nn.Embedding`` ``(V, d)`` or a factored table with a ``project(h)`` method.
        h: ``(..., d)``.

    Returns:
        ``(..., V)``.

    Raises:
        TensorLMError: ``table`` is neither.
    """
    if isinstance(table, nn.Embedding):
        return F.linear(h, table.weight)
    if hasattr(table, "project"):
        return table.project(h)
    raise TensorLMError(f"cannot compute logits from a {type(table).__name__} table")


@register_layer(aliases=("TTTiedHead",))
class TiedHead(nn.Module):
    """LM head tied to a factored embedding: ``logits = h @ E^T``, computed by ``embedding.project(h)``.

    The one tied head of every factored table (Kronecker, TT, a method registered later). The table is
    a child module, the same object as the model's input embedding, so ``parameters()`` yields its
    tensors once and ``safetensors`` stores them once. Input ``(..., d)``, output ``(..., V)``.

    Args:
        embedding: the factored table (has ``project(h)`` and ``to_dense()``).
        tied_to: the table's module path (``"transformer.wte"``), used to re-tie on load.
        block_rows: for tables that form their rows block by block to compute logits (``TTEmbedding``):
            rows formed at a time; sets ``embedding.block_rows``.

    Raises:
        TensorLMError: ``block_rows`` below 1 or given for a table that has no blocks.
    """

    tied_factored = True  # parameter accounting: logits come from the embedding's factors

    def __init__(self, embedding: nn.Module, tied_to: str, block_rows: int | None = None):
        super().__init__()
        if block_rows is not None:
            if not hasattr(embedding, "block_rows") or block_rows < 1:
                raise TensorLMError(f"TiedHead: block_rows={block_rows} for a {type(embedding).__name__} table; "
                                    "only tables with row blocks (TTEmbedding) take it, and it must be >= 1")
            embedding.block_rows = block_rows
        self.embedding, self.tied_to = embedding, tied_to

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return project(self.embedding, h)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear (d -> V)`` without bias holding a copy of the dense table (untied)."""
        return dense_linear(self.embedding.to_dense().weight.detach(), None)

    def tensorlm_config(self) -> dict:
        block = getattr(self.embedding, "block_rows", None)
        return {"tied_to": self.tied_to, **({} if block is None else {"block_rows": block})}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> TiedHead:
        """The head re-tied to ``shared[cfg["tied_to"]]`` (folders of version 0.1 say ``"embedding"``).

        Raises:
            TensorLMError: the table was not rebuilt before the head.
        """
        tied_to = cfg.get("tied_to", cfg.get("embedding"))
        if tied_to not in shared:
            raise TensorLMError(f"tied head: tied_to {tied_to!r} is not a factored table the saved folder "
                                "rebuilds before the head")
        return cls(shared[tied_to], tied_to, cfg.get("block_rows"))

    def extra_repr(self) -> str:
        return f"tied_to={self.tied_to!r}"
