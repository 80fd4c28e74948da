"""Knowledge distillation: recover a compressed student's quality by training it against its teacher.

``distill(student, teacher, tokenizer, config, out_dir, kind=...)`` runs the loop
(:mod:`tensorlm.distill.trainer`); :class:`DistillConfig` holds its settings (a recipe stage's
``distill:`` block); :mod:`tensorlm.distill.losses` the loss terms and presets; :mod:`tensorlm.distill.data`
the training data.
"""

from tensorlm.distill.config import DistillConfig
from tensorlm.distill.losses import PRESETS, TERMS
from tensorlm.distill.trainer import DistillResult, distill

__all__ = ["PRESETS", "TERMS", "DistillConfig", "DistillResult", "distill"]
