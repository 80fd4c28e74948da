"""Reconstruction of a factored token table and of the tied LM head that projects with it.

A compressed token table ``E~ (V, d)`` (any tensorlm factored embedding) is fitted to the dense table
``E (V, d)`` on what the model does with it on calibration text (training text only, never a test split):

* as the **input** of block 0 (every model): the looked-up rows of the tokens that occur,
  ``L_in = sum_t c_t ||E~_t - E_t||^2 / sum_t c_t ||E_t||^2``, ``c_t`` the count of token ``t``;
* as the **tied LM head** (a causal LM whose head projects with the table): the logits
  ``H E~^T`` against ``H E^T``, ``H (N, d)`` the head's inputs (the teacher's final hidden states) at the
  calibration positions, each position's logits centred over the vocabulary (``C = I - 1 1^T / V``: the
  softmax ignores a shift shared by every token, and the large activations of a few hidden dimensions
  give mostly such shifts). With ``G = H^T H = Q diag(lambda) Q^T``,
  ``||H (E~ - E)^T C||_F^2 = ||C (E~ - E) Q diag(lambda)^{1/2}||_F^2``; keeping the ``k`` leading eigenpairs,
  ``S = Q_k diag(lambda_k)^{1/2} (d, k)``, gives ``L_head = ||C (E~ - E) S||_F^2 / ||C E S||_F^2``, computed
  as the head's own forward on the ``k`` columns of ``S`` (``project(E~, S^T)``, ``(k, V)``, centred along
  ``V``), never forming ``E~``.

Both terms are relative (each is 1 for a zero table, so a constant ``embed_scale`` cancels); the objective
is ``L_in + L_head`` (``L_in`` alone for an untied head or an encoder). It is the embedding's share of the
block-wise reconstruction of :mod:`tensorlm.heal.reconstruct` (BRECQ, Li et al., ICLR 2021), with the table
as the "block" whose outputs are its looked-up rows and its logits. The frequency weights are those of the
data-aware embedding objective (``calibration: frequency``); the head term is the data-aware objective of a
linear map (``||(W - W~) G^{1/2}||_F``, SVD-LLM, Wang et al. 2024, eq. 3) applied to the head.

``embedding_head: kl`` replaces ``L_head`` by the head's own loss (Hinton et al. 2015's distillation at
temperature 1, with the body frozen): ``L_head = mean_n KL(softmax(h_n E^T) || softmax(h_n E~^T))``, nats per
position, at the teacher's head inputs ``h_n``, cached once, so no step runs the body. Each Adam step takes one
mini-batch of positions (at most ``KL_LOGITS / V`` of them); the held-out value is over all held-out positions.
The squared centred logits weigh every token alike; the KL weighs each by its probability, and so fits the
rare tokens that a frequency-weighted fit leaves too unlikely, the limit of the frequency-split table
(``benchmarks/results/embedding_limits.md``). ``L_in`` is unchanged, and the two are summed as they are.

Adam trains the table's parameters (factors; Kronecker permutations are buffers and never move) on the
statistics of the training batches, full-batch, with early stopping on the same objective computed from
the held-out batches (the last ``val_fraction`` of them, :func:`~tensorlm.heal.reconstruct.split_batches`);
the table keeps its best held-out state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tensorlm.calibrate import token_counts
from tensorlm.errors import TensorLMError
from tensorlm.evaluate.runtime import model_device
from tensorlm.heal.blocks import Batch, model_inputs, token_mask
from tensorlm.heal.config import ReconstructConfig
from tensorlm.heal.reconstruct import adam_with_early_stopping, log_to_stderr, split_batches
from tensorlm.layers.base import LAYERS, project

KL_LOGITS = 1 << 26
"""Logits (64 M, 256 MB in float32) of one KL mini-batch: 1,365 positions of SmolLM2's 49,152 tokens, 256 of
Gemma 3's 262,144."""


