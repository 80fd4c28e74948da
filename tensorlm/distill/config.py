"""The settings of one distillation run; a recipe stage's ``distill:`` block is parsed into it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tensorlm.distill.losses import PRESETS, TERMS, resolve_weights
from tensorlm.errors import TensorLMError

KINDS = ("encoder", "causal-lm")
MIXED_PRECISION = ("auto", "no", "bf16")
TRAINABLE = ("all", "factors")


@dataclass
class DistillConfig:
    """Everything that decides a distillation run (:func:`tensorlm.distill.distill`).

    Attributes:
        loss: loss preset (:data:`tensorlm.distill.losses.PRESETS`) or ``"auto"``: ``"logits"`` for a causal
            LM, ``"embedding"`` for an encoder.
        weights: per-term weights laid over the preset (term -> weight; 0 switches a term off).
        temperature: softmax temperature of ``logit_kl``.
        layer_map: student block -> teacher block (0-based); ``None`` maps every student block to the
            teacher block of the same index.
        steps: optimizer steps.
        lr: peak learning rate of AdamW; weight_decay: its decoupled weight decay (matrices only).
        batch_size: sequences per optimizer step over all processes and accumulation steps (the global
            batch); it must divide by ``processes * grad_accum``.
        grad_accum: micro-batches accumulated per optimizer step on each process.
        seq_len: tokens per packed block (causal LMs); max_length: tokens per sentence (encoders).
        warmup: steps of linear warm-up before the cosine decay to 0.
        max_grad_norm: gradient clipping threshold (global L2 norm); 0 disables clipping.
        eval_every, save_every, log_every: steps between validations, checkpoints and log lines.
        data_dir: data root (``lm_text/``, ``stsb/``, ``sick/``); ``None`` reads ``TENSORLM_DATA``.
        text_dir: folder of training text files; ``None`` means ``<data_dir>/lm_text``.
        val_size: held-out blocks (causal) or sentences (encoder); ``None``: 64 blocks / 1000 sentences.
        seed: seeds the data order and the RNG of every step (dropout).
        time_budget_s: stop (and checkpoint) once the steps and validations have taken this many seconds
            of wall time, summed over resumes (setup and checkpoint writing not counted).
        mixed_precision: ``"auto"`` uses bf16 autocast on a CUDA GPU that supports it, else none; ``"bf16"``
            asks for ``torch.autocast(dtype=torch.bfloat16)`` on any device, the CPU included (this is the
            trainer's autocast option); ``"no"`` keeps float32. "auto" stays float32 on a CPU, where bf16 is
            far slower: CPU seconds per step (process time, 1 thread; 2-core AMD EPYC without bf16 units, load
            ~2.7, torch 2.13; Llama d=256, 4 layers, vocab 8192, 5.2M parameters; 4 x 128 tokens, logit KL,
            AdamW): float32 0.67 s, bf16 autocast 7.95 s (12x slower); with ``teacher_topk: 64`` instead
            of the teacher pass, float32 0.47 s (-30%), bf16 6.51 s.
        dropout: keep the student's dropout active while training (off by default: the student then
            matches a deterministic teacher, and attention KL needs undropped attention probabilities).
        teacher_topk: ``k > 0`` replaces the teacher's forward pass of ``logit_kl`` by a top-k teacher store
            (:mod:`tensorlm.heal.teacher_store`): the teacher's ``k`` largest log-probabilities (at
            ``temperature``) and the remaining mass, computed once for every training block the run's
            ``steps`` visit, written to ``teacher_store`` and reused by later runs whose teacher, tokenizer,
            blocks, ``k`` and temperature match. The logit loss becomes ``T^2 KL_k``, the KL over the top k
            plus "any other token", which never exceeds the full KL and equals it at ``k`` = vocabulary size.
            Causal LMs with a teacher only, and only the ``logit_kl`` and ``ce`` terms (hidden-state and
            attention terms need the teacher's forward pass every step, which the store exists to skip).
            Size: ``12 k`` bytes per stored token (int64 ids, float32 log-probabilities). 0 (default): off.
        teacher_store: the store's file (``.safetensors``); ``None``: ``<cache>/teacher-topk/<key>.safetensors``
            under ``$TENSORLM_CACHE`` (or ``~/.cache/tensorlm``), the key hashing everything the store depends
            on. An existing file written for another teacher, tokenizer, ``k``, temperature or other blocks is
            refused, never overwritten.
        gradient_checkpointing: recompute each transformer block's activations in the backward pass instead of
            keeping them (transformers' activation checkpointing; memory for about one extra forward pass).
            Refused for a model that does not support it. The gradients are those of the plain run.
        trainable: ``"all"`` trains every parameter of the student; ``"factors"`` only the parameters of its
            factorized layers (classes registered in :data:`tensorlm.layers.base.LAYERS`): norms, biases and
            dense weights stay frozen (their flags are restored after the run).
    """

    loss: str = "auto"
    weights: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    layer_map: dict[int, int] | None = None
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    max_length: int = 128
    warmup: int = 100
    max_grad_norm: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    data_dir: str | None = None
    text_dir: str | None = None
    val_size: int | None = None
    seed: int = 0
    time_budget_s: float | None = None
    mixed_precision: str = "auto"
    dropout: bool = False
    teacher_topk: int = 0
    teacher_store: str | None = None
    gradient_checkpointing: bool = False
    trainable: str = "all"

    def __post_init__(self) -> None:
        self._check()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DistillConfig:
        """Build from a plain dict (a recipe's ``distill:`` block, or :meth:`to_dict`'s output).

        Raises:
            TensorLMError: an unknown key (the message lists the valid ones) or a bad value.
        """
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TensorLMError(f"distill: unknown key(s) {unknown}; valid keys are {names}")
        if data.get("layer_map") is not None:
            data["layer_map"] = _int_map(data["layer_map"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal config (map keys as strings)."""
        out = dataclasses.asdict(self)
        if self.layer_map is not None:
            out["layer_map"] = {str(k): v for k, v in self.layer_map.items()}
        return out

    def loss_weights(self, kind: str) -> dict[str, float]:
        """The weight of every loss term for a model of ``kind`` ("encoder" | "causal-lm").

        Raises:
            TensorLMError: an unknown kind, or a logit term (``logit_kl``, ``ce``) for an encoder.
        """
        if kind not in KINDS:
            raise TensorLMError(f"distill: kind {kind!r} is unknown; choose one of {list(KINDS)}")
        preset = self.loss if self.loss != "auto" else ("logits" if kind == "causal-lm" else "embedding")
        weights = resolve_weights(preset, self.weights)
        if kind == "encoder" and (weights["logit_kl"] > 0 or weights["ce"] > 0):
            raise TensorLMError(f"distill: loss {preset!r} weighs logit terms, which an encoder without an LM "
                                "head cannot give; use loss 'embedding' or set weights logit_kl/ce to 0")
        return weights

    def _check(self) -> None:
        positive_ints = ("steps", "batch_size", "grad_accum", "seq_len", "max_length",
                         "eval_every", "save_every", "log_every")
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup", "seed", "teacher_topk"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.val_size is not None:
            _check_int("val_size", self.val_size, minimum=1)
        for name in ("temperature", "lr"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "max_grad_norm"):
            _check_float(name, getattr(self, name), positive=False)
        if self.time_budget_s is not None:
            _check_float("time_budget_s", self.time_budget_s, positive=True)
        if self.loss != "auto" and self.loss not in PRESETS:
            raise TensorLMError(f"distill: loss {self.loss!r} is unknown; choose 'auto' or one of {sorted(PRESETS)}")
        if not isinstance(self.weights, dict):
            raise TensorLMError(f"distill: weights must be a mapping term -> weight over {list(TERMS)}")
        if self.weights:
            resolve_weights("logits", self.weights)  # names and values
        if self.mixed_precision not in MIXED_PRECISION:
            raise TensorLMError(f"distill: mixed_precision {self.mixed_precision!r} is unknown; "
                                f"choose one of {list(MIXED_PRECISION)}")
        for name in ("dropout", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TensorLMError(f"distill: {name} must be true or false, got {getattr(self, name)!r}")
        if self.trainable not in TRAINABLE:
            raise TensorLMError(f"distill: trainable {self.trainable!r} is unknown; choose one of {list(TRAINABLE)}")
        if self.layer_map is not None:
            self.layer_map = _int_map(self.layer_map)
        for name in ("data_dir", "text_dir", "teacher_store"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, str(value))


def _int_map(mapping: Any) -> dict[int, int]:
    """``{"0": 1}`` or ``{0: 1}`` -> ``{0: 1}``; anything else is a :class:`TensorLMError`."""
    if not isinstance(mapping, dict):
        raise TensorLMError(f"distill: layer_map must be a mapping student block -> teacher block, got {mapping!r}")
    try:
        return {int(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise TensorLMError(f"distill: layer_map {mapping!r} must map integers to integers") from None


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TensorLMError(f"distill: {name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, *, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise TensorLMError(f"distill: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
