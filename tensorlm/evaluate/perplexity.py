"""Token-level perplexity of a causal LM on a long text, by sliding or non-overlapping windows.

``perplexity = exp(sum of NLL over scored tokens / number of scored tokens)`` (natural log).

* ``sliding`` (the Hugging Face perplexity guide, "Perplexity of fixed-length models"): windows of ``context``
  tokens start every ``stride`` tokens; the first window scores all its tokens but the first, each later
  window scores only the tokens that no earlier window scored (its last ``stride``), so every token but the
  first is scored exactly once with at least ``context - stride`` tokens of history.
* ``chunked``: non-overlapping windows of ``context`` tokens, each scoring all its tokens but its first.

Tokens are the tokenizer's ids of the whole text (joined as given). A ``context`` longer than the model's
number of positions is clipped to it and ``stride`` scaled by the same factor (1024/512 on a 256-position
model becomes 256/128), and the protocol string says so.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tensorlm.errors import TensorLMError
from tensorlm.evaluate.runtime import inference, model_device

PROTOCOLS = ("sliding", "chunked")
LOGITS_BUDGET = 1 << 30
"""Bytes of float32 logits (1 GiB) that one forward pass of the causal evaluators may produce. Several such
tensors are alive at once (logits, log-probabilities, teacher and student): with Gemma 3's 262,144-token
vocabulary, four 512-token windows would make each 2 GiB; SmolLM2's (49,152) batches are unchanged."""


