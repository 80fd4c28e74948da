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

Parameters shared across blocks (the shared factors ``U, V, C`` of a Tucker bank) are **frozen during this
sequential pass**: training them for one block would change the blocks already fitted. A bank's blocks train
their own rows of ``P`` and their biases there. Then, when the student has such shared factors and
``joint_steps > 0``, a **joint pass** trains them together with every block's own factors:

* each step takes one training batch ``j`` and minimises the **sum over blocks** of the per-block MSE
  ``mean ||block_s^i(X_s^i[j]) - Y_t^i[j]||^2`` against the dense teacher's block outputs ``Y_t^i`` (cached).
  The student inputs ``X_s^i`` are those of the current student prefix, recomputed in the same forward
  pass: block 0 gets the cached embedding output, block ``i + 1`` the **detached** output of student block
  ``i``. Each block's loss is backpropagated into that block only (no gradient flows across blocks); the
  gradients add up in the shared factors, and one Adam step (``joint_lr``, default ``lr``) moves everything;
* early stopping on the same held-out batches, by the sum over blocks of the held-out MSE with the same
  chained inputs (the student's block outputs as the model computes them, each against the teacher's),
  every ``eval_every`` steps with the same ``patience``; the best state (all trained parameters) is kept; at
  most ``joint_steps`` steps or ``joint_time_budget_s`` seconds. At the start this sum equals the sum of the
  sequential pass's per-block ``val_mse_after``.

