"""Block-wise reconstruction: fit each compressed transformer block to its uncompressed original, in order.

For block ``i`` (BRECQ, Li et al., ICLR 2021; the sequential update of GPTQ and SVD-LLM):

* the calibration sequences go through the teacher's blocks ``0..i-1``, giving the teacher block's input
  ``X_t (B, L, d)`` and, through teacher block ``i``, the target ``Y_t (B, L, d)``;
* they go through the **student's already-reconstructed** blocks ``0..i-1``, giving the student block's
  input ``X_s (B, L, d)``, so that errors do not compound;
* only the block's compressed factors (parameters of tensorlm factorized layers,
  :data:`tensorlm.layers.base.LAYERS`) are trained, by Adam on mini-batches of the cached activations, to
  minimise ``mean ||block_s(X_s) - Y_t||^2`` over real (unpadded) positions; norms and other dense weights
  stay frozen unless ``train_dense``. Kronecker permutations are buffers and never move.
* early stopping: every ``eval_every`` steps the MSE on a held-out slice of the calibration batches (the
  last ``val_fraction`` of them) is measured; the block keeps the weights of its best evaluation (the
  training-free weights when no step improves on them), and stops after ``patience`` evaluations without
  improvement, ``max_steps`` steps or ``time_budget_s`` seconds.

Parameters shared across blocks (the shared factors ``U, V, C`` of a Tucker bank) are **frozen**: training
them for one block would change the blocks already fitted. A bank's blocks train their own rows of ``P`` and
their biases. Training the bank jointly needs all blocks at once, which is what end-to-end distillation does.

Dropout is off (the models are in eval mode) so that a seed fixes the result bit for bit. Each block's
arguments besides its hidden state (masks, rotary position embeddings) are recorded from the teacher's
forward pass (:mod:`tensorlm.heal.blocks`) and given to both the teacher's and the student's block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorlm.errors import TensorLMError
from tensorlm.heal.activations import ActivationStore, storage_for
from tensorlm.heal.blocks import Batch, BlockCall, block_inputs, capture_calls, find_blocks, token_mask
from tensorlm.heal.config import ReconstructConfig
from tensorlm.layers.base import LAYERS


@dataclass
class BlockResult:
    """What reconstruction did to one block.

    Attributes:
        index, name: the block's position and module path (``model.layers.3``).
        trainable: parameters trained (0: the block was passed through unchanged).
        steps: optimizer steps taken; best_step: the step whose weights the block keeps (0: the initial ones).
        stopped: ``max_steps``, ``patience``, ``time_budget`` or ``nothing to train``.
        val_mse_before, val_mse_after: held-out MSE of the block's output before and after (None when skipped).
        seconds: wall time of the block.
    """

    index: int
    name: str
    trainable: int
    steps: int = 0
    best_step: int = 0
    stopped: str = "nothing to train"
    val_mse_before: float | None = None
    val_mse_after: float | None = None
    seconds: float = 0.0


@dataclass
class ReconstructResult:
    """What :func:`reconstruct_blocks` did: one :class:`BlockResult` per block, the split and the storage."""

    blocks_path: str
    blocks: list[BlockResult] = field(default_factory=list)
    train_batches: int = 0
    val_batches: int = 0
    storage: str = "none"
    activation_mb: float = 0.0
    shared_frozen: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def factor_parameters(block: nn.Module, train_dense: bool = False, exclude: set[int] = frozenset()) -> list:
    """The parameters of ``block`` that reconstruction trains, in ``named_parameters`` order, each once.

    Factorized layers' parameters (modules whose class is registered in :data:`LAYERS`), or every parameter
    with ``train_dense``; those whose ``id`` is in ``exclude`` (shared with another block) are left out.
    """
    if train_dense:
        chosen = [p for _, p in block.named_parameters()]
    else:
        chosen = [p for m in block.modules() if type(m).__name__ in LAYERS for p in m.parameters()]
    unique = {id(p): p for p in chosen if id(p) not in exclude}
    return list(unique.values())


def shared_parameter_ids(blocks: nn.ModuleList) -> set[int]:
    """``id`` of every parameter that appears in more than one block (a shared Tucker bank)."""
    owners: dict[int, int] = {}
    for block in blocks:
        for p in {id(p) for p in block.parameters()}:
            owners[p] = owners.get(p, 0) + 1
    return {p for p, n in owners.items() if n > 1}


def split_batches(n_batches: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """``(train, held-out)`` batch indices: the last ``floor(n_batches * val_fraction)`` are held out.

    Raises:
        TensorLMError: the held-out slice or the training slice would be empty.
    """
    n_val = int(n_batches * val_fraction)
    if n_val < 1 or n_val >= n_batches:
        raise TensorLMError(f"reconstruct: {n_batches} calibration batches leave "
                            f"{'no held-out' if n_val < 1 else 'no training'} batch at val_fraction {val_fraction}; "
                            "give more calibration samples, a smaller batch_size or another val_fraction")
    return list(range(n_batches - n_val)), list(range(n_batches - n_val, n_batches))


def _log(message: str) -> None:
    print(f"[tensorlm] {message}", file=sys.stderr, flush=True)


def reconstruct_blocks(student: nn.Module, teacher: nn.Module, batches: Sequence[Batch], *,
                       config: ReconstructConfig | None = None, blocks: str | None = None, progress: bool = True,
                       log: Callable[[str], None] | None = _log) -> ReconstructResult:
    """Fit every block of ``student`` to the same block of ``teacher``, in order, in place.

    Args:
        student: the compressed model (modified in place); a Hugging Face decoder (Llama family, GPT-2) or
            encoder (BERT) whose blocks hold tensorlm factorized layers.
        teacher: the uncompressed model with the same block structure (not modified).
        batches: calibration batches: ``(B, L)`` int64 token ids (causal LMs) or tokenizer dicts with
            ``input_ids`` and ``attention_mask`` (encoders); training text only, never a test split.
        config: optimizer, split, stopping and memory settings (default :class:`ReconstructConfig`).
        blocks: the path of the block list (default: found by :func:`tensorlm.heal.blocks.find_blocks`).
        progress: a progress bar over the blocks; log: where the storage line and per-block lines go (None: silent).

    Returns:
        The per-block held-out MSE before and after, steps, stopping reasons and storage.
        A student with no factorized layer in its blocks (and ``train_dense`` off) is returned untouched,
        bit for bit, without any forward pass.

    Raises:
        TensorLMError: no block list, student and teacher block lists of different lengths, a held-out or
            training slice that would be empty.
    """
    config = config or ReconstructConfig()
    t0 = time.perf_counter()
    path, s_blocks = find_blocks(student, blocks)
    _, t_blocks = find_blocks(teacher, path)
    if len(s_blocks) != len(t_blocks):
        raise TensorLMError(f"reconstruct: the student has {len(s_blocks)} blocks under {path!r}, the teacher "
                            f"{len(t_blocks)}")
    train_ids, val_ids = split_batches(len(batches), config.val_fraction)
    shared = shared_parameter_ids(s_blocks)
    params = [factor_parameters(b, config.train_dense, shared) for b in s_blocks]
    result = ReconstructResult(path, train_batches=len(train_ids), val_batches=len(val_ids), shared_frozen=sum(
        p.numel() for b in s_blocks for p in b.parameters() if id(p) in shared))
    if not any(params):
        result.blocks = [BlockResult(i, f"{path}.{i}", 0) for i in range(len(s_blocks))]
        return result
    with _eval_mode(student, teacher):
        _reconstruct_all(student, teacher, s_blocks, t_blocks, batches, params, (train_ids, val_ids), config,
                         result, progress, log or (lambda _: None))
    result.seconds = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    """Models in eval mode (no dropout) for the duration, their training flags restored after."""
    flags = [[m.training for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, saved in zip(models, flags, strict=True):
            for m, flag in zip(model.modules(), saved, strict=True):
                m.training = flag


def _reconstruct_all(student, teacher, s_blocks, t_blocks, batches, params, split, config, result, progress, log):
    """Capture the block arguments and inputs, then fit block after block (see :func:`reconstruct_blocks`)."""
    calls = capture_calls(teacher, t_blocks, batches)
    inputs = block_inputs(teacher, t_blocks, batches)
    storage = storage_for([tuple(x.shape) for x in inputs], config.max_memory_mb)
    result.storage, result.activation_mb = storage.where, storage.megabytes
    log(f"reconstruct: {len(s_blocks)} blocks under {result.blocks_path}, {len(split[0])} training and "
        f"{len(split[1])} held-out batches; {storage.describe()}")
    try:
        x_t, x_s = storage.store("teacher_in", len(batches)), storage.store("student_in", len(batches))
        for j, x in enumerate(inputs):
            x_t[j] = x
        del inputs
        for j, x in enumerate(block_inputs(student, s_blocks, batches)):
            x_s[j] = x
        masks = [token_mask(b) for b in batches]
        for i in tqdm(range(len(s_blocks)), desc="reconstruct", disable=not progress, leave=False):
            y_t = storage.store(f"teacher_out{i}", len(batches))
            _forward_all(t_blocks[i], calls[i], x_t, y_t)
            data = _BlockData(x_s, y_t, masks, calls[i], *split)
            block_result = _fit_block(s_blocks[i], params[i], data, config, i, f"{result.blocks_path}.{i}")
            result.blocks.append(block_result)
            log(_describe(block_result))
            _forward_all(s_blocks[i], calls[i], x_s, x_s)
            x_t = y_t
    finally:
        storage.close()


def _describe(r: BlockResult) -> str:
    if r.trainable == 0:
        return f"reconstruct: {r.name}: nothing to train, passed through"
    return (f"reconstruct: {r.name}: held-out MSE {r.val_mse_before:.4g} -> {r.val_mse_after:.4g} "
            f"({r.trainable} parameters, best step {r.best_step} of {r.steps}, stopped: {r.stopped}, "
            f"{r.seconds:.1f} s)")


@torch.no_grad()
def _forward_all(block: nn.Module, calls: Sequence[BlockCall], source: ActivationStore,
                 target: ActivationStore) -> None:
    """``target[j] = block(source[j])`` for every batch ``j`` (``target`` may be ``source``)."""
    dtype = _dtype(block)
    for j, call in enumerate(calls):
        target[j] = call(block, source[j].to(dtype))


def _dtype(block: nn.Module) -> torch.dtype:
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)


@dataclass
class _BlockData:
    """One block's cached data: student inputs, teacher targets, padding masks, arguments, the split."""

    inputs: ActivationStore
    targets: ActivationStore
    masks: list[torch.Tensor | None]
    calls: list[BlockCall]
    train: list[int]
    val: list[int]

    def squared_error(self, block: nn.Module, j: int) -> tuple[torch.Tensor, int]:
        """``(sum of squared errors over real positions and features, number of terms)`` on batch ``j``."""
        out = self.calls[j](block, self.inputs[j].to(_dtype(block))).float()
        diff = out - self.targets[j]
        if self.masks[j] is not None:
            diff = diff[self.masks[j]]
        return diff.pow(2).sum(), diff.numel()

    @torch.no_grad()
    def val_mse(self, block: nn.Module) -> float:
        total, count = 0.0, 0
        for j in self.val:
            s, n = self.squared_error(block, j)
            total, count = total + float(s), count + n
        return total / max(count, 1)


