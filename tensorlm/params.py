"""Parameter accounting as DESIGN.md defines it.

``total``: unique parameters (a tensor shared by several modules, e.g. a tied head or a Tucker
bank, counted once). ``stored``: values the saved ``model.safetensors`` holds (unique tensors of the
state dict: parameters plus persistent buffers such as permutations). Groups: embeddings,
attention, mlp, head, norms, bank (shared Tucker factors), other. ``tied_head``: how the LM head
relates to the token embedding.
"""

from __future__ import annotations

import re

import torch
from torch import nn

GROUPS = ("embeddings", "attention", "mlp", "head", "norms", "bank", "other")
_RULES = (
    ("head", re.compile(r"(^|\.)(lm_head|cls|head)(\.|$)")),
    ("bank", re.compile(r"(^|\.)bank(\.|$)")),
    ("norms", re.compile(r"(ln_|layernorm|layer_norm|norm)", re.I)),
    ("embeddings", re.compile(r"(emb|wte|wpe)", re.I)),
    ("attention", re.compile(r"(attn|attention)")),
    ("mlp", re.compile(r"(mlp|intermediate|(^|\.)output\.dense|ffn|fc)")),
)


def group_of(name: str) -> str:
    """The accounting group of a parameter name (first rule that matches, else ``other``)."""
    for group, pattern in _RULES:
        if pattern.search(name):
            return group
    return "other"


def head_status(model: nn.Module) -> str | None:
    """``tied`` (same tensor as the input embedding), ``tied-factored`` (logits from a factored
    embedding), ``untied`` (a dense head of its own), or None for a model without an LM head."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out else None
    if head is None:
        return None
    if getattr(head, "tied_factored", False):
        return "tied-factored"
    emb = model.get_input_embeddings()
    return "tied" if getattr(emb, "weight", None) is getattr(head, "weight", 0) else "untied"


def unique_parameters(modules) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the parameters of ``modules`` (an iterable of (prefix, module)), each tensor once."""
    seen, out = set(), []
    for prefix, module in modules:
        for name, p in module.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((f"{prefix}.{name}" if prefix else name, p))
    return out


def count_parameters(model: nn.Module, modules: list[str] | None = None) -> dict:
    """Parameter table of ``model``.

    Args:
        model: any ``nn.Module``.
        modules: optional module names whose (unique) parameters are summed as ``targeted``.

    Returns:
        ``{"total", "total_without_head", "stored", "groups": {group: count}, "tied_head", "targeted"?}``;
        counts are numbers of values (not bytes).
    """
    params = unique_parameters([("", model)])
    groups = dict.fromkeys(GROUPS, 0)
    for name, p in params:
        groups[group_of(name)] += p.numel()
    stored, storages = 0, set()
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in storages:
            storages.add(key)
            stored += t.numel()
    total = sum(p.numel() for _, p in params)
    table = {"total": total, "total_without_head": total - groups["head"], "stored": stored,
             "groups": groups, "tied_head": head_status(model)}
    if modules is not None:
        table["targeted"] = sum(p.numel() for _, p in unique_parameters((n, model.get_submodule(n)) for n in modules))
    return table


def compression_summary(before: dict, after: dict) -> dict:
    """Ratios between two :func:`count_parameters` tables (``before / after``; > 1 means smaller)."""
    out = {"model_ratio": before["total"] / after["total"],
           "model_ratio_without_head": before["total_without_head"] / after["total_without_head"]}
    if "targeted" in before and "targeted" in after and after["targeted"]:
        out["targeted_ratio"] = before["targeted"] / after["targeted"]
    return out
