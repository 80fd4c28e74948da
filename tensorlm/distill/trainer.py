"""The distillation loop: a compressed student learns to reproduce its uncompressed teacher.

A plain PyTorch loop on Hugging Face ``accelerate``: one process on the CPU, one GPU with bf16 autocast,
or several processes with DDP under ``accelerate launch`` (``--cpu`` for gloo on CPUs; the same code;
gradients are averaged by DDP). ``batch_size`` is the global batch: each process takes its slice of the
step's batch and cuts it into ``grad_accum`` micro-batches, so a config trains the same on any number of
processes. Each micro-batch's loss is its own token mean, so with padded sentences (encoders) micro-batches
weigh equally rather than by token count; packed blocks (causal LMs) make the two the same.
AdamW with linear warm-up then cosine decay, gradient accumulation and clipping; validation on held-out
data only (never a test split) selects the best step, whose weights the student holds at the end.

Reproducibility and resumption. The data of optimizer step ``s`` is a pure function of ``(seed, s)``
(:mod:`tensorlm.distill.data`), and the torch RNG (dropout) is reseeded before every step from
``(seed, s, process rank)``; so the random state of a run is fully determined by its step, and a
checkpoint (student, optimizer and scheduler states, step, samples consumed, best step, elapsed time)
is enough to continue bit-for-bit. Checkpoints are written atomically: ``checkpoint-<step>.pt`` is
written under a temporary name and renamed, then ``checkpoint.json`` (its name, sha256 and the run's
fingerprint) is replaced atomically, then older files are removed; a crash at any moment leaves the last
complete checkpoint in place. The fingerprint hashes the training-relevant config and the student's
structure, so a folder of another run is refused, as is a checkpoint whose bytes do not match its sha256.

Cheaper steps (issue 11). ``teacher_topk`` computes the teacher's top-k log-probabilities once for every
block the run visits (:mod:`tensorlm.heal.teacher_store`, cached on disk and fingerprinted) and trains
``logit_kl`` against them, with no teacher forward pass per step; ``trainable: factors`` freezes everything
but the factorized layers; ``gradient_checkpointing`` recomputes block activations in the backward pass;
``mixed_precision: bf16`` is bfloat16 autocast (CPU or GPU). See :class:`DistillConfig` for the measured costs.

Out folder: ``checkpoint.json``, ``checkpoint-<step>.pt``, ``best-<step>.safetensors`` (the best
weights so far, with the step and metric in its metadata) and ``metrics.jsonl`` (one JSON object per
logged step or validation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list
from torch import nn
from tqdm.auto import tqdm

from tensorlm.calibrate import model_fingerprint
from tensorlm.data import resolve_data_dir
from tensorlm.distill.config import DistillConfig
from tensorlm.distill.data import LMBlocks, SentencePool, batch_indices, default_cache_dir
from tensorlm.distill.losses import (
    check_layer_map,
    distillation_loss,
    identity_layer_map,
    mean_pool,
    next_token_ce,
    required_outputs,
)
from tensorlm.errors import TensorLMError
from tensorlm.files import atomic_file, file_sha256
from tensorlm.heal.teacher_store import TeacherStore, build_teacher_store, tokenizer_fingerprint
from tensorlm.layers.base import LAYERS

CHECKPOINT_FORMAT = 1
RUN_ONLY_KEYS = ("time_budget_s", "save_every", "log_every", "data_dir", "text_dir", "steps", "teacher_store")
"""Config keys a run may be resumed with other values of: those that do not change what is trained, and
``steps`` (a resumed run continues to the new count; the cosine schedule is then stretched to it from the
checkpoint's step on)."""


@dataclass
class DistillResult:
    """What :func:`distill` did.

    Attributes:
        history: every ``metrics.jsonl`` record (training lines and validations), in step order.
        best_step: the step whose weights the student now holds (0: the undistilled student).
        best_metric: its validation value; metric: that value's name; higher_is_better: its direction.
        steps: optimizer steps completed; stopped: ``"completed"`` or ``"time_budget"``.
        out_dir: the run folder.
        teacher_metrics: the teacher's own default validation metrics (causal LMs: ``val_nll``, ``val_ppl``).
    """

    history: list[dict[str, Any]]
    best_step: int
    best_metric: float
    metric: str
    higher_is_better: bool
    steps: int
    stopped: str
    out_dir: Path
    teacher_metrics: dict[str, float] = field(default_factory=dict)


def distill(student: nn.Module, teacher: nn.Module | None, tokenizer, config: DistillConfig | dict, out_dir,
            *, kind: str, resume: bool = False, eval_fn: Callable[[nn.Module], float] | None = None,
            progress: bool = True) -> DistillResult:
    """Train ``student`` to match ``teacher`` and leave it holding its best validated weights.

    Args:
        student: the model to train (a compressed copy of ``teacher``), Hugging Face call convention.
        teacher: the reference model; run in eval mode under ``no_grad``, never updated. ``None`` trains a
            causal LM on the data alone (plain language-model training, e.g. to pretrain a teacher): the
            loss may then weigh ``ce`` only.
        tokenizer: the tokenizer both models share.
        config: a :class:`DistillConfig` or its dict form (a recipe stage's ``distill:`` block).
        out_dir: run folder for checkpoints, best weights and ``metrics.jsonl``; must be new or empty
            unless ``resume``.
        kind: ``"causal-lm"`` (packed blocks of ``lm_text``; validation: next-token NLL of held-out
            blocks, lower is better) or ``"encoder"`` (sentences; validation: mean cosine between student
            and teacher sentence embeddings of held-out sentences, higher is better).
        resume: continue from the folder's last checkpoint (a fresh start when it has none).
        eval_fn: ``student -> score``, higher is better (e.g. STS-B **dev** Spearman); when given it selects
            the best step instead of the default validation, which is still logged.
        progress: show a progress bar (main process only).

    Returns:
        :class:`DistillResult`.

    Raises:
        TensorLMError: bad config or kind; teacher and student vocabularies (or the tokenizer) differ; no
            teacher with an encoder or a loss term other than ``ce``; a
            layer map naming blocks that do not exist; ``out_dir`` holds another run, or a corrupted
            checkpoint, or is not empty without ``resume``; the loss becomes NaN or infinite.
    """
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(config)
    weights, flags, layer_map = _check_setup(cfg, kind, student, teacher, tokenizer)
    accelerator = _accelerator(cfg, kind)
    out = Path(out_dir)
    fingerprint = _fingerprint(cfg, kind, student)
    state = _open_run(out, cfg, fingerprint, resume)
    accelerator.wait_for_everyone()  # every process has looked at the folder before anyone writes
    with accelerator.main_process_first():
        data = _training_data(cfg, kind, tokenizer)
        store = _teacher_store(cfg, data, teacher, tokenizer, accelerator) if cfg.teacher_topk else None
    with contextlib.ExitStack() as restore:  # the student's flags and attention kind come back after the run
        restore.enter_context(_trainable(student, cfg.trainable))
        restore.enter_context(_checkpointing(student, cfg.gradient_checkpointing))
        if flags["output_attentions"]:
            restore.enter_context(_eager_attention((student, teacher)))
        model, optimizer, scheduler = _prepare(accelerator, student, teacher, cfg, state)
        run = _Run(acc=accelerator, model=model, teacher=teacher, tokenizer=tokenizer, cfg=cfg, kind=kind,
                   weights=weights, flags=flags, layer_map=layer_map, data=data, out=out, fingerprint=fingerprint,
                   eval_fn=eval_fn, optimizer=optimizer, scheduler=scheduler, store=store)
        return run.train(state, progress)


def _check_setup(cfg: DistillConfig, kind: str, student: nn.Module, teacher: nn.Module | None, tokenizer
                 ) -> tuple[dict[str, float], dict[str, bool], list]:
    """The loss weights, the outputs they need and the layer map, after checking they fit the models.

    Raises:
        TensorLMError: no teacher where one is needed, vocabularies that differ, a layer map naming
            missing blocks, attention terms with dropout on.
    """
    weights = cfg.loss_weights(kind)
    if teacher is None:
        _check_no_teacher(kind, weights)
        teacher = student  # only for vocabulary and layer checks; never run as a teacher
    _check_vocab(student, teacher, tokenizer)
    flags = required_outputs(weights)
    layer_map = cfg.layer_map or identity_layer_map(_num_layers(student))
    if flags["output_hidden_states"] or flags["output_attentions"]:
        check_layer_map(layer_map, _num_layers(student), _num_layers(teacher))
    if flags["output_attentions"] and cfg.dropout:
        raise TensorLMError("distill: attention_kl needs dropout=False (transformers returns attention "
                            "probabilities after dropout)")
    _check_topk(cfg, kind, weights, teacher if teacher is not student else None)
    return weights, flags, layer_map


def _check_topk(cfg: DistillConfig, kind: str, weights: dict[str, float], teacher: nn.Module | None) -> None:
    """Refuse a ``teacher_topk`` setting that cannot work (see :class:`DistillConfig`).

    Raises:
        TensorLMError: an encoder or no teacher; ``logit_kl`` weighing 0; a term that needs the teacher's
            hidden states or attentions every step; ``k`` larger than the vocabulary.
    """
    k = cfg.teacher_topk
    if not k:
        return
    if kind != "causal-lm" or teacher is None:
        raise TensorLMError(f"distill: teacher_topk needs a causal LM and its teacher (got kind {kind!r}, "
                            f"teacher {'none' if teacher is None else 'given'}); set teacher_topk: 0")
    if weights["logit_kl"] <= 0:
        raise TensorLMError("distill: teacher_topk stores the teacher for logit_kl, whose weight is 0; "
                            "set teacher_topk: 0 or give logit_kl a weight")
    others = sorted(t for t, w in weights.items() if w > 0 and t not in ("logit_kl", "ce"))
    if others:
        raise TensorLMError(f"distill: teacher_topk skips the teacher's forward pass, which {others} need every "
                            "step; set teacher_topk: 0 or weigh only logit_kl and ce")
    vocab = _vocab_size(teacher)
    if k > vocab:
        raise TensorLMError(f"distill: teacher_topk {k} exceeds the vocabulary ({vocab}); choose 1..{vocab}")


def _accelerator(cfg: DistillConfig, kind: str) -> Accelerator:
    """The accelerator of a run.

    Raises:
        TensorLMError: ``batch_size`` does not divide by processes x ``grad_accum``.
    """
    # An encoder's pooler takes no part in any loss: DDP must then look for parameters without gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=kind == "encoder")
    precision = _precision(cfg.mixed_precision)
    current = AcceleratorState._shared_state.get("_mixed_precision")  # None: no Accelerator in this process yet
    if current is not None and current != precision:
        # accelerate keeps one mixed-precision setting per process and refuses another; a later run of this
        # process may ask for another, so its state starts afresh (the process group, PartialState, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=[ddp])
    world = accelerator.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TensorLMError(f"distill: batch_size {cfg.batch_size} must divide by processes x grad_accum "
                            f"= {world} x {cfg.grad_accum}")
    return accelerator


def _prepare(accelerator: Accelerator, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig,
             state: dict | None):
    """Models on the device, optimizer and scheduler (restored from ``state`` when resuming), prepared."""
    if teacher is not None:
        teacher.to(accelerator.device).eval()
    student.to(accelerator.device)
    optimizer = _adamw(student, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup, cfg.steps))
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    model, optimizer = accelerator.prepare(student, optimizer)
    return model, optimizer, scheduler


