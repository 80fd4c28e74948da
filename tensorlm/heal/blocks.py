"""A model's transformer blocks, and the exact arguments each block receives on given inputs.

The block list is found generically: the first ``nn.ModuleList`` in ``named_modules()`` order whose
length is the config's ``num_hidden_layers`` (or GPT-2's ``n_layer``): ``model.layers`` for the Llama
family, ``transformer.h`` for GPT-2, ``encoder.layer`` for BERT. A block is called by its model as
``block(hidden_states, *args, **kwargs)`` (Llama in transformers 5 passes ``position_embeddings`` computed
by ``model.model.rotary_emb``, the causal mask, ``position_ids``; GPT-2 and BERT pass masks positionally).
Rather than rebuild these per architecture, :func:`capture_calls` records them with a forward pre-hook on
every block during one forward pass and :class:`BlockCall` replays them with another hidden state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.evaluate.runtime import model_device

Batch = torch.Tensor | Mapping[str, torch.Tensor]


def num_blocks(model: nn.Module) -> int:
    """``config.num_hidden_layers`` (or ``n_layer``) of a Hugging Face model.

    Raises:
        TensorLMError: the model has no config naming its layer count.
    """
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not isinstance(count, int) or count < 1:
        raise TensorLMError(f"a {type(model).__name__} has no config.num_hidden_layers (or n_layer): cannot find "
                            "its transformer blocks; pass blocks= (the path of its block list)")
    return count


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The path and the block list of ``model``: ``path`` if given, else the first ``nn.ModuleList`` whose
    length equals the config's layer count.

    Raises:
        TensorLMError: ``path`` is not a ModuleList of ``model``; no ModuleList has the layer count.
    """
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList):
            raise TensorLMError(f"blocks {path!r} is not an nn.ModuleList of the {type(model).__name__}")
        return path, blocks
    count = num_blocks(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise TensorLMError(f"no nn.ModuleList of {count} blocks (config.num_hidden_layers) in the "
                        f"{type(model).__name__}; pass blocks= (the path of its block list)")


def block_output(output) -> torch.Tensor:
    """The hidden states a block returns: the tensor itself, or the first element of a tuple (older
    transformers, BERT and GPT-2 with attentions)."""
    return output[0] if isinstance(output, tuple | list) else output


@dataclass
class BlockCall:
    """How a model called one block on one batch, without the hidden-state input.

    Attributes:
        args: positional arguments after ``hidden_states`` (GPT-2: cache, mask, encoder states).
        kwargs: keyword arguments (Llama: ``attention_mask``, ``position_embeddings`` ``((B|1, L, h), (B|1, L, h))``,
            ``position_ids``...); tensors are references (shared across blocks, not copies).
        hidden_in_kwargs: ``hidden_states`` was passed by keyword.
    """

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool = False

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``block``'s output hidden states ``(B, L, d)`` on ``hidden: (B, L, d)`` with the recorded arguments."""
        if self.hidden_in_kwargs:
            return block_output(block(*self.args, hidden_states=hidden, **self.kwargs))
        return block_output(block(hidden, *self.args, **self.kwargs))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what is needed is recorded."""


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """A calibration batch as model keyword arguments: a tensor is ``input_ids``; a mapping is passed as is."""
    return {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)


def token_mask(batch: Batch) -> torch.Tensor | None:
    """``(B, L)`` bool of the real (unpadded) positions of an encoder batch; None when every position counts."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return None


def _run(model: nn.Module, batch: Batch) -> None:
    """One forward pass of ``model`` on ``batch`` (moved to the model's device), ended early by a :class:`_Stop`."""
    device = model_device(model)
    kwargs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    if getattr(model.config, "is_decoder", False) or not getattr(model.config, "is_encoder_decoder", True):
        kwargs.setdefault("use_cache", False)  # no stateful cache object among the recorded arguments
    try:
        model(**kwargs)
    except _Stop:
        pass


@torch.no_grad()
def block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The hidden states ``(B, L, d)`` (float32, CPU) entering ``blocks[0]`` on each batch; the rest of the
    forward pass is skipped."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().float().cpu())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            _run(model, batch)
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def capture_calls(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Batch]) -> list[list[BlockCall]]:
    """``calls[i][j]``: the arguments ``blocks[i]`` receives on ``batches[j]`` (one forward pass per batch,
    stopped after the last block, so no LM head runs)."""
    calls: list[list[BlockCall]] = [[] for _ in blocks]

    def pre_hook_for(i: int):
        def hook(module, args, kwargs):
            in_kwargs = not args
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[i].append(BlockCall(tuple(args[1:]), kw, in_kwargs))
        return hook

    def stop(module, args, output):
        raise _Stop

    handles = [b.register_forward_pre_hook(pre_hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop))
    try:
        for batch in batches:
            _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(c) != len(batches) for c in calls):
        raise TensorLMError(f"the {type(model).__name__} did not call each of its {len(blocks)} blocks once per "
                            "batch; block-wise reconstruction needs a plain stack of blocks")
    return calls
