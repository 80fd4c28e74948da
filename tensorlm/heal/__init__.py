"""Healing a compressed model: local block-wise reconstruction before global distillation.

:func:`reconstruct_blocks` fits each compressed transformer block to its uncompressed original on cached
calibration activations (:mod:`tensorlm.heal.reconstruct`); a recipe stage asks for it with
``heal: {reconstruct: {...}}`` (:class:`ReconstructConfig`), run after the stage is built by
:func:`tensorlm.heal.stage.reconstruct_stage` in the pipeline, after :func:`reconstruct_embedding` has fitted a
factored token table (and the head tied to it) on its own (:mod:`tensorlm.heal.embedding`).
:mod:`tensorlm.heal.teacher_store` keeps the teacher's top-k log-probabilities once, for distillation without a
teacher forward pass.
"""

from tensorlm.heal.config import HealConfig, ReconstructConfig
from tensorlm.heal.embedding import EmbeddingResult, reconstruct_embedding
from tensorlm.heal.reconstruct import BlockResult, ReconstructResult, reconstruct_blocks
from tensorlm.heal.teacher_store import TeacherStore, build_teacher_store, topk_kl

__all__ = ["BlockResult", "EmbeddingResult", "HealConfig", "ReconstructConfig", "ReconstructResult", "TeacherStore",
           "build_teacher_store", "reconstruct_blocks", "reconstruct_embedding", "topk_kl"]
