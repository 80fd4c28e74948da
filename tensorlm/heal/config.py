"""The ``heal:`` block of a recipe stage: what to do to a stage's student right after it is built.

::

    heal:
      reconstruct: {lr: 1.0e-3, max_steps: 200, val_fraction: 0.125}   # block-wise reconstruction

``reconstruct`` is :class:`ReconstructConfig` (``{}`` or ``true``: the defaults; ``joint_steps: 0`` leaves a
shared Tucker bank frozen instead of training it jointly across its blocks). Unknown keys are refused with the
valid ones listed, like a stage's ``budget``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tensorlm.errors import TensorLMError
from tensorlm.methods.registry import options_from_dict

EMBEDDING_HEADS = ("centred", "kl")


@dataclass
class ReconstructConfig:
    """Block-wise reconstruction (BRECQ, Li et al., ICLR 2021) of every transformer block, in order.

    Attributes:
        lr: Adam learning rate of the block's compressed factors.
        max_steps: optimizer steps per block at most (one step: one mini-batch of cached activations).
        batch_size: sequences per mini-batch (the pipeline draws calibration batches of this size).
        val_fraction: fraction of the calibration mini-batches held out for early stopping, in (0, 1).
        eval_every: steps between two held-out evaluations.
        patience: evaluations without improvement before a block stops.
        time_budget_s: wall seconds per block at most (None: no limit); checked after every step.
        max_memory_mb: the cached activations (three float32 copies of every block's input, ``n_blocks + 2``
            with a joint pass) stay in memory below this size, else go to ``.npy`` files in a temporary folder.
        train_dense: also train the block's dense parameters (norms, biases, unfactorized linears).
        seed: order of the mini-batches.
        joint_steps: after the block-by-block pass, when blocks share parameters (a Tucker bank), optimizer
            steps at most of the joint pass that trains the shared factors with every block's own on the sum of
            the per-block MSE (one step: one mini-batch through every block, each block fed the detached output
            of the student block before it, so no gradient crosses blocks; early stopping as above, by the
            summed held-out MSE; see :mod:`tensorlm.heal.reconstruct`). 0: no joint pass, shared parameters stay
            frozen. Without shared parameters it changes nothing. The joint pass keeps every block's teacher
            targets: ``n_blocks + 2`` activation sets instead of 3 count against ``max_memory_mb``.
        joint_lr: Adam learning rate of the joint pass (None: ``lr``).
        joint_time_budget_s: wall seconds of the joint pass at most (None: no limit); checked after every step.
        embedding_steps: when the input token table is factored, full-batch Adam steps at most of its own
            reconstruction before the blocks (its looked-up rows and, with a tied head, its logits;
            :mod:`tensorlm.heal.embedding`); early stopping as above. 0: the table stays as built.
        embedding_lr: Adam learning rate of the table (None: ``lr``).
        head_directions: leading principal directions of the LM head's inputs on which a tied head's logits
            are fitted (the share of their energy is reported); at most the hidden size.
        embedding_head: a tied head's term in the table's reconstruction: ``centred`` (its logits centred over
            the vocabulary on ``head_directions`` directions, squared) or ``kl`` (``KL(teacher || student)`` of
            its softmax at the teacher's cached head inputs, the head's own loss; a mini-batch of positions per
            step; :mod:`tensorlm.heal.embedding`).
    """

    lr: float = 1e-3
    max_steps: int = 200
    batch_size: int = 8
    val_fraction: float = 0.125
    eval_every: int = 10
    patience: int = 3
    time_budget_s: float | None = None
    max_memory_mb: float = 2048.0
    train_dense: bool = False
    seed: int = 0
    joint_steps: int = 200
    joint_lr: float | None = None
    joint_time_budget_s: float | None = None
    embedding_steps: int = 200
    embedding_lr: float | None = None
    head_directions: int = 64
    embedding_head: str = "centred"

    def __post_init__(self):
        for key in ("lr", "max_memory_mb"):
            if not getattr(self, key) > 0:
                raise TensorLMError(f"reconstruct {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("max_steps", "batch_size", "eval_every", "patience", "head_directions"):
            if not getattr(self, key) >= 1:
                raise TensorLMError(f"reconstruct {key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not 0 < self.val_fraction < 1:
            raise TensorLMError(f"reconstruct val_fraction must be in (0, 1), got {self.val_fraction!r}")
        for key in ("time_budget_s", "joint_lr", "joint_time_budget_s", "embedding_lr"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise TensorLMError(f"reconstruct {key} must be > 0 or null, got {getattr(self, key)!r}")
        if self.embedding_head not in EMBEDDING_HEADS:
            raise TensorLMError(f"reconstruct embedding_head must be one of {list(EMBEDDING_HEADS)}, "
                                f"got {self.embedding_head!r}")
        for key, zero in (("joint_steps", "no joint pass"), ("embedding_steps", "the table stays as built")):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TensorLMError(f"reconstruct {key} must be an integer >= 0 (0: {zero}), got {value!r}")

    @classmethod
    def from_dict(cls, data: dict | bool | None, where: str = "reconstruct") -> ReconstructConfig:
        """The config of a mapping (``True`` / ``None``: the defaults).

        Raises:
            TensorLMError: not a mapping, an unknown key (valid ones listed), a value of the wrong type or range.
        """
        return options_from_dict(cls, None if data is True else data, where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class HealConfig:
    """A stage's ``heal:`` block; ``reconstruct`` is None when the stage only names other steps."""

    reconstruct: ReconstructConfig | None = None

    @classmethod
    def from_dict(cls, data: dict, where: str = "heal") -> HealConfig:
        """Parse ``{reconstruct: {...}}``.

        Raises:
            TensorLMError: not a mapping, an unknown key (valid: reconstruct), an invalid reconstruct block,
                or a block that asks for nothing.
        """
        fields = options_from_dict(cls, data, where)
        value = fields.reconstruct
        if value is False or value is None:
            raise TensorLMError(f"{where}: asks for nothing; give reconstruct: {{...}} or drop the heal block")
        if isinstance(value, ReconstructConfig):
            return cls(value)
        return cls(ReconstructConfig.from_dict(value, f"{where} reconstruct"))

    def to_dict(self) -> dict:
        return {} if self.reconstruct is None else {"reconstruct": self.reconstruct.to_dict()}
