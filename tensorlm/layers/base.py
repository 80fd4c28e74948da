"""What every factorized layer shares: reading a dense weight, and a registry for save/load.

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
from torch import nn

from tensorlm.errors import TensorLMError

LAYERS: dict[str, type[nn.Module]] = {}


def register_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` loadable by name from a saved ``tensorlm.json``."""
    LAYERS[cls.__name__] = cls
    return cls


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


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise :class:`TensorLMError` if ``tensor`` holds NaN or Inf (a decomposition would spread it)."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise TensorLMError(f"weight of {name!r} {tuple(tensor.shape)} holds {bad} NaN/Inf values")


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