@dataclass
class _Progress:
    """Where a run stands: steps done, training seconds, the best validated step and its metric."""

    step: int = 0
    elapsed: float = 0.0
    best_step: int = -1
    best_metric: float = math.nan


@dataclass
class _Run:
    """One run's moving parts; :meth:`train` is the loop.

    The first fields are what :func:`distill` set up; the rest are derived in ``__post_init__``.
    """

    acc: Accelerator
    model: nn.Module  # the student as the accelerator prepared it (DDP-wrapped under several processes)
    teacher: nn.Module | None
    tokenizer: Any
    cfg: DistillConfig
    kind: str
    weights: dict[str, float]
    flags: dict[str, bool]
    layer_map: list
    data: LMBlocks | SentencePool
    out: Path
    fingerprint: str
    eval_fn: Callable[[nn.Module], float] | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    store: _Store | None = None  # the top-k teacher store that stands in for the teacher's logits
    student: nn.Module = field(init=False)
    micro: int = field(init=False)
    metric: str = field(init=False)
    higher_is_better: bool = field(init=False)
    history: list[dict[str, Any]] = field(init=False, default_factory=list)
    _teacher_val: list[torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.student = self.acc.unwrap_model(self.model)
        self.micro = self.cfg.batch_size // (self.acc.num_processes * self.cfg.grad_accum)
        self.metric = "val_score" if self.eval_fn else ("val_nll" if self.kind == "causal-lm" else "val_cosine")
        self.higher_is_better = self.metric != "val_nll"

    # -- the loop -------------------------------------------------------------------------------------

    def train(self, state: dict | None, progress: bool) -> DistillResult:
        """Train from ``state`` (None: a fresh start) to ``cfg.steps`` or the time budget; load the best."""
        cfg, acc = self.cfg, self.acc
        at, teacher_metrics = self._start() if state is None else self._resume(state)
        stopped = "completed"
        self._train_mode()
        bar = tqdm(total=cfg.steps, initial=at.step, desc="distill",
                   disable=None if (progress and acc.is_main_process) else True)  # bar only on a terminal
        window = [0, 0.0]  # tokens and seconds since the last log line
        while at.step < cfg.steps:
            start = time.perf_counter()
            loss, parts, tokens, grad_norm, lr = self._step(at.step)
            at.step += 1
            took = time.perf_counter() - start
            at.elapsed += took
            window = [window[0] + tokens, window[1] + took]
            if at.step % cfg.log_every == 0 or at.step == cfg.steps:
                rate = window[0] / max(window[1], 1e-9)
                self._log({"step": at.step, "loss": loss, **{f"loss/{k}": v for k, v in parts.items()},
                           "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate, "elapsed_s": at.elapsed})
                bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{rate:.0f}")
                window = [0, 0.0]
            bar.update(1)
            if self._validate_and_save(at):
                stopped = "time_budget"
                break
        bar.close()
        self._load_best(at.best_step)
        return DistillResult(history=self.history, best_step=at.best_step, best_metric=at.best_metric,
                             metric=self.metric, higher_is_better=self.higher_is_better, steps=at.step,
                             stopped=stopped, out_dir=self.out, teacher_metrics=teacher_metrics)

    def _start(self) -> tuple[_Progress, dict[str, float]]:
        """A fresh run: an empty log, the teacher's metrics and the undistilled student validated as step 0
        (both validations count in the time budget: uncounted, they made a CPU healing phase overrun)."""
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")
        self.acc.wait_for_everyone()
        start = time.perf_counter()
        teacher_metrics = self._teacher_metrics()
        record = self._validate(0)
        self._log(dict(record, **{f"teacher_{k}": v for k, v in teacher_metrics.items()}))
        at = _Progress(elapsed=time.perf_counter() - start, best_step=0, best_metric=record[self.metric])
        self._save_best(0, at.best_metric)
        return at, teacher_metrics

    def _resume(self, state: dict) -> tuple[_Progress, dict[str, float]]:
        """A resumed run: the log cut back to the checkpoint's step, stale files removed."""
        at = _Progress(state["step"], state["elapsed_s"], state["best_step"], state["best_metric"])
        log_path = self.out / "metrics.jsonl"
        self.history = [r for r in _read_jsonl(log_path) if r["step"] <= at.step]
        teacher_metrics = {k[len("teacher_"):]: v for r in self.history for k, v in r.items()
                           if k.startswith("teacher_")}
        if self.acc.is_main_process:
            _atomic_write(log_path, "".join(json.dumps(r) + "\n" for r in self.history).encode())
            _remove_stale(self.out, keep={_checkpoint_name(at.step), _best_name(at.best_step)})
        self.acc.wait_for_everyone()
        return at, teacher_metrics

    def _validate_and_save(self, at: _Progress) -> bool:
        """Validate and checkpoint when due (updating ``at``); True when the time budget is spent early. A
        budget spent between validations validates the last step too, so that the steps since the last
        validation can be chosen (they were dropped before: 3 steps on SmolLM2 kept step 0)."""
        cfg = self.cfg
        due = at.step % cfg.eval_every == 0 or at.step == cfg.steps
        if due:
            self._validate_step(at)
        out_of_time = self._out_of_time(at.elapsed)
        if out_of_time and not due:
            self._validate_step(at)
        if at.step % cfg.save_every == 0 or at.step == cfg.steps or out_of_time:
            self._save_checkpoint(at.step, at.elapsed, at.best_step, at.best_metric)
        return out_of_time and at.step < cfg.steps

    def _validate_step(self, at: _Progress) -> None:
        """Validate the student at ``at.step``, keep it when best; its seconds count in ``at.elapsed``."""
        start = time.perf_counter()
        record = self._validate(at.step)
        self._log(record)
        if self._better(record[self.metric], at.best_metric):
            at.best_step, at.best_metric = at.step, record[self.metric]
            self._save_best(at.step, at.best_metric)
        self._train_mode()
        at.elapsed += time.perf_counter() - start

    def _step(self, step: int) -> tuple[float, dict[str, float], int, float | None, float]:
        """One optimizer step: (mean loss over processes, this process's terms, tokens, grad norm, lr used)."""
        cfg, acc = self.cfg, self.acc
        torch.manual_seed(_step_seed(cfg.seed, step, acc.process_index))
        batch = self.data.train_batch(step, cfg.batch_size, cfg.seed)  # the global batch
        per_process = cfg.batch_size // acc.num_processes
        local = batch[acc.process_index * per_process:(acc.process_index + 1) * per_process]
        rows = None if self.store is None else self.store.rows(self.data, step, cfg)[
            acc.process_index * per_process:(acc.process_index + 1) * per_process]
        total, parts_sum, tokens = 0.0, {}, 0
        for a in range(cfg.grad_accum):
            inputs = self._inputs(local[a * self.micro:(a + 1) * self.micro])
            sync = contextlib.nullcontext() if a == cfg.grad_accum - 1 else acc.no_sync(self.model)
            with sync:
                micro_rows = None if rows is None else rows[a * self.micro:(a + 1) * self.micro]
                loss, parts = self._loss(inputs, micro_rows)
                acc.backward(loss / cfg.grad_accum)
            total += float(loss.detach()) / cfg.grad_accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            mask = inputs.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="mean"))
        if not math.isfinite(mean_loss):
            raise TensorLMError(f"distill: the loss is {mean_loss} at step {step + 1} (terms {parts_sum}); "
                                f"lower lr (now {cfg.lr}) or max_grad_norm, or check the student")
        return mean_loss, parts_sum, tokens * acc.num_processes, grad_norm, lr

    def _loss(self, inputs: dict[str, torch.Tensor], rows: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch: the teacher's forward pass, or the store's rows ``(b,)`` when there is one."""
        t_out, topk = None, None
        if self.store is not None:
            topk = self.store.slice(rows, self.acc.device)
        elif self.teacher is not None:
            with torch.no_grad(), self.acc.autocast():
                t_out = self.teacher(**inputs, **self.flags)
        s_out = self.model(**inputs, **self.flags)
        return distillation_loss(s_out, t_out, self.weights, input_ids=inputs["input_ids"],
                                 attention_mask=inputs.get("attention_mask"), temperature=self.cfg.temperature,
                                 layer_map=self.layer_map, teacher_topk=topk)

    def _inputs(self, samples) -> dict[str, torch.Tensor]:
        """Model inputs of a micro-batch: packed blocks as they are, sentences tokenized with padding."""
        if self.kind == "causal-lm":
            return {"input_ids": samples.to(self.acc.device)}  # (b, T)
        enc = self.tokenizer(list(samples), padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return {k: v.to(self.acc.device) for k, v in enc.items()}

    def _train_mode(self) -> None:
        """Dropout on only if asked; with gradient checkpointing, the checkpointed blocks themselves are marked
        training (transformers checkpoints only then) while their submodules stay in eval mode (no dropout)."""
        self.model.train(self.cfg.dropout)
        if self.cfg.gradient_checkpointing and not self.cfg.dropout:
            for module in self.student.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = True

    def _better(self, value: float, best: float) -> bool:
        if math.isnan(best):
            return not math.isnan(value)
        return value > best if self.higher_is_better else value < best

    def _out_of_time(self, elapsed: float) -> bool:
        """The same decision on every process (the main process's clock rules)."""
        budget = self.cfg.time_budget_s
        flag = [budget is not None and elapsed >= budget]
        broadcast_object_list(flag)
        return bool(flag[0])

    # -- validation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _validate(self, step: int) -> dict[str, Any]:
        """Validation metrics of the student at ``step`` (computed on the main process, shared to all)."""
        record: list[Any] = [None]
        if self.acc.is_main_process:
            self.student.eval()
            record[0] = {"step": step, **self._default_metrics(self.student)}
            if self.eval_fn is not None:
                record[0]["val_score"] = float(self.eval_fn(self.student))
                self.student.eval()
        broadcast_object_list(record)
        return record[0]

    def _default_metrics(self, model: nn.Module) -> dict[str, float]:
        """Causal: next-token NLL of the held-out blocks (nats/token) and its perplexity. Encoder: mean
        cosine between the model's and the teacher's mean-pooled embeddings of the held-out sentences."""
        if self.kind == "causal-lm":
            nll, count = 0.0, 0
            for ids in self.data.val_batches(self.micro):
                ids = ids.to(self.acc.device)  # (b, T)
                with self.acc.autocast():
                    logits = model(input_ids=ids).logits
                n = ids.shape[0] * (ids.shape[1] - 1)
                nll += float(next_token_ce(logits, ids)) * n
                count += n
            return {"val_nll": nll / count, "val_ppl": math.exp(nll / count)}
        if self._teacher_val is None:
            self._teacher_val = [self._pooled(self.teacher, batch) for batch in self.data.val_batches(self.micro)]
        cosines = [F.cosine_similarity(self._pooled(model, batch), ref, dim=-1)
                   for batch, ref in zip(self.data.val_batches(self.micro), self._teacher_val, strict=True)]
        return {"val_cosine": float(torch.cat(cosines).mean())}

    def _pooled(self, model: nn.Module, sentences: list[str]) -> torch.Tensor:
        inputs = self._inputs(sentences)
        with self.acc.autocast():
            out = model(**inputs)
        return mean_pool(out.last_hidden_state, inputs["attention_mask"])  # (b, d)

    def _teacher_metrics(self) -> dict[str, float]:
        """The teacher's own validation NLL (causal LMs): the floor the student is measured against."""
        if self.kind != "causal-lm" or self.teacher is None:
            return {}
        record: list[Any] = [None]
        if self.acc.is_main_process:
            with torch.no_grad():
                record[0] = self._default_metrics(self.teacher)
        broadcast_object_list(record)
        return record[0]

    # -- files ----------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _save_best(self, step: int, metric: float) -> None:
        if self.acc.is_main_process:
            with atomic_file(self.out / _best_name(step)) as tmp:
                safetensors.torch.save_model(self.student, str(tmp),
                                             metadata={"step": str(step), "metric": repr(metric)})
        self.acc.wait_for_everyone()

    def _load_best(self, best_step: int) -> None:
        path = self.out / _best_name(best_step)
        safetensors.torch.load_model(self.student, str(path), strict=True)  # copied onto the student's device
        self.student.eval()

    def _save_checkpoint(self, step: int, elapsed: float, best_step: int, best_metric: float) -> None:
        if self.acc.is_main_process:
            name = _checkpoint_name(step)
            state = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": step,
                     "samples_seen": step * self.cfg.batch_size, "elapsed_s": elapsed,
                     "best_step": best_step, "best_metric": best_metric,
                     "rng": {"seed": self.cfg.seed, "scheme": "torch.manual_seed(f(seed, step, rank)) per step"},
                     "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict()}
            with atomic_file(self.out / name) as tmp:
                torch.save(state, tmp)
            index = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": step,
                     "file": name, "sha256": file_sha256(self.out / name), "best_step": best_step,
                     "settings": _settings(self.cfg)}
            _atomic_write(self.out / "checkpoint.json", json.dumps(index, indent=1).encode())
            _remove_stale(self.out, keep={name, _best_name(best_step)})
        self.acc.wait_for_everyone()


# -- setup helpers ------------------------------------------------------------------------------------


@dataclass
class _Store:
    """A loaded top-k teacher store and where each training block sits in it.

    Attributes:
        store: the :class:`TeacherStore` over the blocks a run visits; row_of: ``(n_train,)`` int64, the store
            row of every training block of :class:`LMBlocks` (-1 for blocks the run never visits).
    """

    store: TeacherStore
    row_of: torch.Tensor

    def rows(self, data: LMBlocks, step: int, cfg: DistillConfig) -> torch.Tensor:
        """Store rows ``(batch_size,)`` of optimizer step ``step``'s global batch (same order as its blocks)."""
        return self.row_of[batch_indices(step, cfg.batch_size, len(data.train_index), cfg.seed)]

    def slice(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indices (b, L, k), logprobs (b, L, k), rest (b, L))`` of ``rows``, on ``device``."""
        s = self.store
        return s.indices[rows].to(device), s.logprobs[rows].to(device), s.rest[rows].to(device)


def _teacher_store(cfg: DistillConfig, data: LMBlocks, teacher: nn.Module, tokenizer, acc: Accelerator) -> _Store:
    """The top-k store of every training block that steps ``0 .. cfg.steps - 1`` visit: loaded from
    ``cfg.teacher_store`` (or the cache) when it is there, else computed once (main process) and saved.

    Raises:
        TensorLMError: the file is not a store, or holds another teacher, tokenizer, k, temperature or blocks.
    """
    n = len(data.train_index)
    needed = sorted({i for s in range(cfg.steps) for i in batch_indices(s, cfg.batch_size, n, cfg.seed)})
    ids = data.train_blocks(needed)  # (N, L)
    path = Path(cfg.teacher_store) if cfg.teacher_store else _store_path(cfg, teacher, tokenizer, ids)
    if path.exists():
        store = TeacherStore.load(path, teacher, tokenizer)
        if store.k != cfg.teacher_topk or store.temperature != cfg.temperature or not torch.equal(store.ids, ids):
            raise TensorLMError(f"distill: teacher store {path} holds k={store.k} at temperature {store.temperature} "
                                f"over {len(store.ids)} other blocks; this run needs k={cfg.teacher_topk} at "
                                f"{cfg.temperature} over its {len(ids)} training blocks: delete it or name another "
                                "teacher_store")
    else:
        teacher.to(acc.device).eval()
        micro = cfg.batch_size // (acc.num_processes * cfg.grad_accum)
        with acc.autocast():  # the teacher's logits as the trainer's own teacher pass would give them
            store = build_teacher_store(teacher, tokenizer, ids, k=cfg.teacher_topk, batch_size=micro,
                                        temperature=cfg.temperature)
        if acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            store.save(path)
    row_of = torch.full((n,), -1, dtype=torch.int64)
    row_of[needed] = torch.arange(len(needed))
    return _Store(store, row_of)


def _store_path(cfg: DistillConfig, teacher: nn.Module, tokenizer, ids: torch.Tensor) -> Path:
    """``<cache>/teacher-topk/<key>.safetensors``, the key hashing teacher, tokenizer, blocks, k and temperature."""
    h = hashlib.sha256(f"{model_fingerprint(teacher)}|{tokenizer_fingerprint(tokenizer)}|{cfg.teacher_topk}|"
                       f"{float(cfg.temperature)!r}|{tuple(ids.shape)}|".encode())
    h.update(ids.numpy().tobytes())
    return default_cache_dir() / "teacher-topk" / f"{h.hexdigest()[:32]}.safetensors"


@contextlib.contextmanager
def _trainable(student: nn.Module, which: str):
    """With ``which == "factors"``, freeze every parameter outside the factorized layers; restore on exit.

    Raises:
        TensorLMError: ``"factors"`` on a student without any factorized layer.
    """
    if which == "all":
        yield
        return
    factors = {id(p) for m in student.modules() if type(m).__name__ in LAYERS for p in m.parameters()}
    if not factors:
        raise TensorLMError("distill: trainable 'factors' but the student has no factorized layer (nothing "
                            "compressed); use trainable: all")
    saved = [(p, p.requires_grad) for p in student.parameters()]
    try:
        for p, flag in saved:
            p.requires_grad_(flag and id(p) in factors)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _checkpointing(student: nn.Module, on: bool):
    """Transformers' activation (gradient) checkpointing on ``student`` while training; off again on exit.

    Raises:
        TensorLMError: ``on`` for a model that does not support it.
    """
    if not on:
        yield
        return
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise TensorLMError(f"distill: gradient_checkpointing is not supported by {type(student).__name__}; "
                            "set gradient_checkpointing: false")
    enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
    disable = getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable
    enable()
    try:
        yield
    finally:
        disable()
        if getattr(student, "_require_grads_hook", None) is not None:  # set by enable() for input_ids models
            student.disable_input_require_grads()


def _open_run(out: Path, cfg: DistillConfig, fingerprint: str, resume: bool) -> dict | None:
    """The checkpoint state to resume from, or ``None`` for a fresh start (after checking the folder).

    Raises:
        TensorLMError: as listed in :func:`distill` (a used folder without ``resume``, another run's
            checkpoint, naming the config keys that changed when the index records them, a corrupted one).
    """
    index_path = out / "checkpoint.json"
    if not index_path.exists():
        if out.exists() and any(out.iterdir()) and not resume:
            raise TensorLMError(f"distill: out_dir {str(out)!r} is not empty and holds no checkpoint; "
                                "choose a new folder (or pass --resume to start over in it)")
        return None
    if not resume:
        raise TensorLMError(f"distill: out_dir {str(out)!r} holds a run's checkpoint; pass --resume to "
                            "continue it, --restart to discard it, or choose a new folder")
    try:
        index = json.loads(index_path.read_text())
        name, digest = index["file"], index["sha256"]
        stored_fingerprint = index["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TensorLMError(f"distill: checkpoint index {str(index_path)!r} is corrupted ({exc})") from None
    if stored_fingerprint != fingerprint:
        raise TensorLMError(f"distill: out_dir {str(out)!r} holds a checkpoint of another run "
                            f"({_difference(index.get('settings'), _settings(cfg))}); --resume continues only "
                            "the same run: restore the setting, pass --restart to discard the checkpoint, or "
                            "choose a new folder")
    path = out / name
    if not path.is_file() or file_sha256(path) != digest:
        raise TensorLMError(f"distill: checkpoint {str(path)!r} is corrupted or missing (sha256 does not "
                            "match checkpoint.json); delete the folder or pick another")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that matches its digest but will not load
        raise TensorLMError(f"distill: checkpoint {str(path)!r} cannot be read ({type(exc).__name__})") from exc
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        raise TensorLMError(f"distill: checkpoint {str(path)!r} has format {state.get('format')}, expected "
                            f"{CHECKPOINT_FORMAT} of this run")
    return state


def _training_data(cfg: DistillConfig, kind: str, tokenizer) -> LMBlocks | SentencePool:
    data_dir = resolve_data_dir(cfg.data_dir) if (cfg.data_dir or cfg.text_dir is None) else None
    text_dir = Path(cfg.text_dir) if cfg.text_dir else data_dir / "lm_text"
    if kind == "causal-lm":
        return LMBlocks(tokenizer, text_dir, cfg.seq_len, val_blocks=cfg.val_size or 64,
                        cache_dir=default_cache_dir())
    return SentencePool(text_dir, data_dir, val_size=cfg.val_size or 1000)


def _check_no_teacher(kind: str, weights: dict[str, float]) -> None:
    """Without a teacher only a causal LM's next-token cross-entropy can be trained."""
    others = sorted(t for t, w in weights.items() if w > 0 and t != "ce")
    if kind != "causal-lm" or others:
        raise TensorLMError(f"distill: without a teacher only kind 'causal-lm' with the 'ce' term can train "
                            f"(got kind {kind!r}, terms {others}); e.g. loss 'logits' with weights "
                            "{logit_kl: 0, ce: 1}")


def _check_vocab(student: nn.Module, teacher: nn.Module, tokenizer) -> None:
    """Raise unless student and teacher embed the same vocabulary and the tokenizer fits in it."""
    v_s, v_t = _vocab_size(student), _vocab_size(teacher)
    if v_s != v_t:
        raise TensorLMError(f"distill: student vocabulary {v_s} != teacher vocabulary {v_t}; distillation "
                            "needs one tokenizer for both")
    if len(tokenizer) > v_t:
        raise TensorLMError(f"distill: the tokenizer has {len(tokenizer)} tokens but the models embed {v_t}")


def _vocab_size(model: nn.Module) -> int:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embedding, "num_embeddings", None)
    return int(size if size is not None else model.config.vocab_size)


def _num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def _precision(setting: str) -> str:
    if setting == "auto":
        cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda else "no"
    return setting


def _adamw(student: nn.Module, cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov and Hutter 2019); weight decay on matrices only, not on biases and norms."""
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def _warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """LR factor of update ``i`` (0-based): ``(i+1)/warmup`` while warming up, then cosine from 1 to 0."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@contextlib.contextmanager
def _eager_attention(models):
    """Switch models to eager attention (the only kind that returns attention probabilities), then back."""
    before = [m.config._attn_implementation for m in models]
    try:
        for m in models:
            m.set_attn_implementation("eager")
        yield
    finally:
        for m, impl in zip(models, before, strict=True):
            m.set_attn_implementation(impl)


def _settings(cfg: DistillConfig) -> dict[str, Any]:
    """The config keys that make a run (all but :data:`RUN_ONLY_KEYS`)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RUN_ONLY_KEYS}


def _difference(stored: dict | None, now: dict[str, Any]) -> str:
    """Which config keys changed since the checkpoint, in words (the index of older runs has no settings)."""
    if not isinstance(stored, dict):
        return "the config or the student's structure differ"
    now = json.loads(json.dumps(now))  # tuples as the stored JSON has them (lists)
    changed = [f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(stored) | set(now))
               if stored.get(k) != now.get(k)]
    if not changed:
        return "the config is the same but the student's structure or the model kind differ"
    return "config changed: " + ", ".join(changed)


def _fingerprint(cfg: DistillConfig, kind: str, student: nn.Module) -> str:
    """sha256 of what makes a run: training-relevant config, kind, the student's modules and tensors."""
    settings = _settings(cfg)
    structure = [(k, list(v.shape), str(v.dtype)) for k, v in student.state_dict().items()]
    modules = [type(m).__name__ for m in student.modules()]
    blob = json.dumps({"config": settings, "kind": kind, "tensors": structure, "modules": modules}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "big") >> 1


def _checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}.pt"


def _best_name(step: int) -> str:
    return f"best-{step:07d}.safetensors"


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete checkpoint/best files (and temporaries) other than ``keep``."""
    for path in out.iterdir():
        if path.name.startswith(("checkpoint-", "best-")) and path.name not in keep:
            path.unlink()


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through :func:`tensorlm.files.atomic_file`, synced to disk first."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

