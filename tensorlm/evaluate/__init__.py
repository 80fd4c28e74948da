"""The evaluation harness: one entry point per model kind, and how every evaluator runs a model.

Every evaluator takes any ``nn.Module`` with the Hugging Face call convention (``model(input_ids=...,
attention_mask=...)`` returning ``.logits`` or hidden states), runs it in eval mode without gradients on the
device its parameters live on, and restores its training flag afterwards. Every figure names its protocol
(DESIGN.md, "Evaluation protocols").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tensorlm.errors import TensorLMError

KINDS = ("encoder", "causal-lm")
QUICK_WIKITEXT_TOKENS = 16_384
QUICK_LAMBADA_PASSAGES = 500


@contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode under ``torch.no_grad()``; restore its training flag on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def evaluate_model(
    model: nn.Module,
    tokenizer,
    kind: str,
    *,
    data_dir: str | os.PathLike | None = None,
    quick: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """The standard benchmarks for a model kind.

    * ``"encoder"``: ``stsb_spearman`` (STS-B test, 1,379 pairs) and ``sickr_spearman`` (SICK-R test,
      4,927 pairs); mean-pooled last hidden states, cosine, Spearman as a fraction. ``quick`` keeps the full
      sets (together they take well under a minute for MiniLM on 2 CPU cores).
    * ``"causal-lm"``: ``wikitext2_ppl_sliding`` (context 1024, stride 512), ``wikitext2_ppl_chunked``
      (1024-token windows), ``lambada_acc`` and ``lambada_ppl`` (target-token perplexity). ``quick`` scores
      the first 16,384 tokens of WikiText-2 and the first 500 LAMBADA passages, and the protocols say so.

    Args:
        model: the model (left in the training mode it had).
        tokenizer: its Hugging Face tokenizer.
        kind: ``"encoder"`` or ``"causal-lm"``.
        data_dir: the benchmark folder (:func:`tensorlm.data.resolve_data_dir`); ``None`` reads
            ``$TENSORLM_DATA``, and without it the hub.
        quick: the documented subsets above.

    Returns:
        ``(metrics, protocols)``: metric name -> value and metric name -> protocol description, same keys.

    Raises:
        TensorLMError: unknown ``kind``, missing data.
    """
    from tensorlm.evaluate.lambada import lambada
    from tensorlm.evaluate.perplexity import perplexity
    from tensorlm.evaluate.sts import STS_PROTOCOL, sts_spearman

    if kind not in KINDS:
        raise TensorLMError(f"model kind {kind!r} is unknown; choose one of {list(KINDS)}")
    metrics: dict[str, float] = {}
    protocols: dict[str, str] = {}
    if kind == "encoder":
        for key, dataset, label in (("stsb_spearman", "stsb", "STS-B"), ("sickr_spearman", "sick", "SICK-R")):
            metrics[key] = sts_spearman(model, tokenizer, dataset=dataset, split="test", data_dir=data_dir)
            protocols[key] = f"{label} test, {STS_PROTOCOL}"
        return metrics, protocols

    from tensorlm.data import load_wikitext2_test

    text = load_wikitext2_test(data_dir)
    max_tokens = QUICK_WIKITEXT_TOKENS if quick else None
    name = "wikitext-2-raw test" + (f" (quick: first {QUICK_WIKITEXT_TOKENS:,} tokens)" if quick else "")
    for protocol in ("sliding", "chunked"):
        result = perplexity(model, tokenizer, text, protocol=protocol, max_tokens=max_tokens, name=name)
        metrics[f"wikitext2_ppl_{protocol}"] = result["perplexity"]
        protocols[f"wikitext2_ppl_{protocol}"] = result["protocol"]
    result = lambada(model, tokenizer, data_dir=data_dir, limit=QUICK_LAMBADA_PASSAGES if quick else None)
    metrics["lambada_acc"] = result["accuracy"]
    metrics["lambada_ppl"] = result["perplexity"]
    protocols["lambada_acc"] = f"{result['protocol']}; last-word accuracy (greedy, every token)"
    protocols["lambada_ppl"] = f"{result['protocol']}; perplexity of the target words' tokens"
    return metrics, protocols
