"""LAMBADA last-word prediction (Paperno et al. 2016; OpenAI's detokenized test set, as GPT-2 reports it).

Each passage is split at its last space into a context and a target word. The target is tokenised as a
continuation, ``" " + word``, separately from the context. A passage counts as correct when greedy decoding
reproduces every target token: the argmax of the logits at each target position equals the target token.
Perplexity is over the target tokens: ``exp(sum of target-token NLL / number of target tokens)``; the
per-word figure ``exp(sum of NLL / passages)`` (lm-evaluation-harness's ``perplexity``) is returned too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tensorlm.data import load_lambada
from tensorlm.errors import TensorLMError
from tensorlm.evaluate.perplexity import causal_logits, context_limit
from tensorlm.evaluate.runtime import inference, model_device


def lambada(
    model: nn.Module,
    tokenizer,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Last-word accuracy and target perplexity on the LAMBADA test set (5,153 passages).

    Args:
        model: a causal LM returning ``.logits (B, T, V)``.
        tokenizer: its tokenizer.
        data_dir: benchmark folder (``None``: ``$TENSORLM_DATA``, else the hub).
        limit: score only the first ``limit`` passages.
        batch_size: passages per forward pass.
        progress: show a progress bar (only on a terminal).

    Returns:
        As :func:`last_word_scores`, with ``protocol`` naming the set and the number of passages.

    Raises:
        TensorLMError: missing data, ``limit < 1``.
    """
    passages = load_lambada(data_dir)
    if limit is not None:
        if limit < 1:
            raise TensorLMError(f"lambada limit {limit} must be >= 1 (or None for all 5,153 passages)")
        passages = passages[:limit]
    result = last_word_scores(model, tokenizer, passages, batch_size=batch_size, progress=progress)
    subset = f"first {len(passages):,} passages" if limit is not None else f"{len(passages):,} passages"
    result["protocol"] = f"LAMBADA OpenAI test, {subset}, target ' ' + last word tokenised as a continuation"
    return result


def last_word_scores(
    model: nn.Module, tokenizer, passages: Sequence[str], *, batch_size: int = 8, progress: bool = True
) -> dict:
    """Score the last word of each passage (module docstring).

    Contexts longer than the model's positions keep their last tokens.

    Returns:
        ``accuracy`` (fraction of passages whose every target token is the argmax), ``perplexity``
        (over target tokens), ``word_perplexity`` (per passage), ``nll`` (mean per target token, nats),
        ``n`` (passages) and ``target_tokens``.

    Raises:
        TensorLMError: no passages, a passage without a space, ``batch_size < 1``.
    """
    if len(passages) == 0:
        raise TensorLMError("lambada got no passages")
    if batch_size < 1:
        raise TensorLMError(f"lambada batch_size {batch_size} must be >= 1")
    examples = [_encode(tokenizer, passage, context_limit(model)) for passage in passages]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    correct, nll, target_tokens = 0, 0.0, 0
    with inference(model), tqdm(total=len(examples), desc="lambada", disable=None if progress else True) as bar:
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(inputs) for inputs, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T), right padding
            for row, (inputs, _) in enumerate(batch):
                input_ids[row, : len(inputs)] = torch.tensor(inputs)
                mask[row, : len(inputs)] = 1
            k = max(len(targets) for _, targets in batch)
            ends = torch.tensor([len(inputs) for inputs, _ in batch])  # (B,)
            keep = (ends[:, None] - k + torch.arange(k)).clamp(min=0)  # (B, k): the last k positions of each row
            logits = causal_logits(model, input_ids.to(device), mask.to(device), keep=keep.to(device))  # (B, k, V)
            for row, (_, targets) in enumerate(batch):
                predicting = logits[row, k - len(targets) :].float()  # (len(targets), V)
                target = torch.tensor(targets, device=predicting.device)  # (k,)
                correct += int(bool((predicting.argmax(dim=-1) == target).all()))
                nll += F.cross_entropy(predicting, target, reduction="sum").item()
                target_tokens += len(targets)
            bar.update(len(batch))
    return {
        "accuracy": correct / len(examples),
        "perplexity": math.exp(nll / target_tokens),
        "word_perplexity": math.exp(nll / len(examples)),
        "nll": nll / target_tokens,
        "n": len(examples),
        "target_tokens": target_tokens,
    }


def _encode(tokenizer, passage: str, limit: int | None) -> tuple[list[int], list[int]]:
    """``(inputs, targets)``: the model's input ids (context + all target tokens but the last) and the target ids.

    The logits at the last ``len(targets)`` input positions predict the targets.
    """
    context, separator, word = passage.rpartition(" ")
    if not separator or not word:
        raise TensorLMError(f"lambada passage {passage[-60:]!r} has no last word after a space")
    context_ids = tokenizer(context)["input_ids"]
    targets = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not context_ids or not targets:
        raise TensorLMError(f"lambada passage {passage[-60:]!r} tokenises to an empty context or target")
    inputs = (context_ids + targets)[:-1]
    if limit is not None and len(inputs) > limit:
        if len(targets) > limit:
            raise TensorLMError(f"lambada target {word!r} has {len(targets)} tokens; the model has {limit}")
        inputs = inputs[-limit:]
    return inputs, targets