def _windowing(model: nn.Module, protocol: str, context: int, stride: int, batch_size: int,
               max_tokens: int | None) -> tuple[int, int, int | None]:
    """``(context, stride, limit)`` after the checks of :func:`perplexity`; ``limit`` is the model's
    position count when it clipped ``context`` (``stride`` scaled by the same factor), else None.

    Raises:
        TensorLMError: unknown protocol, bad context / stride / batch_size / max_tokens.
    """
    if protocol not in PROTOCOLS:
        raise TensorLMError(f"perplexity protocol {protocol!r} is unknown; choose one of {list(PROTOCOLS)}")
    if protocol == "chunked":
        stride = context
    if not 1 <= stride <= context:
        raise TensorLMError(f"perplexity stride {stride} must lie in [1, context={context}]")
    limit = context_limit(model)
    if limit is not None and context > limit:
        stride = max(1, stride * limit // context)
        context = limit
    else:
        limit = None
    if context < 2:
        raise TensorLMError(f"perplexity context {context} must be >= 2 tokens")
    if batch_size < 1:
        raise TensorLMError(f"perplexity batch_size {batch_size} must be >= 1")
    if max_tokens is not None and max_tokens < 2:
        raise TensorLMError(f"perplexity max_tokens {max_tokens} must be >= 2 (or None for the whole text)")
    return context, stride, limit


def _protocol_phrase(protocol: str, context: int, stride: int, limit: int | None) -> str:
    """How the windows were laid, e.g. ``"sliding, context 1024, stride 512"``."""
    if protocol == "sliding":
        how = f"sliding, context {context}, stride {stride}"
    else:
        how = f"chunked, non-overlapping windows of {context}"
    if limit is not None:
        how += f" (clipped to the model's {limit:,} positions)"
    return how


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    protocol: str = "sliding",
    context: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    name: str = "text",
    progress: bool = True,
) -> dict:
    """Token-level perplexity of ``model`` on ``text``.

    Args:
        model: a causal LM returning ``.logits (B, T, V)`` for ``input_ids (B, T)``.
        tokenizer: its tokenizer; the text is tokenized once, as a whole.
        text: the text (e.g. :func:`tensorlm.data.load_wikitext2_test`).
        protocol: ``"sliding"`` or ``"chunked"`` (module docstring).
        context: window length in tokens; clipped to the model's positions (``n_positions`` /
            ``max_position_embeddings``), when it scales ``stride`` by the same factor.
        stride: sliding step in tokens, ``1 <= stride <= context`` (ignored by ``chunked``).
        max_tokens: score only the first ``max_tokens`` tokens of the text.
        batch_size: windows per forward pass (full windows only; memory ~ ``batch_size * (stride + 1) * V * 4`` B,
            fewer windows when that exceeds :data:`LOGITS_BUDGET`).
        name: how the protocol string names the text, e.g. ``"wikitext-2-raw test"``.
        progress: show a progress bar (only on a terminal).

    Returns:
        ``perplexity``, ``nll`` (mean NLL in nats per scored token), ``tokens`` (scored tokens),
        ``text_tokens`` (tokens in the text after ``max_tokens``), ``windows``, ``context``, ``stride``
        and ``protocol``, e.g. ``"wikitext-2-raw test, sliding, context 1024, stride 512, token-level,
        286,221 tokens (286,220 scored)"``.

    Raises:
        TensorLMError: unknown protocol, bad context / stride / max_tokens, fewer than 2 tokens.
    """
    context, stride, limit = _windowing(model, protocol, context, stride, batch_size, max_tokens)
    clipped = limit is not None
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # (N,)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise TensorLMError(f"perplexity needs a text of >= 2 tokens; {name!r} has {ids.numel()}")
    windows = sliding_windows(ids.numel(), context, stride)
    nll, scored = _score_windows(model, ids, windows, batch_size, progress)
    mean_nll = nll / scored
    how = _protocol_phrase(protocol, context, stride, limit if clipped else None)
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": scored,
        "text_tokens": ids.numel(),
        "windows": len(windows),
        "context": context,
        "stride": stride,
        "protocol": f"{name}, {how}, token-level, {ids.numel():,} tokens ({scored:,} scored)",
    }


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows ``(begin, end, n_scored)`` over ``n_tokens`` tokens.

    A window feeds tokens ``[begin, end)`` and scores its last ``n_scored`` tokens (each predicted from the
    tokens before it in the window). The first window scores all but its first token; each later one scores
    the ``end - previous end`` new tokens, at most ``end - begin - 1``. ``stride == context`` gives
    non-overlapping chunks, each scoring all but its first token. Windows that score nothing are dropped.
    """
    windows = []
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        n_scored = min(end - previous_end, end - begin - 1)
        if n_scored > 0:
            windows.append((begin, end, n_scored))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def context_limit(model: nn.Module) -> int | None:
    """The model's number of positions (``config.n_positions`` or ``max_position_embeddings``), if known."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def rows_per_forward(model: nn.Module, positions: int, batch_size: int) -> int:
    """Windows per forward pass: ``batch_size`` lowered so that ``rows * positions * V * 4`` bytes of float32
    logits ``(rows, positions, V)`` stay within :data:`LOGITS_BUDGET` (``V``: ``model.config.vocab_size``); at
    least 1, and ``batch_size`` when the model has no ``config.vocab_size``."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return batch_size
    return max(1, min(batch_size, LOGITS_BUDGET // (4 * positions * vocab)))


def causal_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    keep: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``model(input_ids)`` logits (``.logits`` of a Hugging Face output, or its first item).

    Args:
        input_ids: ``(B, T)`` token ids; ``attention_mask`` ``(B, T)`` or None.
        keep: None for every position, ``(B, T, V)``; an int ``k`` for the last ``k`` positions, ``(B, k, V)``;
            an integer tensor ``(B, k)`` of positions per row, ``(B, k, V)``. Models whose ``forward`` takes
            transformers' ``logits_to_keep`` project only those positions onto the vocabulary (the head is a
            fifth of SmolLM2's multiply-adds per token); others are sliced after the full forward.
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    slices = keep is not None and "logits_to_keep" in inspect.signature(model.forward).parameters
    if slices:
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if keep is None or slices:
        return logits
    if isinstance(keep, int):
        return logits[:, -keep:]
    return torch.take_along_dim(logits, keep[..., None], dim=1)  # (B, k, V)


def _score_windows(
    model: nn.Module, ids: torch.Tensor, windows: list[tuple[int, int, int]], batch_size: int, progress: bool
) -> tuple[float, int]:
    """Sum of NLL (nats) and count over the scored tokens of ``windows``; same-length windows share a batch."""
    device = model_device(model)
    nll, scored = 0.0, 0
    batches: list[list[tuple[int, int, int]]] = []
    rows = rows_per_forward(model, max(n for *_, n in windows) + 1, batch_size)
    for begin, end, n_scored in windows:
        last = batches[-1] if batches else None
        if last and len(last) < rows and last[0][1] - last[0][0] == end - begin:
            last.append((begin, end, n_scored))
        else:
            batches.append([(begin, end, n_scored)])
    with inference(model), tqdm(total=len(windows), desc="perplexity", disable=None if progress else True) as bar:
        for batch in batches:
            input_ids = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, T)
            keep = max(n_scored for _, _, n_scored in batch) + 1  # logits of the last `keep` positions
            logits = causal_logits(model, input_ids, keep=keep)  # (B, keep, V)
            for row, (_, end, n_scored) in enumerate(batch):
                predicting = logits[row, keep - 1 - n_scored : keep - 1].float()  # (n_scored, V)
                targets = ids[end - n_scored : end].to(device)  # (n_scored,)
                nll += F.cross_entropy(predicting, targets, reduction="sum").item()
                scored += n_scored
            bar.update(len(batch))
    return nll, scored
