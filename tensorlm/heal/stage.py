"""A recipe stage's ``heal:`` block in a run: checked on the plan, then run after the stage is built.

:func:`check_heal_plan` refuses, before any decomposition, a ``heal: {reconstruct: ...}`` on a stage after
which no factorized layer lies inside the transformer blocks (an embedding-only stage with nothing
compressed inside the blocks before it): reconstruction would have nothing to train.
:func:`reconstruct_stage` draws the calibration batches of the recipe's ``calibration`` settings (``lm_text``
training blocks for causal LMs, training sentences for encoders; never a test split) and runs
:func:`tensorlm.heal.reconstruct.reconstruct_blocks` against the uncompressed model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tensorlm.calibrate import calibration_batches
from tensorlm.errors import TensorLMError
from tensorlm.heal.blocks import find_blocks
from tensorlm.heal.reconstruct import reconstruct_blocks, split_batches
from tensorlm.plan import Plan
from tensorlm.recipe import CalibrationSettings, Recipe, Stage


def _reconstruct_config(stage: Stage):
    heal = getattr(stage, "heal", None)
    return None if heal is None else heal.reconstruct


def check_heal_plan(model: nn.Module, recipe: Recipe, plan: Plan, kind: str = "causal-lm") -> None:
    """Refuse, before any decomposition, a reconstruct block that cannot run: a calibration set too small
    for its held-out slice, or a stage that leaves nothing to train inside the blocks of ``model``.

    After stage ``k``, reconstruction trains the factorized layers that stages ``0..k`` put inside the block
    list (or every block parameter with ``train_dense``).

    Raises:
        TensorLMError: one line naming the stage and what is wrong.
    """
    stages = [s for s in recipe.stages if _reconstruct_config(s) is not None]
    if not stages:
        return
    path, _ = find_blocks(model)
    samples = recipe.calibration.samples or (128 if kind == "causal-lm" else 1024)
    built: list[str] = []
    for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True):
        built += [e.name for e in stage_plan.entries]
        config = _reconstruct_config(stage)
        if config is None:
            continue
        try:
            split_batches(-(-samples // config.batch_size), config.val_fraction)
        except TensorLMError as err:
            raise TensorLMError(f"stage {stage.name!r}: {err} ({samples} samples in batches of "
                                f"{config.batch_size})") from None
        if config.train_dense or any(n.startswith(path + ".") for n in built):
            continue
        raise TensorLMError(f"stage {stage.name!r}: heal reconstruct trains the factorized layers inside the blocks "
                            f"({path}), but after this stage there are none (it replaces "
                            f"{', '.join(e.name for e in stage_plan.entries)}); drop the heal block or set "
                            "train_dense: true")


def reconstruct_stage(student: nn.Module, teacher: nn.Module, tokenizer, kind: str, stage: Stage,
                      settings: CalibrationSettings, data_dir=None, *, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> dict:
    """Run ``stage``'s ``heal: {reconstruct: ...}`` on ``student`` (in place) against ``teacher``.

    Returns:
        :meth:`tensorlm.heal.reconstruct.ReconstructResult.to_dict` (per-block held-out MSE, storage, seconds).

    Raises:
        TensorLMError: the stage has no reconstruct block; what the calibration batches and
            :func:`~tensorlm.heal.reconstruct.reconstruct_blocks` raise.
    """
    config = _reconstruct_config(stage)
    if config is None:
        raise TensorLMError(f"stage {stage.name!r} has no heal: {{reconstruct: ...}} block")
    batches, _ = calibration_batches(settings, tokenizer, kind, data_dir, batch_size=config.batch_size)
    kwargs = {} if log is None else {"log": log}
    return reconstruct_blocks(student, teacher, batches, config=config, progress=progress, **kwargs).to_dict()
