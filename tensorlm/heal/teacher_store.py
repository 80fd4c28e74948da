"""A top-k teacher store: the teacher's log-probabilities computed once, for distillation without a teacher pass.

For every position of the training sequences ``ids (N, L)`` the store keeps the teacher's ``k`` largest
log-probabilities ``logprobs (N, L, k)`` (float32), their token ids ``indices (N, L, k)`` (int64) and the
log of the remaining mass ``rest (N, L)`` (``-inf`` when the top ``k`` hold it all). The KL divergence is
then taken over the ``k + 1`` outcomes "token ``i`` of the top k" and "any other token"
(:func:`topk_kl`):

    KL_k = sum_{i in top k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),

with ``q_rest`` the student's mass outside the teacher's top k. This coarse-graining of the vocabulary
never exceeds the full-vocabulary KL (the log-sum inequality) and equals it when ``k`` is the vocabulary
size. The idea follows the cached-teacher distillation of large vocabularies (e.g. sparse/top-k logit KD);
k = 64 by default, as in the issue.

A store is fingerprinted to the teacher (class, config and every tensor's bytes,
:func:`tensorlm.calibrate.model_fingerprint`) and the tokenizer (class and vocabulary);
:meth:`TeacherStore.load` refuses, in one line, a store written for another model or tokenizer.
File: one ``.safetensors`` (``ids``, ``indices``, ``logprobs``, ``rest``) with the fingerprints and ``k``
in its metadata, written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tensorlm.calibrate import model_fingerprint
from tensorlm.errors import TensorLMError

STORE_FORMAT = "1"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) of the tokenizer's class name and its vocabulary (token -> id, sorted)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()


@dataclass
class TeacherStore:
    """The teacher's top-k log-probabilities on ``ids``; see the module docstring for the shapes.

    Attributes:
        ids: ``(N, L)`` int64 training sequences; indices: ``(N, L, k)`` int64; logprobs: ``(N, L, k)`` float32;
        rest: ``(N, L)`` float32 log of the mass outside the top k; model, tokenizer: the fingerprints;
        temperature: the softmax temperature ``T`` of the log-probabilities (``log_softmax(z / T)``).
    """

    ids: torch.Tensor
    indices: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor
    model: str
    tokenizer: str
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the store atomically to ``path`` (``.safetensors``); returns the path."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {"ids": self.ids, "indices": self.indices, "logprobs": self.logprobs, "rest": self.rest}
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": STORE_FORMAT, "model": self.model, "tokenizer": self.tokenizer,
                                "k": str(self.k), "temperature": repr(float(self.temperature))})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # nothing half-written stays behind
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, teacher: nn.Module, tokenizer) -> TeacherStore:
        """The store at ``path``, checked against ``teacher`` and ``tokenizer``.

        Raises:
            TensorLMError: no such file, not a teacher store, or written for another model or tokenizer.
        """
        path = Path(path)
        if not path.is_file():
            raise TensorLMError(f"teacher store {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own types for a damaged or foreign file
            raise TensorLMError(f"teacher store {path} is not a safetensors file ({err})") from None
        if meta.get("format") != STORE_FORMAT or set(tensors) != {"ids", "indices", "logprobs", "rest"}:
            raise TensorLMError(f"teacher store {path} is not a tensorlm teacher store (format {STORE_FORMAT})")
        for what, saved, now in (("model", meta.get("model"), model_fingerprint(teacher)),
                                 ("tokenizer", meta.get("tokenizer"), tokenizer_fingerprint(tokenizer))):
            if saved != now:
                raise TensorLMError(f"teacher store {path} was written for another {what} (fingerprint "
                                    f"{str(saved)[:12]}, this {what} {now[:12]}); rebuild it with build_teacher_store")
        return cls(tensors["ids"], tensors["indices"], tensors["logprobs"], tensors["rest"], meta["model"],
                   meta["tokenizer"], float(meta.get("temperature", "1.0")))


def _topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values (..., k), indices (..., k), log of the rest (...))`` of log-probabilities ``logp (..., V)``."""
    values, indices = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return values, indices, rest


@torch.no_grad()
def build_teacher_store(teacher: nn.Module, tokenizer, sequences: Sequence[torch.Tensor] | torch.Tensor, *,
                        k: int = 64, batch_size: int = 8, temperature: float = 1.0) -> TeacherStore:
    """Run ``teacher`` once over ``sequences`` (``(N, L)`` token ids, training text only) and keep its top ``k``
    of ``log_softmax(logits / temperature)``, in batches of ``batch_size`` sequences, on the teacher's device
    (the store itself is kept on the CPU).

    Raises:
        TensorLMError: ``k`` outside ``[1, vocabulary size]``, or sequences that are not ``(N, L)`` token ids.
    """
    ids = torch.cat(list(sequences)) if not isinstance(sequences, torch.Tensor) else sequences
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise TensorLMError(f"teacher store: sequences must be (N, L) token ids, got {tuple(ids.shape)} {ids.dtype}")
    parts = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size].long().to(_device(teacher))
        logits = teacher(input_ids=batch).logits.float() / temperature  # (B, L, V)
        if not 1 <= k <= logits.shape[-1]:
            raise TensorLMError(f"teacher store: k must be in [1, {logits.shape[-1]}] (the vocabulary), got {k}")
        parts.append(tuple(t.cpu() for t in _topk(F.log_softmax(logits, -1), k)))
    values, indices, rest = (torch.cat(p) for p in zip(*parts, strict=True))
    return TeacherStore(ids.long().cpu(), indices, values, rest, model_fingerprint(teacher),
                        tokenizer_fingerprint(tokenizer), float(temperature))


def _device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def topk_kl(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
            rest: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of ``KL_k(teacher || student)`` from a store slice (module docstring).

    Args:
        student_logits: ``(B, L, V)``; indices, logprobs: ``(B, L, k)``; rest: ``(B, L)``;
        mask: ``(B, L)`` bool of the positions that count (default all).

    Returns:
        A scalar tensor (differentiable in ``student_logits``), in nats per token.
    """
    logq = F.log_softmax(student_logits.float(), -1)
    logq_top = logq.gather(-1, indices)  # (B, L, k)
    per_token = (logprobs.exp() * (logprobs - logq_top)).sum(-1)  # (B, L)
    if indices.shape[-1] < logq.shape[-1]:  # k = V: no rest (and its empty logsumexp has no gradient)
        logq_rest = logq.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (B, L)
        rest = rest.clamp_min(-1e4)  # exp() is exactly 0 there, and 0 * finite stays 0
        per_token = per_token + rest.exp() * (rest - logq_rest)
    return per_token.mean() if mask is None else per_token[mask].mean()
