"""Speed and memory: forward latency and greedy-decoding throughput on random token ids (median over
repeats after warm-up), and the process's resident memory (current and peak, with a resettable peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.evaluate.runtime import inference, model_device


def _timed_calls(model: nn.Module, input_ids: torch.Tensor, device, warmup: int, repeats: int,
                 kwargs: dict | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (eval mode, ``no_grad``)."""
    times = []
    with inference(model):
        for i in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(input_ids=input_ids, **(kwargs or {}))
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
    model_kwargs: dict | None = None,
) -> dict:
    """Time ``model(input_ids, **model_kwargs)`` for random ids of shape ``(batch_size, seq_len)``.

    The model runs in eval mode under ``no_grad`` on its own device; ``warmup`` untimed calls come first,
    and CUDA work is synchronised before each clock reading.

    Args:
        model: any model taking ``input_ids``.
        batch_size, seq_len: the input shape.
        repeats: timed calls (>= 1).
        warmup: untimed calls before them (>= 0).
        vocab_size: ids are drawn from ``[0, vocab_size)``; default ``model.config.vocab_size``.
        seed: seed of the id generator.
        model_kwargs: further keyword arguments of every call (a causal LM's prefill as ``generate`` runs it:
            :func:`prefill_kwargs`).

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
    times = _timed_calls(model, input_ids, device, warmup, repeats, model_kwargs)
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


def prefill_kwargs(model: nn.Module) -> dict:
    """The keyword arguments of a prefill as ``generate`` runs it: fill the KV cache and project only the last
    position onto the vocabulary (``logits_to_keep=1``, where the model's forward takes it)."""
    kwargs = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def decode_throughput(model: nn.Module, batch_size: int, new_tokens: int = 128, *, prompt_len: int = 8,
                      repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict:
    """Greedy decoding speed of a causal LM: ``generate`` with the KV cache, exactly ``new_tokens`` new tokens.

    The prompt is ``(batch_size, prompt_len)`` random ids below ``config.vocab_size``; end-of-sequence is
    ignored (``min_new_tokens = max_new_tokens``). Each timed call includes the short prefill of the prompt,
    as a user of ``generate`` sees it.

    Returns:
        ``tokens_per_s`` (``batch_size * new_tokens`` / median seconds), ``median_s``, ``min_s``, ``max_s``,
        ``batch_size``, ``new_tokens``, ``prompt_len``, ``repeats``, ``warmup``, ``device``.

    Raises:
        TensorLMError: non-positive sizes or repeats, negative warmup, a model without ``generate``.
    """
    if min(batch_size, new_tokens, prompt_len, repeats) < 1 or warmup < 0 or not hasattr(model, "generate"):
        raise TensorLMError(f"decode_throughput: batch_size {batch_size}, new_tokens {new_tokens}, prompt_len "
                            f"{prompt_len}, repeats {repeats} must be >= 1, warmup {warmup} >= 0, and the model "
                            "must have generate()")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True,
               "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    times = []
    with inference(model):
        for i in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            out = model.generate(ids, **options)  # (B, prompt_len + new_tokens)
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    if out.shape[1] != prompt_len + new_tokens:
        raise TensorLMError(f"decode_throughput: generate returned {out.shape[1] - prompt_len} new tokens, "
                            f"expected {new_tokens}")
    median = statistics.median(times)
    return {"tokens_per_s": batch_size * new_tokens / median, "median_s": median, "min_s": min(times),
            "max_s": max(times), "batch_size": batch_size, "new_tokens": new_tokens, "prompt_len": prompt_len,
            "repeats": repeats, "warmup": warmup, "device": str(device)}


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def resident_mib() -> float:
    """The process's current resident memory in MiB (``VmRSS``; the peak where ``/proc`` is absent)."""
    kib = _status_kib("VmRSS")
    return peak_resident_mib() if kib is None else kib / 1024


def peak_resident_mib() -> float:
    """The process's peak resident memory in MiB since the last :func:`reset_peak_resident` (Linux ``VmHWM``),
    else since it started (``getrusage`` ``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = peak / 1024 if sys.platform == "darwin" else peak
    return kib / 1024


def reset_peak_resident() -> bool:
    """Return freed heap memory to the system (glibc ``malloc_trim``) and reset the peak to the current
    resident memory (Linux: ``5`` into ``/proc/self/clear_refs``). True if the peak was reset."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform.startswith("linux"):
        ctypes.CDLL(libc_name).malloc_trim(0)
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
