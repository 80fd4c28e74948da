"""Distillation losses between a student and its teacher, and the weighted mix the trainer minimises.

Every term takes Hugging Face model outputs (``logits``, ``hidden_states``, ``attentions``,
``last_hidden_state``) and returns a scalar that is exactly zero when student and teacher agree:

* ``logit_kl``: ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` per token (Hinton et al. 2015, eq. 2 and
  the T^2 gradient scaling); it equals the soft-target cross-entropy that KnGPT2 and TinyBERT use
  (``L_pred``) minus the teacher's entropy, a constant, so both have the same gradient;
* ``ce``: next-token cross-entropy against the data (causal LMs);
* ``hidden_mse``: mean squared error between the outputs of mapped transformer blocks, summed over the
  layer map (TinyBERT, Jiao et al. 2020, eq. 7-9; KnGPT2, Edalati et al. 2022, section 3.2);
* ``attention_kl``: ``KL(A_t || A_s)`` of the attention distributions of mapped blocks, averaged over heads
  and query positions, summed over the layer map (MiniLM, Wang et al. 2020, eq. 5-6, on attention
  distributions);
* ``embedding_mse``: mean squared error between the embedding-layer outputs (``hidden_states[0]``);
* ``cosine``: ``1 - cos(e_s, e_t)`` of mask-aware mean-pooled last hidden states (sentence encoders;
  the pooling of all-MiniLM-L6-v2 and of :mod:`tensorlm.evaluate.sts`).

Token-level terms average over the non-padding positions given by ``attention_mask`` (all positions
when it is ``None``). Layer maps send a student block index to a teacher block index (0-based; block
``i``'s output is ``hidden_states[i + 1]``, its attention ``attentions[i]``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from tensorlm.errors import TensorLMError
from tensorlm.heal.teacher_store import topk_kl
from tensorlm.pooling import last_hidden, mean_pool

__all__ = ["mean_pool"]  # re-exported: the one pooling of tensorlm.pooling

TERMS = ("logit_kl", "ce", "hidden_mse", "attention_kl", "embedding_mse", "cosine")
"""Every loss term, by the name its weight goes under."""

PRESETS: dict[str, dict[str, float]] = {
    # KnGPT2's intermediate-layer KD (ILKD): embedding, attention and hidden-state matching plus the
    # teacher's soft targets.
    "ilkd": {"embedding_mse": 1.0, "attention_kl": 1.0, "hidden_mse": 1.0, "logit_kl": 1.0},
    # Plain logit distillation (Hinton et al. 2015).
    "logits": {"logit_kl": 1.0},
    # Sentence encoders without an LM head: match the pooled embedding and every block's output.
    "embedding": {"cosine": 1.0, "hidden_mse": 1.0},
}
"""Named loss mixes: term -> weight (terms left out weigh 0)."""

LOGIT_TERMS = ("logit_kl", "ce")


def resolve_weights(preset: str, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The weight of every term in :data:`TERMS`: the preset's, then ``overrides`` on top.

    Raises:
        TensorLMError: an unknown preset or term, or a negative or non-finite weight.
    """
    if preset not in PRESETS:
        raise TensorLMError(f"distill loss preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    weights = dict.fromkeys(TERMS, 0.0)
    weights.update(PRESETS[preset])
    for term, value in (overrides or {}).items():
        if term not in TERMS:
            raise TensorLMError(f"distill loss term {term!r} is unknown; choose from {list(TERMS)}")
        value = float(value)
        if not (value >= 0.0 and value < float("inf")):
            raise TensorLMError(f"distill loss weight {term}={value} must be finite and >= 0")
        weights[term] = value
    if not any(weights.values()):
        raise TensorLMError(f"distill loss weights {weights} are all zero; give one term a positive weight")
    return weights


def required_outputs(weights: Mapping[str, float]) -> dict[str, bool]:
    """The ``output_hidden_states`` / ``output_attentions`` flags a forward pass needs for ``weights``.

    Hidden states are requested only for ``hidden_mse``, ``embedding_mse`` or ``cosine`` (the last when a
    model has no ``last_hidden_state``), attentions only for ``attention_kl`` (which needs eager attention).
    """
    return {
        "output_hidden_states": any(weights[t] > 0 for t in ("hidden_mse", "embedding_mse", "cosine")),
        "output_attentions": weights["attention_kl"] > 0,
    }


def identity_layer_map(num_student_layers: int) -> dict[int, int]:
    """``{i: i}`` for every student block."""
    return {i: i for i in range(num_student_layers)}


def check_layer_map(layer_map: Mapping[int, int], num_student_layers: int, num_teacher_layers: int) -> None:
    """Raise :class:`TensorLMError` unless every pair names an existing student and teacher block."""
    if not layer_map:
        raise TensorLMError("distill layer_map is empty; map at least one student block to a teacher block")
    for s, t in layer_map.items():
        if not (0 <= s < num_student_layers and 0 <= t < num_teacher_layers):
            raise TensorLMError(
                f"distill layer_map pair {s}->{t} is out of range: student blocks are 0..{num_student_layers - 1},"
                f" teacher blocks 0..{num_teacher_layers - 1}"
            )


def _token_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` float mask of the positions that count (all ones without ``attention_mask``)."""
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.float32, device=like.device)
    return attention_mask.to(device=like.device, dtype=torch.float32)


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * mean_tokens KL(softmax(z_t/T) || softmax(z_s/T))`` (Hinton et al. 2015).

    Args:
        student_logits, teacher_logits: ``(B, T, V)`` (or ``(B, V)``).
        temperature: ``T > 0``.
        attention_mask: ``(B, T)``, 1 where a token counts.

    Raises:
        TensorLMError: different shapes (e.g. vocabularies) or a non-positive temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise TensorLMError(
            f"logit_kl: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; teacher and student need the same vocabulary"
        )
    if temperature <= 0:
        raise TensorLMError(f"logit_kl: temperature {temperature} must be > 0")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, T)
    if kl.dim() == 1:
        return kl.mean() * temperature**2
    mask = _token_mask(attention_mask, kl)  # (B, T)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0) * temperature**2


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting ``input_ids[:, t+1]`` from ``logits[:, t]`` (nats per token).

    Args:
        logits: ``(B, T, V)``; input_ids: ``(B, T)``; attention_mask: ``(B, T)`` (a target counts when it
            and its context position are both real tokens).
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view_as(targets)  # (B, T-1)
    mask = _token_mask(attention_mask, input_ids)  # (B, T)
    mask = mask[:, 1:] * mask[:, :-1]  # (B, T-1)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def masked_mse(student: torch.Tensor, teacher: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens and features of ``(student - teacher)^2``; both ``(B, T, d)``."""
    if student.shape != teacher.shape:
        raise TensorLMError(f"hidden-state MSE: student {tuple(student.shape)} and teacher "
                            f"{tuple(teacher.shape)} differ; the widths must match")
    mask = _token_mask(attention_mask, student)  # (B, T)
    sq = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, T)
    return (sq * mask).sum() / mask.sum().clamp_min(1.0)


def _mapped(student: tuple, teacher: tuple, layer_map: Mapping[int, int], offset: int,
            what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs ``(student[s + offset], teacher[t + offset])`` for every mapped block ``s -> t``."""
    if not student or not teacher:
        raise TensorLMError(
            f"distill: the models returned no {what}; "
            + ("attention outputs need attn_implementation='eager'" if what == "attentions"
               else "call them with output_hidden_states=True")
        )
    check_layer_map(layer_map, len(student) - offset, len(teacher) - offset)
    return [(student[s + offset], teacher[t + offset]) for s, t in layer_map.items()]


def hidden_mse(student_hidden: tuple, teacher_hidden: tuple, layer_map: Mapping[int, int],
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_{s -> t} masked_mse(H_s[s + 1], H_t[t + 1])`` over the block outputs (TinyBERT eq. 8).

    Args:
        student_hidden, teacher_hidden: ``hidden_states`` tuples of ``(B, T, d)`` (embedding output
            first, then one per block).
        layer_map: student block -> teacher block (0-based).

    Raises:
        TensorLMError: a block the models do not have, or widths that differ.
    """
    pairs = _mapped(student_hidden, teacher_hidden, layer_map, 1, "hidden states")
    return sum(masked_mse(s, t, attention_mask) for s, t in pairs)


def attention_kl(student_attn: tuple, teacher_attn: tuple, layer_map: Mapping[int, int],
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_{s -> t} mean_{heads, queries} KL(A_t[t] || A_s[s])`` over the attention distributions.

    Args:
        student_attn, teacher_attn: ``attentions`` tuples of ``(B, H, T, T)`` row-stochastic matrices
            (softmax over keys, eager attention, no dropout).
        layer_map: student block -> teacher block (0-based).
        attention_mask: ``(B, T)``; padded query rows are left out (padded keys carry 0 in both).

    Raises:
        TensorLMError: no attentions returned, a block out of range, or different head counts.
    """
    total = 0.0
    for a_s, a_t in _mapped(student_attn, teacher_attn, layer_map, 0, "attentions"):
        if a_s.shape != a_t.shape:
            raise TensorLMError(f"attention KL: student attention {tuple(a_s.shape)} and teacher "
                                f"{tuple(a_t.shape)} differ; heads and lengths must match")
        a_s, a_t = a_s.float(), a_t.float()  # (B, H, T, T)
        tiny = torch.finfo(torch.float32).tiny
        terms = torch.where(a_t > 0, a_t * (a_t.clamp_min(tiny).log() - a_s.clamp_min(tiny).log()), 0.0)
        kl = terms.sum(-1).mean(1)  # (B, T): per query, mean over heads
        mask = _token_mask(attention_mask, kl)  # (B, T)
        total = total + (kl * mask).sum() / mask.sum().clamp_min(1.0)
    return total


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_batch (1 - cos(mean_pool(H_s), mean_pool(H_t)))``; hidden states ``(B, T, d)``."""
    e_s = mean_pool(student_hidden, attention_mask)  # (B, d)
    e_t = mean_pool(teacher_hidden, attention_mask)  # (B, d)
    return (1.0 - F.cosine_similarity(e_s, e_t, dim=-1)).mean()


def distillation_loss(student_out, teacher_out, weights: Mapping[str, float], *,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      temperature: float = 1.0, layer_map: Mapping[int, int] | None = None,
                      teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the terms with a positive weight.

    Args:
        student_out, teacher_out: Hugging Face model outputs of one batch (the teacher's computed under
            ``torch.no_grad``), with hidden states / attentions as :func:`required_outputs` asks.
        weights: term -> weight, as from :func:`resolve_weights`.
        input_ids: ``(B, T)`` (targets of ``ce``); attention_mask: ``(B, T)`` or ``None``.
        temperature: of ``logit_kl``.
        layer_map: student block -> teacher block; identity over the student's blocks when ``None``.
        teacher_topk: ``(indices (B, T, k), logprobs (B, T, k), rest (B, T))`` of a top-k teacher store built
            at ``temperature``; ``logit_kl`` is then ``T^2 topk_kl(z_s / T, ...)``
            (:func:`tensorlm.heal.teacher_store.topk_kl`) and needs no ``teacher_out.logits``.

    Returns:
        ``(loss, parts)``: the scalar to minimise and each weighted term's unweighted value (floats).

    Raises:
        TensorLMError: a logit term for a model without logits, or any error of the terms.
    """
    total = torch.zeros((), device=input_ids.device)
    parts: dict[str, float] = {}
    hidden_s = getattr(student_out, "hidden_states", None)
    hidden_t = getattr(teacher_out, "hidden_states", None)
    if layer_map is None and hidden_s:
        layer_map = identity_layer_map(len(hidden_s) - 1)
    if layer_map is None and getattr(student_out, "attentions", None):
        layer_map = identity_layer_map(len(student_out.attentions))
    for term in TERMS:
        weight = weights.get(term, 0.0)
        if weight <= 0:
            continue
        if term in LOGIT_TERMS and getattr(student_out, "logits", None) is None:
            raise TensorLMError(f"distill loss term {term!r} needs logits; this model returns none "
                                "(a sentence encoder): use the 'embedding' preset")
        if term == "logit_kl" and teacher_topk is not None:
            value = topk_kl(student_out.logits / temperature, *teacher_topk,
                            None if attention_mask is None else attention_mask.bool()) * temperature**2
        elif term == "logit_kl":
            value = logit_kl(student_out.logits, teacher_out.logits, temperature, attention_mask)
        elif term == "ce":
            value = next_token_ce(student_out.logits, input_ids, attention_mask)
        elif term == "hidden_mse":
            value = hidden_mse(hidden_s, hidden_t, layer_map, attention_mask)
        elif term == "attention_kl":
            value = attention_kl(student_out.attentions, teacher_out.attentions, layer_map, attention_mask)
        elif term == "embedding_mse":
            if not hidden_s or not hidden_t:
                raise TensorLMError("embedding MSE: call the models with output_hidden_states=True")
            value = masked_mse(hidden_s[0], hidden_t[0], attention_mask)
        else:  # cosine
            value = cosine_loss(last_hidden(student_out), last_hidden(teacher_out), attention_mask)
        total = total + weight * value
        parts[term] = float(value.detach())
    return total, parts