@dataclass
class TableStatistics:
    """What the table's objective needs from calibration text.

    Attributes:
        counts: ``(V,)`` float64, occurrences of each token id (padding skipped).
        head_basis: ``S (d, k)`` float32, the head inputs' ``k`` leading principal directions scaled by the
            square roots of their eigenvalues (``S S^T ~ G = H^T H``); None without a tied head.
        head_energy: share of ``trace(G)`` that ``S`` holds (1.0 when ``k = d``; 0.0 without a head).
        positions: calibration positions counted.
        head_inputs: ``H (N, d)`` float32, the head's inputs at those positions, kept for ``embedding_head: kl``.
    """

    counts: torch.Tensor
    head_basis: torch.Tensor | None
    head_energy: float
    positions: int
    head_inputs: torch.Tensor | None = None


@dataclass
class EmbeddingResult:
    """The outcome of :func:`reconstruct_embedding` (held-out objective before and after; steps; seconds)."""

    table: str
    trained: int
    tied_head: bool
    head_directions: int = 0
    head_energy: float = 0.0
    head_loss: str = ""
    val_before: float | None = None
    val_after: float | None = None
    val_terms_before: dict = field(default_factory=dict)
    val_terms_after: dict = field(default_factory=dict)
    steps: int = 0
    best_step: int = 0
    stopped: str = "not run"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def factored_table(model: nn.Module) -> tuple[str, nn.Module, nn.Module] | None:
    """``(path, module, table)`` of ``model``'s input token table when it is a tensorlm factored layer:
    ``module`` is what the model calls (a :class:`~tensorlm.layers.scaled.ScaledEmbedding` included),
    ``table`` the unscaled factored table inside it; None for a dense ``nn.Embedding``."""
    module = model.get_input_embeddings()
    table = getattr(module, "embedding", module)
    if LAYERS.get(type(table).__name__) is not type(table):
        return None
    path = next(name for name, m in model.named_modules() if m is module)
    return path, module, table


