"""The evaluation harness: one entry point per model kind, and how every evaluator runs a model.

Every evaluator takes any ``nn.Module`` with the Hugging Face call convention (``model(input_ids=...,
attention_mask=...)`` returning ``.logits`` or hidden states), runs it in eval mode without gradients on the
device its parameters live on, and restores its training flag afterwards. Every figure names its protocol
(DESIGN.md, "Evaluation protocols").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from tensorlm.data import load_lm_text_tail, load_wikitext2_test
from tensorlm.errors import TensorLMError
from tensorlm.evaluate.agreement import causal_kl, embedding_agreement
from tensorlm.evaluate.lambada import lambada
from tensorlm.evaluate.perplexity import perplexity
from tensorlm.evaluate.runtime import inference, model_device
from tensorlm.evaluate.sts import STS_PROTOCOL, sts_spearman

KINDS = ("encoder", "causal-lm")
MODES = ("full", "sweep", "quick")


@dataclass(frozen=True)
class CausalProtocol:
    """How much of each causal-LM benchmark an evaluation mode scores (``None``: all of it).

    Attributes:
        name: the protocol's short name, quoted in every protocol string (``wt2-16k`` ...).
        wikitext_tokens: first tokens of WikiText-2 raw test, sliding windows of 1024, stride 512.
        lambada_passages: first passages of LAMBADA (OpenAI test, 5,153 in all).
        kl_shards: lm_text shards whose held-out tails give the teacher-KL text.
    """

    name: str
    wikitext_tokens: int | None
    lambada_passages: int | None
    kl_shards: int


# The causal-LM protocols sized for a 2-core CPU (SmolLM2-135M scores ~200 tokens a second there).
CAUSAL_PROTOCOLS = {
    "quick": CausalProtocol("wt2-4k", 4_096, 100, 8),
    "sweep": CausalProtocol("wt2-16k", 16_384, 1_000, 16),
    "full": CausalProtocol("wt2-full", None, None, 16),
}
KL_TAIL_CHARS = 2_000
KL_CONTEXT = 512

__all__ = ["CAUSAL_PROTOCOLS", "KINDS", "MODES", "CausalProtocol", "agreement", "evaluate_model", "inference",
           "model_device"]


def _check(kind: str, mode: str) -> None:
    if kind not in KINDS:
        raise TensorLMError(f"model kind {kind!r} is unknown; choose one of {list(KINDS)}")
    if mode not in MODES:
        raise TensorLMError(f"evaluation mode {mode!r} is unknown; choose one of {list(MODES)}")


def evaluate_model(
    model: nn.Module,
    tokenizer,
    kind: str,
    *,
    data_dir: str | os.PathLike | None = None,
    mode: str = "full",
    lambada_max_ppl: float | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The standard benchmarks for a model kind.

    * ``"encoder"``: ``stsb_spearman`` (STS-B test, 1,379 pairs) and ``sickr_spearman`` (SICK-R test,
      4,927 pairs); mean-pooled last hidden states, cosine, Spearman as a fraction. Every mode scores the
      full sets (together they take well under a minute for MiniLM on 2 CPU cores).
    * ``"causal-lm"``: ``wikitext2_ppl`` (WikiText-2 raw test, sliding windows of 1024, stride 512,
      token-level), ``lambada_acc`` and ``lambada_ppl`` (target-token perplexity), on the subsets of
      :data:`CAUSAL_PROTOCOLS`: ``quick`` (``wt2-4k``: 4,096 tokens, 100 passages), ``sweep``
      (``wt2-16k``: 16,384 tokens, 1,000 passages) or ``full`` (``wt2-full``: everything).

    Args:
        model: the model (left in the training mode it had).
        tokenizer: its Hugging Face tokenizer.
        kind: ``"encoder"`` or ``"causal-lm"``.
        data_dir: the benchmark folder (:func:`tensorlm.data.resolve_data_dir`); ``None`` reads
            ``$TENSORLM_DATA``, and without it the hub.
        mode: ``full``, ``sweep`` or ``quick``.
        lambada_max_ppl: (causal) score LAMBADA only when the WikiText-2 perplexity is at most this; above it
            the LAMBADA keys are left out. A broken model's last-word accuracy is about 0, and LAMBADA is most
            of a causal evaluation's time (the ``sweep`` passages hold three times the WikiText-2 tokens).

    Returns:
        ``(metrics, protocols)``: metric name -> value and metric name -> protocol description, same keys.

    Raises:
        TensorLMError: unknown ``kind`` or ``mode``, missing data, ``lambada_max_ppl`` not > 0.
    """
    _check(kind, mode)
    if lambada_max_ppl is not None and not lambada_max_ppl > 0:
        raise TensorLMError(f"lambada_max_ppl {lambada_max_ppl} must be > 0 (or None to always score LAMBADA)")
    metrics: dict[str, float] = {}
    protocols: dict[str, str] = {}
    if kind == "encoder":
        for key, dataset, label in (("stsb_spearman", "stsb", "STS-B"), ("sickr_spearman", "sick", "SICK-R")):
            metrics[key] = sts_spearman(model, tokenizer, dataset=dataset, split="test", data_dir=data_dir)
            protocols[key] = f"{label} test, {STS_PROTOCOL}"
        return metrics, protocols
    sizes = CAUSAL_PROTOCOLS[mode]
    text = load_wikitext2_test(data_dir)
    subset = "" if sizes.wikitext_tokens is None else f", first {sizes.wikitext_tokens:,} tokens"
    result = perplexity(model, tokenizer, text, max_tokens=sizes.wikitext_tokens,
                        name=f"{sizes.name}: wikitext-2-raw test{subset}")
    metrics["wikitext2_ppl"] = result["perplexity"]
    protocols["wikitext2_ppl"] = result["protocol"]
    if lambada_max_ppl is not None and metrics["wikitext2_ppl"] > lambada_max_ppl:
        return metrics, protocols
    result = lambada(model, tokenizer, data_dir=data_dir, limit=sizes.lambada_passages)
    metrics["lambada_acc"] = result["accuracy"]
    metrics["lambada_ppl"] = result["perplexity"]
    protocols["lambada_acc"] = f"{result['protocol']}; last-word accuracy (greedy, every token)"
    protocols["lambada_ppl"] = f"{result['protocol']}; perplexity of the target words' tokens"
    return metrics, protocols


