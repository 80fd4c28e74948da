"""GLUE by linear probe: logistic regression on frozen sentence embeddings (SentEval-style).

This measures what the encoder's embeddings still carry, not fine-tuned GLUE scores. Protocol: embed
with :func:`tensorlm.evaluate.sts.sentence_embeddings` (mean-pooled last hidden states); a sentence pair
``(u, v)`` becomes ``[u, v, |u - v|, u * v]`` (Conneau et al. 2017, InferSent); standardise the features with
the training mean and deviation; fit binary logistic regression by Newton's method in float64, its L2 weight
chosen by 4-fold cross-validation on the training examples from ``L2_GRID`` (SentEval also tunes it on
training data); score the dev split: accuracy, plus F1 of class 1 for MRPC and the Matthews correlation for
CoLA (GLUE's headline metrics).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from tensorlm.data import load_glue
from tensorlm.errors import TensorLMError
from tensorlm.evaluate.sts import sentence_embeddings

HEADLINE = {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "rte": "accuracy"}
L2_GRID = (0.01, 0.1, 1.0)
FOLDS = 4


def glue_probe(
    model: nn.Module,
    tokenizer,
    task: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_limit: int | None = 2000,
    eval_split: str = "dev",
    l2: float | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> dict:
    """Linear-probe score of a sentence encoder on one GLUE task (module docstring).

    Args:
        model, tokenizer: an encoder, as for :func:`sentence_embeddings`.
        task: ``"cola"``, ``"sst2"``, ``"mrpc"`` or ``"rte"``.
        data_dir: benchmark folder (``None``: ``$TENSORLM_DATA``, else the hub).
        train_limit: fit on the first ``train_limit`` training examples (``None``: all).
        eval_split: ``"dev"`` (or ``"test"`` where a labelled test exists locally: sst2, mrpc).
        l2: weight of ``l2 / 2 * ||w||^2`` added to the mean binary cross-entropy; ``None`` picks it from
            ``L2_GRID`` by cross-validation on the training examples.

    Returns:
        ``accuracy``, ``f1``, ``mcc``, ``score`` (the task's headline metric, named by ``metric``),
        ``l2`` (the weight used), ``n_train``, ``n_eval`` and ``protocol``.

    Raises:
        TensorLMError: unknown task or split, ``train_limit < 2``, missing data.
    """
    if task not in HEADLINE:
        raise TensorLMError(f"GLUE probe task {task!r} is unknown; choose one of {sorted(HEADLINE)}")
    if train_limit is not None and train_limit < 2:
        raise TensorLMError(f"GLUE probe train_limit {train_limit} must be >= 2 (or None for all)")
    train = load_glue(task, "train", data_dir)[:train_limit]
    evaluation = load_glue(task, eval_split, data_dir)
    options = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
    x_train, x_eval = (_features(model, tokenizer, examples, options) for examples in (train, evaluation))
    y_train = torch.tensor([label for _, _, label in train])  # (n,)
    y_eval = torch.tensor([label for _, _, label in evaluation])  # (m,)
    if l2 is None:
        l2 = max(L2_GRID, key=lambda value: _cross_validated_accuracy(x_train, y_train, value))
    predicted = _fit_predict(x_train, y_train, x_eval, l2)  # (m,)
    scores = classification_scores(predicted, y_eval)
    metric = HEADLINE[task]
    return {
        **scores,
        "metric": metric,
        "score": scores[metric],
        "l2": l2,
        "n_train": len(train),
        "n_eval": len(evaluation),
        "protocol": (
            f"GLUE {task} {eval_split} ({len(evaluation):,}), linear probe on frozen mean-pooled embeddings, "
            f"logistic regression (L2 {l2:g} by {FOLDS}-fold CV) fit on the first {len(train):,} "
            f"training examples; {metric}"
        ),
    }


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 1.0, max_iter: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary logistic regression: minimise ``mean BCE(sigmoid(x w + b), y) + l2 / 2 * ||w||^2`` by Newton's
    method with step halving, in float64 (the objective is strictly convex for ``l2 > 0``).

    Args:
        x: ``(n, f)`` features; y: ``(n,)`` labels in {0, 1}.
        l2: ridge weight (> 0); the bias is not penalised.
        max_iter: Newton steps at most; it stops once no coordinate moves by more than 1e-10.

    Returns:
        ``w: (f,)`` and ``b: ()``, float64.
    """
    design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # (n, f + 1)
    target = y.double()  # (n,)
    ridge = torch.full((design.shape[1],), l2, dtype=torch.float64)
    ridge[-1] = 0.0  # no penalty on the bias

    def objective(theta: torch.Tensor) -> torch.Tensor:
        logits = design @ theta  # (n,)
        return F.binary_cross_entropy_with_logits(logits, target) + 0.5 * (ridge * theta**2).sum()

    theta = torch.zeros(design.shape[1], dtype=torch.float64)  # (f + 1,)
    for _ in range(max_iter):
        p = torch.sigmoid(design @ theta)  # (n,)
        gradient = design.T @ (p - target) / len(target) + ridge * theta  # (f + 1,)
        hessian = (design.T * (p * (1 - p))) @ design / len(target) + torch.diag(ridge)  # (f + 1, f + 1)
        step = torch.linalg.solve(hessian + 1e-12 * torch.eye(len(theta), dtype=torch.float64), gradient)
        scale, current = 1.0, objective(theta)
        while objective(theta - scale * step) > current and scale > 1e-6:
            scale /= 2
        theta = theta - scale * step
        if (scale * step).abs().max() < 1e-10:
            break
    return theta[:-1], theta[-1]


def classification_scores(predicted: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """``accuracy``, ``f1`` (of class 1) and ``mcc`` (Matthews correlation) of binary predictions ``(m,)``.

    F1 and MCC are 0 where undefined (no positive predictions or gold, a constant column).
    """
    tp = int(((predicted == 1) & (gold == 1)).sum())
    tn = int(((predicted == 0) & (gold == 0)).sum())
    fp = int(((predicted == 1) & (gold == 0)).sum())
    fn = int(((predicted == 0) & (gold == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return {"accuracy": float((predicted == gold).double().mean()), "f1": f1, "mcc": mcc}


def _fit_predict(x_train, y_train, x_eval, l2: float) -> torch.Tensor:
    """Standardise with the training statistics, fit, and predict the labels of ``x_eval (m, f)``: ``(m,)``."""
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp(min=1e-8)  # (f,)
    weight, bias = fit_logistic_regression((x_train - mean) / std, y_train, l2=l2)
    return ((((x_eval - mean) / std) @ weight + bias) > 0).long()


def _cross_validated_accuracy(x: torch.Tensor, y: torch.Tensor, l2: float) -> float:
    """Mean held-out accuracy over ``FOLDS`` contiguous folds of the training examples."""
    correct = 0
    for held_out in torch.arange(len(y)).chunk(FOLDS):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[held_out] = False
        correct += int((_fit_predict(x[keep], y[keep], x[held_out], l2) == y[held_out]).sum())
    return correct / len(y)


def _features(model, tokenizer, examples, options) -> torch.Tensor:
    """``(n, d)`` for single sentences, ``(n, 4 d)`` = ``[u, v, |u - v|, u * v]`` for pairs."""
    u = sentence_embeddings(model, tokenizer, [a for a, _, _ in examples], **options).double()  # (n, d)
    if examples[0][1] is None:
        return u
    v = sentence_embeddings(model, tokenizer, [b for _, b, _ in examples], **options).double()  # (n, d)
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)  # (n, 4d)
