"""A greedy generation sample, so that a reader of a report sees whether a compressed model still speaks."""

from __future__ import annotations

import torch
from torch import nn

from tensorlm.evaluate.runtime import inference, model_device

SAMPLE_PROMPT = "The capital of France is"
SAMPLE_TOKENS = 32


def greedy_sample(model: nn.Module, tokenizer, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = SAMPLE_TOKENS
                  ) -> str:
    """The ``max_new_tokens`` tokens ``model`` appends to ``prompt`` by greedy decoding (KV cache on), decoded.

    Args:
        model: a Hugging Face causal LM (``generate``).
        tokenizer: its tokenizer.
        prompt: the text to continue.
        max_new_tokens: how many tokens to add (fewer if the model emits its end-of-sequence token).

    Returns:
        The continuation alone, without the prompt.
    """
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model_device(model))  # (1, T)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with inference(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)  # (1, T + new)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