def _fit_block(block: nn.Module, params: list, data: _BlockData, config: ReconstructConfig, index: int,
               name: str) -> BlockResult:
    """Train ``params`` of ``block`` by Adam on ``data.train``, keep the best held-out weights."""
    result = BlockResult(index, name, sum(p.numel() for p in params))
    if not params:
        return result
    t0 = time.perf_counter()
    with _only_trainable(block, params):
        best = result.val_mse_before = data.val_mse(block)
        best_weights = [p.detach().clone() for p in params]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        order: list[int] = []
        stale = 0
        result.stopped = "max_steps"
        for step in range(1, config.max_steps + 1):
            if not order:
                order = [data.train[k] for k in torch.randperm(len(data.train), generator=generator).tolist()]
            squared, count = data.squared_error(block, order.pop())
            optimizer.zero_grad(set_to_none=True)
            (squared / count).backward()
            optimizer.step()
            result.steps = step
            out_of_time = config.time_budget_s is not None and time.perf_counter() - t0 > config.time_budget_s
            if step % config.eval_every and step != config.max_steps and not out_of_time:
                continue
            value = data.val_mse(block)
            if value < best:
                best, stale, result.best_step = value, 0, step
                best_weights = [p.detach().clone() for p in params]
            else:
                stale += 1
            if out_of_time or stale >= config.patience:
                result.stopped = "time_budget" if out_of_time else "patience"
                break
        with torch.no_grad():
            for p, w in zip(params, best_weights, strict=True):
                p.copy_(w)
    result.val_mse_after, result.seconds = best, time.perf_counter() - t0
    return result


@contextlib.contextmanager
def _only_trainable(block: nn.Module, params: list):
    """Only ``params`` require gradients inside ``block`` for the duration; flags and ``.grad`` restored."""
    chosen = {id(p) for p in params}
    saved = [(p, p.requires_grad, p.grad) for p in block.parameters()]
    for p in block.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
