"""Output sensitivities for rank allocation: the empirical Fisher of a causal LM's loss at each module output.

A whitened truncation loss ``||(W - W~) G^{1/2}||_F^2 = sum_t ||dW x_t||^2`` is an error in the module's
output space, and the same error costs the model very differently in a ``q_proj`` of the first layer and a
``down_proj`` of the last. To second order, with the empirical Fisher for the Hessian of the summed
next-token loss ``L`` and its diagonal over output units and tokens (Optimal Brain Damage, LeCun et al.,
1990; the same diagonal Fisher that FWSVD, Hsu et al., ICLR 2022, uses for weights),

    dL ~= 1/2 sum_t sum_o g_{t,o}^2 (dW x_t)_o^2 ~= 1/2 f sum_t ||dW x_t||^2,

where ``g_{t,o} = dL / dy_{t,o}`` is the gradient at output unit ``o`` of token ``t`` and ``f`` the mean of
``g^2`` over tokens and units. :func:`collect_output_fisher` measures ``E_t[g_{t,o}^2]`` ``(out,)`` for every
named module in one forward and backward pass per calibration batch; ``budget: {sensitivity: fisher}``
(:mod:`tensorlm.allocate`) multiplies each matrix's whitened truncation losses by ``f / 2 * tokens``, so
that the greedy allocation compares estimated increases of the loss (nats) instead of relative errors.

The pass runs the model with every parameter frozen (no weight gradients are formed): the input embedding's
output is made to require a gradient, and a tensor hook on each module's output accumulates ``g^2`` in
float64. Results are cached beside the second moments (``$TENSORLM_CACHE/calibration/fisher-<key>``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tensorlm.calibrate import cache_key, calibration_cache_dir, data_fingerprint, model_fingerprint
from tensorlm.errors import TensorLMError

CACHE_VERSION = 1


def collect_output_fisher(
    model: nn.Module, module_names: Sequence[str], batches: Sequence[torch.Tensor], progress: bool = True, *,
    cache: bool = True, cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the summed next-token loss at each output unit of the named modules.

    Args:
        model: a causal LM called as ``model(input_ids=..., labels=...)`` that returns ``.loss`` (the mean
            next-token cross-entropy, as Hugging Face causal LMs do); left unchanged (parameters' gradient
            flags, training flag and ``.grad`` are restored).
        module_names: modules whose outputs ``(B, L, out)`` are measured.
        batches: calibration token ids, each ``(B, L)`` int64 (training text, never a test split).
        progress: show a tqdm bar.
        cache, cache_dir: read and write the on-disk cache (key: model, module names, data).

    Returns:
        ``{name: (out,) float64}``: ``E_t[(dL/dy_{t,o})^2]`` over all positions of all batches, with ``L`` the
        loss summed over the batch's predicted tokens (so one token's gradient is that of its own loss).

    Raises:
        TensorLMError: no batches, a name that is not a module, a model without an input embedding or a
            ``loss``, a module whose output never received a gradient, non-finite gradients.
    """
    names = list(dict.fromkeys(module_names))
    named = dict(model.named_modules())
    unknown = [n for n in names if n not in named]
    if unknown:
        raise TensorLMError(f"fisher: model has no module(s) {unknown[:3]}")
    if not batches:
        raise TensorLMError("fisher: no calibration batches given")
    folder = calibration_cache_dir(cache_dir)
    key = cache_key(CACHE_VERSION, model_fingerprint(model), names, data_fingerprint(batches))
    path = folder / f"fisher-{key}.safetensors"
    if cache and path.exists():
        found = load_file(path)
        if set(found) == set(names):
            return found
    start = time.perf_counter()
    sums, counts = _accumulate(model, {n: named[n] for n in names}, batches, progress)
    out = {}
    for name in names:
        if name not in sums:
            raise TensorLMError(f"fisher: the output of {name!r} received no gradient from the loss")
        out[name] = sums[name] / counts[name]  # (out,)
        if not torch.isfinite(out[name]).all():
            raise TensorLMError(f"fisher: output gradients of {name!r} hold NaN/Inf")
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp{os.getpid()}")
        save_file(out, str(tmp), metadata={"seconds": f"{time.perf_counter() - start:.1f}"})
        os.replace(tmp, path)
    return out


def _accumulate(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[torch.Tensor],
                progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Forward and backward over ``batches``, one sequence at a time (the logits of a whole batch of a large
    vocabulary would dominate the memory), with hooks; per name the float64 sum of ``g^2`` ``(out,)`` and the
    number of positions. Restores the model's state whatever happens."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None:
        raise TensorLMError(f"fisher: {type(model).__name__} has no input embedding to start the gradient from")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def output_hook(name):
        def hook(module, args, output):
            def grad_hook(grad):  # grad: (B, L, out)
                g2 = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0).to(torch.float64)
                sums[name] = sums[name] + g2 if name in sums else g2
                counts[name] = counts.get(name, 0) + grad[..., 0].numel()
            if output.requires_grad:
                output.register_hook(grad_hook)
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = [embedding.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))]
    handles += [m.register_forward_hook(output_hook(n)) for n, m in modules.items()]
    device = next(iter(model.parameters())).device
    try:
        model.requires_grad_(False)
        model.eval()
        rows = [row[None] for ids in batches for row in ids]  # (1, L) each: one sequence's logits at a time
        for ids in tqdm(rows, desc="fisher", unit="sequence", disable=None if progress else True):
            ids = ids.to(device)
            loss = getattr(model(input_ids=ids, labels=ids), "loss", None)
            if loss is None:
                raise TensorLMError(f"fisher: {type(model).__name__} returned no loss for labels=input_ids; "
                                    "sensitivity needs a causal LM")
            (loss * (ids.shape[1] - 1)).backward()  # the summed token loss of this sequence
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return sums, counts