def agreement(student: nn.Module, teacher: nn.Module, tokenizer, kind: str, *,
              data_dir: str | os.PathLike | None = None, mode: str = "full",
              sentences: list[str] | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """How closely ``student`` follows ``teacher`` on held-out data.

    * ``"encoder"``: ``teacher_cosine``, the mean cosine of student and teacher mean-pooled embeddings of
      ``sentences`` (the caller's held-out sentences).
    * ``"causal-lm"``: ``teacher_kl``, KL(teacher || student) in nats per token over windows of 512
      tokens of held-out ``lm_text``: the last 2,000 characters of the first ``kl_shards`` shards
      (:func:`tensorlm.data.load_lm_text_tail`), which training and calibration never read.

    Raises:
        TensorLMError: unknown ``kind`` or ``mode``, missing data, no sentences for an encoder.
    """
    _check(kind, mode)
    if kind == "encoder":
        if not sentences:
            raise TensorLMError("encoder agreement needs held-out sentences")
        value = embedding_agreement(student, teacher, tokenizer, sentences)
        return {"teacher_cosine": value}, {"teacher_cosine": "mean cosine of student and teacher mean-pooled "
                                                             f"embeddings, {len(sentences)} held-out sentences"}
    shards = CAUSAL_PROTOCOLS[mode].kl_shards
    text = load_lm_text_tail(data_dir, shards=shards, chars=KL_TAIL_CHARS)
    value = causal_kl(student, teacher, tokenizer, text, context=KL_CONTEXT)
    return {"teacher_kl": value}, {"teacher_kl": f"KL(teacher || student) per token in nats, held-out lm_text "
                                                 f"(last {KL_TAIL_CHARS:,} characters of {shards} shards), "
                                                 f"windows of {KL_CONTEXT}"}
