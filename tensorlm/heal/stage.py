"""A recipe stage's ``heal:`` block in a run: checked on the plan, then run after the stage is built.

:func:`check_heal_plan` refuses, before any decomposition, a ``heal: {reconstruct: ...}`` on a stage after
which reconstruction would have nothing to train: no factorized layer inside the transformer blocks, and no
factored input token table (or ``embedding_steps: 0``).
:func:`reconstruct_stage` draws the calibration batches of the recipe's ``calibration`` settings (``lm_text``
training blocks for causal LMs, training sentences for encoders; never a test split) and runs, against the
uncompressed model, :func:`tensorlm.heal.embedding.reconstruct_embedding` when the token table is factored
(block 0 then sees the fitted table), then :func:`tensorlm.heal.reconstruct.reconstruct_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tensorlm.calibrate import calibration_batches
from tensorlm.errors import TensorLMError
from tensorlm.heal.blocks import find_blocks
from tensorlm.heal.embedding import reconstruct_embedding
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
    list (or every block parameter with ``train_dense``), and the input token table when one of them
    factored it (unless ``embedding_steps: 0``).

    Raises:
        TensorLMError: one line naming the stage and what is wrong.
    """
    stages = [s for s in recipe.stages if _reconstruct_config(s) is not None]
    if not stages:
        return
    path, _ = find_blocks(model)
    table = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
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
        if config.embedding_steps and any(n == table or n.startswith(table + ".") for n in built):
            continue
        raise TensorLMError(f"stage {stage.name!r}: heal reconstruct trains the factorized layers inside the blocks "
                            f"({path}) and a factored token table ({table}), but after this stage there are none "
                            f"(it replaces {', '.join(e.name for e in stage_plan.entries)}"
                            f"{'; embedding_steps is 0' if not config.embedding_steps else ''}); drop the heal "
                            "block or set train_dense: true")


def reconstruct_stage(student: nn.Module, teacher: nn.Module, tokenizer, kind: str, stage: Stage,
                      settings: CalibrationSettings, data_dir=None, *, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> dict:
    """Run ``stage``'s ``heal: {reconstruct: ...}`` on ``student`` (in place) against ``teacher``.

    Returns:
        :meth:`tensorlm.heal.reconstruct.ReconstructResult.to_dict` (per-block held-out MSE, storage, seconds)
        with ``embedding``: :meth:`tensorlm.heal.embedding.EmbeddingResult.to_dict` (``stopped: "not run"``
        when the table is dense or ``embedding_steps`` is 0).

    Raises:
        TensorLMError: the stage has no reconstruct block; what the calibration batches and
            :func:`~tensorlm.heal.reconstruct.reconstruct_blocks` raise.
    """
    config = _reconstruct_config(stage)
    if config is None:
        raise TensorLMError(f"stage {stage.name!r} has no heal: {{reconstruct: ...}} block")
    batches, _ = calibration_batches(settings, tokenizer, kind, data_dir, batch_size=config.batch_size)
    kwargs = {} if log is None else {"log": log}
    embedding = reconstruct_embedding(student, teacher, batches, config=config, **kwargs)
    result = reconstruct_blocks(student, teacher, batches, config=config, progress=progress, **kwargs)
    return {**result.to_dict(), "embedding": embedding.to_dict()}