def head_is_tied_to(model: nn.Module, table: nn.Module) -> bool:
    """True when ``model``'s LM head computes its logits from ``table`` (a ``TiedHead`` over it)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return head is not None and getattr(head, "embedding", None) is table


@torch.no_grad()
def table_statistics(teacher: nn.Module, batches: Sequence[Batch], vocab: int, head: bool,
                     head_directions: int, keep_inputs: bool = False) -> TableStatistics:
    """Token counts of ``batches`` and, with ``head``, the leading ``head_directions`` principal directions of
    the teacher's LM-head inputs on them (float64 second moment ``G (d, d)``, eigendecomposition) and, with
    ``keep_inputs``, those inputs ``(N, d)``.

    Raises:
        TensorLMError: no batches; ids outside the vocabulary; ``head`` on a teacher without an LM head.
    """
    if not batches:
        raise TensorLMError("embedding reconstruction: no calibration batches")
    counts = token_counts(batches, vocab).to(torch.float64)  # (V,)
    if not head:
        return TableStatistics(counts, None, 0.0, int(counts.sum()))
    out = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if out is None:
        raise TensorLMError(f"embedding reconstruction: {type(teacher).__name__} has no LM head to take the "
                            "head inputs from")
    gram: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    mask: list[torch.Tensor | None] = [None]

    def hook(module, args):
        h = args[0].detach().to(torch.float64)  # (B, L, d)
        h = h[mask[0].to(h.device)] if mask[0] is not None else h.reshape(-1, h.shape[-1])  # (N, d)
        gram.append(h.T @ h if not gram else gram.pop() + h.T @ h)
        if keep_inputs:
            kept.append(h.float())

    device = model_device(teacher)
    handle = out.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            mask[0] = token_mask(batch)
            teacher(**{k: v.to(device) for k, v in model_inputs(batch).items()})
    finally:
        handle.remove()
    g = gram[0].cpu()  # (d, d)
    eigenvalues, vectors = torch.linalg.eigh(g)  # ascending
    eigenvalues = eigenvalues.clamp(min=0)
    k = min(head_directions, g.shape[0])
    basis = vectors[:, -k:] * eigenvalues[-k:].sqrt()  # (d, k)
    energy = float(eigenvalues[-k:].sum() / eigenvalues.sum())
    inputs = torch.cat(kept) if keep_inputs else None  # (N, d)
    return TableStatistics(counts, basis.to(torch.float32), energy, int(counts.sum()), inputs)


class _Objective:
    """``L_in + L_head`` (module docstring) of one set of statistics against the dense table ``E (V, d)``, its
    tensors on ``dense``'s device (the table's); with ``stats.head_inputs``, ``L_head`` is the KL over
    ``chunks`` mini-batches of positions."""

    def __init__(self, stats: TableStatistics, dense: torch.Tensor, scale: float):
        used = stats.counts.nonzero().squeeze(1).to(dense.device)  # (U,) ids that occur
        self.ids = used
        self.weights = stats.counts.to(dense.device)[used].to(torch.float32)[:, None]  # (U, 1)
        self.rows = dense[used] * scale  # (U, d): block 0's input as the model looks it up
        self.scale = scale
        self.in_norm = float((self.weights * self.rows.square()).sum())
        self.basis = None if stats.head_basis is None else stats.head_basis.to(dense.device)  # (d, k) or None
        self.inputs = None if stats.head_inputs is None else stats.head_inputs.to(dense.device)  # (N, d) or None
        if self.inputs is not None:
            self.dense = dense
            self.chunk = max(1, KL_LOGITS // dense.shape[0])  # positions per mini-batch
            self.chunks = -(-self.inputs.shape[0] // self.chunk)
        elif self.basis is not None:
            self.logits = centred(self.basis.T @ dense.T)  # (k, V): the dense head on the k directions
            self.head_norm = float(self.logits.square().sum())

    def terms(self, table: nn.Module, chunk: int | None = None) -> dict[str, torch.Tensor]:
        """The terms; a KL head term over mini-batch ``chunk`` of the positions, or (None) over all of them."""
        rows = table(self.ids) * self.scale  # (U, d)
        out = {"input": (self.weights * (rows - self.rows).square()).sum() / self.in_norm}
        if self.inputs is not None:
            spans = range(self.chunks) if chunk is None else [chunk]
            parts = [self.inputs[j * self.chunk : (j + 1) * self.chunk] for j in spans]  # (n_j, d) each
            out["head"] = sum(self._kl_sum(table, h) for h in parts) / sum(len(h) for h in parts)
        elif self.basis is not None:
            logits = centred(project(table, self.basis.T))  # (k, V)
            out["head"] = (logits - self.logits).square().sum() / self.head_norm
        return out

    def _kl_sum(self, table: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``sum_n KL(softmax(h_n E^T) || softmax(h_n E~^T))`` over the positions ``h (n, d)``, in nats."""
        with torch.no_grad():
            teacher = torch.log_softmax(h @ self.dense.T, dim=-1)  # (n, V)
        student = torch.log_softmax(project(table, h), dim=-1)  # (n, V)
        return (teacher.exp() * (teacher - student)).sum()


def centred(logits: torch.Tensor) -> torch.Tensor:
    """``logits (..., V)`` less their mean over the vocabulary (what the softmax sees)."""
    return logits - logits.mean(dim=-1, keepdim=True)


def head_phrase(result: EmbeddingResult) -> str:
    """How the summary line names a tied head's term."""
    if result.head_loss == "kl":
        return "tied head by KL"
    return f"tied head on {result.head_directions} directions"