Why inputs recomputed, not the sequential pass's cached ones: on a tiny Llama with a shared bank (the test's),
training every block on its inputs as the sequential pass left them lowered that cached objective by 45%
over 200 steps while the real per-block errors (fresh inputs through the whole student) rose by 3%: block
``i + 1`` learnt to undo an error of block ``i`` that block ``i`` was being trained away at the same time.
With chained inputs the same 200 steps lowered the real summed error by 46%. The cost per step is the same
(one forward and backward per block on one batch); the store holds one student input set (block 0's) and
every block's teacher targets: ``n_blocks + 2`` activation sets instead of 3 (with the teacher's and the
sequential pass's working set), in memory or on disk as :func:`~tensorlm.heal.activations.storage_for`
decides for that many sets. ``joint_steps: 0`` (or a student without shared parameters) runs the sequential
pass alone, exactly as before.

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
from tensorlm.heal.activations import SETS, ActivationStore, activation_megabytes, storage_for
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
class JointResult:
    """What the joint pass over all blocks did (see the module docstring).

    Attributes:
        trainable: parameters trained (each once); shared: those among them shared across blocks.
        steps: optimizer steps taken (one step: one training batch through every block);
        best_step: the step whose state the student keeps (0: the sequential pass's).
        stopped: ``joint_steps``, ``patience`` or ``time_budget``.
        val_mse_before, val_mse_after: the sum over blocks of the held-out MSE with chained inputs, before
            (the sequential pass's result) and after.
        block_val_mse_before, block_val_mse_after: the same per block.
        seconds: wall time of the pass.
    """

    trainable: int
    shared: int
    steps: int = 0
    best_step: int = 0
    stopped: str = "joint_steps"
    val_mse_before: float = 0.0
    val_mse_after: float = 0.0
    block_val_mse_before: list[float] = field(default_factory=list)
    block_val_mse_after: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ReconstructResult:
    """What :func:`reconstruct_blocks` did: one :class:`BlockResult` per block, the split and the storage.

    ``shared_frozen`` counts the parameters shared across blocks (frozen in the sequential pass), once per block
    that holds them (the joint pass's ``shared`` counts each once); ``joint`` is
    the joint pass's :class:`JointResult`, None when it did not run (``joint_steps: 0`` or nothing shared).
    """

    blocks_path: str
    blocks: list[BlockResult] = field(default_factory=list)
    train_batches: int = 0
    val_batches: int = 0
    storage: str = "none"
    activation_mb: float = 0.0
    shared_frozen: int = 0
    seconds: float = 0.0
    joint: JointResult | None = None

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


def joint_parameters(blocks: nn.ModuleList, config: ReconstructConfig, shared: set[int]) -> list:
    """What the joint pass trains: every block's :func:`factor_parameters` shared ones included, each once, in
    block order; empty when ``config.joint_steps`` is 0 or none of them is shared across blocks."""
    if config.joint_steps == 0:
        return []
    unique = {id(p): p for b in blocks for p in factor_parameters(b, config.train_dense)}
    return list(unique.values()) if any(i in shared for i in unique) else []


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


def log_to_stderr(message: str) -> None:
    print(f"[tensorlm] {message}", file=sys.stderr, flush=True)


def reconstruct_blocks(student: nn.Module, teacher: nn.Module, batches: Sequence[Batch], *,
                       config: ReconstructConfig | None = None, blocks: str | None = None, progress: bool = True,
                       log: Callable[[str], None] | None = log_to_stderr) -> ReconstructResult:
    """Fit every block of ``student`` to the same block of ``teacher``, in order, in place; then, when blocks
    share parameters (a Tucker bank) and ``config.joint_steps > 0``, train them jointly (module docstring).

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
        The per-block held-out MSE before and after, steps, stopping reasons and storage, and the joint pass's
        (``joint``, None when it did not run).
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
    joint = joint_parameters(s_blocks, config, shared)
    result = ReconstructResult(path, train_batches=len(train_ids), val_batches=len(val_ids), shared_frozen=sum(
        p.numel() for b in s_blocks for p in b.parameters() if id(p) in shared))
    if not any(params) and not joint:
        result.blocks = [BlockResult(i, f"{path}.{i}", 0) for i in range(len(s_blocks))]
        if log is not None:
            log(f"reconstruct: no factorized layer in the {len(s_blocks)} blocks under {path}: nothing to train, "
                "passed through")
        return result
    with _eval_mode(student, teacher):
        _reconstruct_all(student, teacher, s_blocks, t_blocks, batches, params, (train_ids, val_ids), config,
                         result, progress, log or (lambda _: None), joint, shared)
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


def _reconstruct_all(student, teacher, s_blocks, t_blocks, batches, params, split, config, result, progress, log,
                     joint=(), shared=frozenset()):
    """Capture the block arguments and inputs, fit block after block, then the joint pass when ``joint`` (the
    parameters it trains) is not empty (see :func:`reconstruct_blocks`)."""
    calls = capture_calls(teacher, t_blocks, batches)
    inputs = block_inputs(teacher, t_blocks, batches)
    n, shapes = len(batches), [tuple(x.shape) for x in inputs]
    if joint:  # every block's teacher target, block 0's student input, the teacher's and student's working sets
        n_sets = len(s_blocks) + 2
        storage = storage_for(shapes, config.max_memory_mb * SETS / n_sets)
        set_mb = activation_megabytes(shapes) / SETS
        result.storage, result.activation_mb = storage.where, set_mb * n_sets
        folder = storage.store("probe", 0).folder
        where = f"{storage.where}" + ("" if folder is None else f" under {folder}")
        log(f"reconstruct: {len(s_blocks)} blocks under {result.blocks_path}, {len(split[0])} training and "
            f"{len(split[1])} held-out batches; {n_sets} activation sets of {set_mb:.1f} MiB each in {where} "
            "(every block's targets kept for the joint pass)")
    else:
        storage = storage_for(shapes, config.max_memory_mb)
        result.storage, result.activation_mb = storage.where, storage.megabytes
        log(f"reconstruct: {len(s_blocks)} blocks under {result.blocks_path}, {len(split[0])} training and "
            f"{len(split[1])} held-out batches; {storage.describe()}")
    try:
        x_t = storage.store("teacher_in", n)
        x_s = first = storage.store("student_in0" if joint else "student_in", n)
        for j, x in enumerate(inputs):
            x_t[j] = x
        del inputs
        for j, x in enumerate(block_inputs(student, s_blocks, batches)):
            x_s[j] = x
        masks = [token_mask(b) for b in batches]
        targets: list[ActivationStore] = []
        for i in tqdm(range(len(s_blocks)), desc="reconstruct", disable=not progress, leave=False):
            y_t = storage.store(f"teacher_out{i}", n)
            _forward_all(t_blocks[i], calls[i], x_t, y_t)
            data = _BlockData(x_s, y_t, masks, calls[i], *split)
            block_result = _fit_block(s_blocks[i], params[i], data, config, i, f"{result.blocks_path}.{i}")
            result.blocks.append(block_result)
            log(_describe(block_result))
            if not joint:
                _forward_all(s_blocks[i], calls[i], x_s, x_s)
            else:
                targets.append(y_t)
                if i + 1 < len(s_blocks):  # block 0's inputs stay for the joint pass; the next ones in place
                    x_next = storage.store("student_in", n) if x_s is first else x_s
                    _forward_all(s_blocks[i], calls[i], x_s, x_next)
                    x_s = x_next
            x_t = y_t
        if joint:
            chain = _Chain(first, targets, masks, calls, *split)
            result.joint = _fit_joint(s_blocks, list(joint), chain, config, shared)
            log(_describe_joint(result.joint))
    finally:
        storage.close()


def _describe(r: BlockResult) -> str:
    if r.trainable == 0:
        return f"reconstruct: {r.name}: nothing to train, passed through"
    return (f"reconstruct: {r.name}: held-out MSE {r.val_mse_before:.4g} -> {r.val_mse_after:.4g} "
            f"({r.trainable} parameters, best step {r.best_step} of {r.steps}, stopped: {r.stopped}, "
            f"{r.seconds:.1f} s)")


def _describe_joint(r: JointResult) -> str:
    return (f"reconstruct: joint pass: summed held-out MSE {r.val_mse_before:.4g} -> {r.val_mse_after:.4g} "
            f"({r.trainable} parameters, {r.shared} shared, best step {r.best_step} of {r.steps}, "
            f"stopped: {r.stopped}, {r.seconds:.1f} s)")


@torch.no_grad()
def _forward_all(block: nn.Module, calls: Sequence[BlockCall], source: ActivationStore,
                 target: ActivationStore) -> None:
    """``target[j] = block(source[j])`` for every batch ``j`` (``target`` may be ``source``)."""
    for j, call in enumerate(calls):
        target[j] = call(block, _place(source[j], block))


def _place(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """``x`` (cached on the CPU in float32) on the device and in the floating dtype of ``block``'s parameters."""
    p = next((p for p in block.parameters() if p.is_floating_point()), None)
    return x if p is None else x.to(device=p.device, dtype=p.dtype)


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
        out = self.calls[j](block, _place(self.inputs[j], block)).float()
        diff = out - self.targets[j].to(out.device)
        if self.masks[j] is not None:
            diff = diff[self.masks[j].to(out.device)]
        return diff.pow(2).sum(), diff.numel()

    @torch.no_grad()
    def val_mse(self, block: nn.Module) -> float:
        total, count = 0.0, 0
        for j in self.val:
            s, n = self.squared_error(block, j)
            total, count = total + float(s), count + n
        return total / max(count, 1)


@dataclass
class _Fit:
    """The outcome of :func:`adam_with_early_stopping`: the best held-out value, its detail and step."""

    best: float
    detail: object
    best_step: int = 0
    steps: int = 0
    stopped: str = "max_steps"


def adam_with_early_stopping(params: list, train: list[int], backward: Callable[[int], None],
                             evaluate: Callable[[], tuple[float, object]], initial: tuple[float, object], *,
                             lr: float, max_steps: int, eval_every: int, patience: int,
                             time_budget_s: float | None, seed: int, at_max_steps: str = "max_steps") -> _Fit:
    """Adam on ``params`` over the training batches ``train`` in a seeded random order (``backward(j)``
    backpropagates batch ``j``), evaluated every ``eval_every`` steps and at the last (``evaluate()`` ->
    ``(held-out value, detail)``, lower is better; ``initial``: its value before training); stops after
    ``patience`` evaluations without improvement or past ``time_budget_s`` seconds; ``params`` end as they
    were at the best evaluation (step 0: as given)."""
    t0 = time.perf_counter()
    fit = _Fit(*initial, stopped=at_max_steps)
    best_weights = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    stale = 0
    for step in range(1, max_steps + 1):
        if not order:
            order = [train[k] for k in torch.randperm(len(train), generator=generator).tolist()]
        optimizer.zero_grad(set_to_none=True)
        backward(order.pop())
        optimizer.step()
        fit.steps = step
        out_of_time = time_budget_s is not None and time.perf_counter() - t0 > time_budget_s
        if step % eval_every and step != max_steps and not out_of_time:
            continue
        value, detail = evaluate()
        if value < fit.best:
            fit.best, fit.detail, fit.best_step, stale = value, detail, step, 0
            best_weights = [p.detach().clone() for p in params]
        else:
            stale += 1
        if out_of_time or stale >= patience:
            fit.stopped = "time_budget" if out_of_time else "patience"
            break
    with torch.no_grad():
        for p, w in zip(params, best_weights, strict=True):
            p.copy_(w)
    return fit


def _fit_block(block: nn.Module, params: list, data: _BlockData, config: ReconstructConfig, index: int,
               name: str) -> BlockResult:
    """Train ``params`` of ``block`` by Adam on ``data.train``, keep the best held-out weights."""
    result = BlockResult(index, name, sum(p.numel() for p in params))
    if not params:
        return result
    t0 = time.perf_counter()

    def backward(j: int) -> None:
        squared, count = data.squared_error(block, j)
        (squared / count).backward()

    with _only_trainable(block, params):
        result.val_mse_before = data.val_mse(block)
        fit = adam_with_early_stopping(
            params, data.train, backward, lambda: (data.val_mse(block), None), (result.val_mse_before, None),
            lr=config.lr, max_steps=config.max_steps, eval_every=config.eval_every, patience=config.patience,
            time_budget_s=config.time_budget_s, seed=config.seed * 1_000_003 + index)
    result.steps, result.best_step, result.stopped = fit.steps, fit.best_step, fit.stopped
    result.val_mse_after, result.seconds = fit.best, time.perf_counter() - t0
    return result


@dataclass
class _Chain:
    """The joint pass's data: block 0's student inputs, every block's teacher targets, masks, arguments, split."""

    inputs: ActivationStore
    targets: list[ActivationStore]
    masks: list[torch.Tensor | None]
    calls: list[list[BlockCall]]
    train: list[int]
    val: list[int]

    def squared_errors(self, blocks: nn.ModuleList, j: int,
                       backward: Sequence[bool] | None = None) -> list[tuple[float, int]]:
        """``(sum of squared errors, number of terms)`` of every block on batch ``j``, each block fed the
        detached output of the student block before it; where ``backward[i]``, block ``i``'s MSE is
        backpropagated into block ``i`` (gradients add up in shared parameters)."""
        errors = []
        hidden = self.inputs[j]
        for i, block in enumerate(blocks):
            grad = backward is not None and backward[i]
            with torch.set_grad_enabled(grad):
                out = self.calls[i][j](block, _place(hidden, block))
                diff = out.float() - self.targets[i][j].to(out.device)
                if self.masks[j] is not None:
                    diff = diff[self.masks[j].to(out.device)]
                squared, count = diff.pow(2).sum(), diff.numel()
            if grad:
                (squared / count).backward()
            errors.append((float(squared.detach()), count))
            hidden = out.detach()
        return errors

    @torch.no_grad()
    def val_mse(self, blocks: nn.ModuleList) -> list[float]:
        """Every block's held-out MSE with chained inputs."""
        totals = [[0.0, 0] for _ in blocks]
        for j in self.val:
            for total, (s, n) in zip(totals, self.squared_errors(blocks, j), strict=True):
                total[0], total[1] = total[0] + s, total[1] + n
        return [s / max(n, 1) for s, n in totals]


def _fit_joint(blocks: nn.ModuleList, params: list, data: _Chain, config: ReconstructConfig,
               shared: set[int]) -> JointResult:
    """Train ``params`` (shared ones included) on the sum over blocks of the per-block MSE with chained,
    detached inputs, by Adam; keep the state of the best summed held-out MSE (see the module docstring)."""
    result = JointResult(sum(p.numel() for p in params), sum(p.numel() for p in params if id(p) in shared))
    t0 = time.perf_counter()
    chosen = {id(p) for p in params}
    active = [any(id(p) in chosen for p in b.parameters()) for b in blocks]  # others only pass on

    def evaluate() -> tuple[float, list[float]]:
        values = data.val_mse(blocks)
        return sum(values), values

    with _only_trainable(blocks, params):
        result.val_mse_before, result.block_val_mse_before = evaluate()
        fit = adam_with_early_stopping(
            params, data.train, lambda j: data.squared_errors(blocks, j, active), evaluate,
            (result.val_mse_before, result.block_val_mse_before), lr=config.joint_lr or config.lr,
            max_steps=config.joint_steps, eval_every=config.eval_every, patience=config.patience,
            time_budget_s=config.joint_time_budget_s,
            seed=config.seed * 1_000_003 + len(blocks), at_max_steps="joint_steps")
    result.steps, result.best_step, result.stopped = fit.steps, fit.best_step, fit.stopped
    result.val_mse_after, result.block_val_mse_after = fit.best, fit.detail
    result.seconds = time.perf_counter() - t0
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
