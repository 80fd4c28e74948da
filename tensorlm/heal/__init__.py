"""Healing a compressed model: local block-wise reconstruction before global distillation.

:func:`reconstruct_blocks` fits each compressed transformer block to its uncompressed original on cached
calibration activations (:mod:`tensorlm.heal.reconstruct`); a recipe stage asks for it with
``heal: {reconstruct: {...}}`` (:class:`ReconstructConfig`), run after the stage is built by
:func:`tensorlm.heal.stage.reconstruct_stage` in the pipeline.
"""

from tensorlm.heal.config import HealConfig, ReconstructConfig
from tensorlm.heal.reconstruct import BlockResult, ReconstructResult, reconstruct_blocks

__all__ = ["BlockResult", "HealConfig", "ReconstructConfig", "ReconstructResult", "reconstruct_blocks"]
