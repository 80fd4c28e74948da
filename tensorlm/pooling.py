"""Sentence embeddings by mean pooling: the one definition the evaluation and the distillation share.

The STS evaluation (:mod:`tensorlm.evaluate.sts`), the teacher-agreement cosine and the distillation's
cosine loss and validation all pool with :func:`mean_pool` over :func:`last_hidden` outputs, in float32,
so a validation cosine and a reported agreement cosine are one computation of one protocol.
"""

from __future__ import annotations

import torch

from tensorlm.errors import TensorLMError


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask-aware mean over tokens in float32: ``(B, T, d) -> (B, d)`` (sentence-transformers mean pooling).

    ``attention_mask (B, T)``: the positions that count (all of them when None). A row with no unmasked
    position pools to zeros. Computed in float32 whatever ``hidden``'s dtype (bf16 sums lose digits).
    """
    if attention_mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    else:
        mask = attention_mask.to(device=hidden.device, dtype=torch.float32)
    mask = mask.unsqueeze(-1)  # (B, T, 1)
    return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, d)


def last_hidden(outputs) -> torch.Tensor:
    """``(B, T, d)``: ``last_hidden_state`` of an encoder, else the last of ``hidden_states`` (a causal LM's).

    Raises:
        TensorLMError: the outputs hold neither.
    """
    last = getattr(outputs, "last_hidden_state", None)
    if last is not None:
        return last
    hidden = getattr(outputs, "hidden_states", None)
    if not hidden:
        raise TensorLMError("the model returned neither last_hidden_state nor hidden_states (pass "
                            "output_hidden_states=True)")
    return hidden[-1]
