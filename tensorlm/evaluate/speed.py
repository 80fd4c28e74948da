"""Forward latency: wall-clock seconds per forward pass on random token ids, median over repeats."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.evaluate.runtime import inference, model_device


def _timed_calls(model: nn.Module, input_ids: torch.Tensor, device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (eval mode, ``no_grad``)."""
    times = []
    with inference(model):
        for i in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(input_ids=input_ids)
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def forward_latency(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    repeats: int = 10,
    warmup: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Time ``model(input_ids)`` for random ids of shape ``(batch_size, seq_len)``.

    The model runs in eval mode under ``no_grad`` on its own device; ``warmup`` untimed calls come first,
    and CUDA work is synchronised before each clock reading.

    Args:
        model: any model taking ``input_ids``.
        batch_size, seq_len: the input shape.
        repeats: timed calls (>= 1).
        warmup: untimed calls before them (>= 0).
        vocab_size: ids are drawn from ``[0, vocab_size)``; default ``model.config.vocab_size``.
        seed: seed of the id generator.

    Returns:
        ``median_s``, ``mean_s``, ``min_s``, ``max_s`` (seconds per call), ``tokens_per_s`` (from the median),
        ``batch_size``, ``seq_len``, ``repeats``, ``warmup``, ``device``.

    Raises:
        TensorLMError: non-positive shape or repeats, negative warmup, unknown vocabulary size.
    """
    if batch_size < 1 or seq_len < 1 or repeats < 1 or warmup < 0:
        raise TensorLMError(
            f"forward_latency batch_size {batch_size}, seq_len {seq_len}, repeats {repeats} must be >= 1 "
            f"and warmup {warmup} >= 0"
        )
    vocab_size = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab_size:
        raise TensorLMError("forward_latency needs vocab_size: the model has no config.vocab_size")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)  # (B, T)
    times = _timed_calls(model, input_ids, device, warmup, repeats)
    median = statistics.median(times)
    return {
        "median_s": median,
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "tokens_per_s": batch_size * seq_len / median,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
