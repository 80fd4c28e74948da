"""Agreement between a compressed student and its uncompressed teacher, on the teacher's own terms.

* Encoders: the mean cosine between student and teacher sentence embeddings (mean-pooled last hidden states,
  :func:`tensorlm.evaluate.sts.sentence_embeddings`); 1.0 means identical directions.
* Causal LMs: ``KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))`` of the next-token
  distributions, averaged over every position of non-overlapping ``context``-token windows of held-out text
  (nats per token; 0 means identical predictions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tensorlm.errors import TensorLMError
from tensorlm.evaluate.perplexity import causal_logits, context_limit, rows_per_forward
from tensorlm.evaluate.runtime import inference, model_device
from tensorlm.evaluate.sts import sentence_embeddings


def embedding_agreement(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> float:
    """Mean over ``sentences`` of ``cos(student embedding, teacher embedding)``, in [-1, 1].

    Raises:
        TensorLMError: no sentences, or the two embedding widths differ.
    """
    options = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
    ours = sentence_embeddings(student, tokenizer, sentences, **options)  # (N, d)
    theirs = sentence_embeddings(teacher, tokenizer, sentences, **options)  # (N, d)
    if ours.shape != theirs.shape:
        raise TensorLMError(
            f"student embeddings {tuple(ours.shape)} and teacher embeddings {tuple(theirs.shape)} differ in width"
        )
    return float(F.cosine_similarity(ours, theirs, dim=-1).mean())


def causal_kl(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    text: str,
    *,
    context: int = 1024,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Mean per-token ``KL(teacher || student)`` in nats over ``text``.

    Args:
        student, teacher: causal LMs returning ``.logits (B, T, V)`` with the same vocabulary.
        tokenizer: their shared tokenizer.
        text: held-out text, tokenized as a whole.
        context: window length, clipped to the smaller number of positions of the two models.
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass, fewer when their logits exceed
            :data:`tensorlm.evaluate.perplexity.LOGITS_BUDGET`.
        progress: show a progress bar (only on a terminal).

    Raises:
        TensorLMError: bad context / batch_size / max_tokens, an empty text, different vocabularies.
    """
    limits = [n for n in (context_limit(student), context_limit(teacher)) if n is not None]
    context = min([context, *limits])
    if context < 1 or batch_size < 1:
        raise TensorLMError(f"causal_kl context {context} and batch_size {batch_size} must be >= 1")
    if max_tokens is not None and max_tokens < 1:
        raise TensorLMError(f"causal_kl max_tokens {max_tokens} must be >= 1 (or None for the whole text)")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)[:max_tokens]  # (N,)
    if ids.numel() == 0:
        raise TensorLMError("causal_kl got a text with no tokens")
    windows = list(ids.split(context))  # non-overlapping, the last one may be shorter
    device = model_device(student)
    total, positions = 0.0, 0
    rows = rows_per_forward(student, context, batch_size)
    bar = tqdm(total=len(windows), desc="causal KL", disable=None if progress else True)
    with inference(student), inference(teacher), bar:
        for start in range(0, len(windows), rows):
            group = windows[start : start + rows]
            for size in sorted({w.numel() for w in group}):
                batch = torch.stack([w for w in group if w.numel() == size])  # (B, T)
                log_s = F.log_softmax(causal_logits(student, batch.to(device)).float(), dim=-1)  # (B, T, V)
                teacher_logits = causal_logits(teacher, batch.to(model_device(teacher)))
                log_t = F.log_softmax(teacher_logits.to(device).float(), dim=-1)  # (B, T, V)
                if log_t.shape != log_s.shape:
                    raise TensorLMError(
                        f"teacher logits {tuple(log_t.shape)} and student logits {tuple(log_s.shape)} differ"
                    )
                total += F.kl_div(log_s, log_t, log_target=True, reduction="sum").item()
                positions += batch.numel()
            bar.update(len(group))
    return total / positions