def reconstruct_embedding(student: nn.Module, teacher: nn.Module, batches: Sequence[Batch], *,
                          config: ReconstructConfig | None = None,
                          log: Callable[[str], None] | None = log_to_stderr) -> EmbeddingResult:
    """Fit ``student``'s factored input token table (and the head tied to it) to ``teacher``'s dense table, in
    place (module docstring).

    Args:
        student: the compressed model; its input embedding a tensorlm factored table (possibly scaled).
        teacher: the uncompressed model (not modified); its ``get_input_embeddings().weight`` is ``E (V, d)``.
        batches: calibration batches (``(B, L)`` ids, or tokenizer dicts with ``attention_mask``); training
            text only, never a test split.
        config: ``embedding_steps`` (Adam steps at most; full-batch), ``embedding_lr`` (default ``lr``),
            ``head_directions``, ``val_fraction``, ``eval_every``, ``patience``, ``time_budget_s``.
        log: where the one-line summary goes (None: silent).

    Returns:
        The held-out objective (and its terms) before and after, steps and seconds. A student whose table is
        dense, or ``embedding_steps: 0``, is returned untouched (``stopped: "not run"``).

    Raises:
        TensorLMError: a held-out or training slice that would be empty; student and teacher tables of
            different shapes; no batches.
    """
    config = config or ReconstructConfig()
    found = factored_table(student)
    if found is None or config.embedding_steps == 0:
        return EmbeddingResult("" if found is None else found[0], 0, False)
    t0 = time.perf_counter()
    path, module, table = found
    device = next(table.parameters()).device
    dense = teacher.get_input_embeddings().weight.detach().float().to(device)  # (V, d)
    if (table.num_embeddings, table.embedding_dim) != tuple(dense.shape):
        raise TensorLMError(f"embedding reconstruction: the student's {path} is {table.num_embeddings} x "
                            f"{table.embedding_dim}, the teacher's table {tuple(dense.shape)}")
    tied = head_is_tied_to(student, table)
    train_ids, val_ids = split_batches(len(batches), config.val_fraction)
    scale = float(getattr(module, "scale", 1.0))

    kl = tied and config.embedding_head == "kl"

    def objective(ids: list[int]) -> tuple[_Objective, TableStatistics]:
        stats = table_statistics(teacher, [batches[i] for i in ids], dense.shape[0], tied, config.head_directions,
                                 keep_inputs=kl)
        return _Objective(stats, dense, scale), stats

    train, stats = objective(train_ids)
    val, _ = objective(val_ids)
    params = [p for p in table.parameters() if p.requires_grad]
    result = EmbeddingResult(path, sum(p.numel() for p in params), tied,
                             0 if stats.head_basis is None or kl else stats.head_basis.shape[1],
                             0.0 if kl else stats.head_energy, config.embedding_head if tied else "")

    def evaluate() -> tuple[float, dict]:
        with torch.no_grad():
            terms = {k: float(v) for k, v in val.terms(table).items()}
        return sum(terms.values()), terms

    def backward(chunk: int) -> None:
        sum(train.terms(table, chunk if kl else None).values()).backward()

    was_training = student.training
    student.eval()
    try:
        result.val_before, result.val_terms_before = evaluate()
        fit = adam_with_early_stopping(
            params, list(range(train.chunks)) if kl else [0], backward, evaluate,
            (result.val_before, result.val_terms_before),
            lr=config.embedding_lr or config.lr, max_steps=config.embedding_steps, eval_every=config.eval_every,
            patience=config.patience, time_budget_s=config.time_budget_s, seed=config.seed)
    finally:
        student.train(was_training)
    result.val_after, result.val_terms_after = fit.best, fit.detail
    result.steps, result.best_step, result.stopped = fit.steps, fit.best_step, fit.stopped
    result.seconds = time.perf_counter() - t0
    if log is not None:
        log(f"embedding {path}: held-out objective {result.val_before:.4f} -> {result.val_after:.4f} "
            f"({', '.join(f'{k} {v:.4f}' for k, v in result.val_terms_after.items())}), {result.steps} steps, "
            f"{head_phrase(result) if tied else 'lookups only'}, "
            f"{result.seconds:.1f} s")
    return result
