"""Streaming compression: a checkpoint larger than memory compressed one target module at a time.

``compress_streaming(folder, recipe, out)`` builds the model from ``config.json`` on the meta device
(:func:`tensorlm.io.empty_model`: no memory, no initialiser), checks
every shard against it (:class:`tensorlm.shards.Checkpoint`), plans the recipe on the skeleton, then walks
the targets in plan order: it reads one module's weights from the shards onto ``device``, builds its
factorized layer there (the method's ``build``, through :func:`tensorlm.surgery.apply_stage` with that one
entry), moves the layer to the CPU, and lets the dense weight go. The tensors no recipe targets are read
last, once, in the checkpoint's dtype (or ``dtype``). The result is written atomically by
:func:`tensorlm.io.save_compressed`.

Peak memory is about the compressed model plus one target's dense weight and its decomposition's work
arrays (for truncated SVD: the float64 copy and its factors). The result equals what
:func:`tensorlm.surgery.compress` builds from the loaded model, up to round-off.

Not streamed: recipes that need all weights or activations before building (calibrated stages, stage
``budget`` allocation, a plan that reads weights such as a Kronecker ``ratio`` shape choice) are refused in
one line; use :func:`tensorlm.surgery.compress` on a loaded model for them. A ``joint`` method (the Tucker
bank) reads all targets of its stage at once, so its peak includes them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from tensorlm.errors import TensorLMError
from tensorlm.files import refuse_existing
from tensorlm.io import empty_model, save_compressed
from tensorlm.methods import get_method
from tensorlm.models import check_folder, model_kind
from tensorlm.plan import StagePlan
from tensorlm.preflight import check_device
from tensorlm.recipe import Recipe
from tensorlm.shards import Checkpoint, materialise
from tensorlm.surgery import apply_stage, plan_reads_weights, plan_recipe

__all__ = ["StreamResult", "compress_streaming", "streaming_refusal"]


@dataclass
class StreamResult:
    """What :func:`compress_streaming` did.

    Attributes:
        out: the written folder.
        checkpoint_bytes: the input shards' size on disk (bytes).
        module_seconds: ``module name -> seconds`` to read, decompose and place it (wall clock).
        seconds: the whole call, from reading the config to the saved folder (wall clock).
    """

    out: Path
    checkpoint_bytes: int
    module_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def streaming_refusal(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot be streamed (one sentence), or None when it can."""
    if recipe.calibrated:
        return (f"recipe {recipe.name!r} is calibrated; streaming compression does not run calibration yet "
                "(load the model and use tensorlm.compress / tensorlm run)")
    budgeted = [s.name for s in recipe.stages if s.budget is not None]
    if budgeted:
        return (f"recipe {recipe.name!r}: stage(s) {budgeted} allocate a budget, which reads every weight before "
                "building; streaming needs per-module ranks or ratios")
    if plan_reads_weights(recipe):
        return f"recipe {recipe.name!r}: its plan compares factor shapes on the weights; streaming plans on shapes"
    return None


def compress_streaming(folder: str | os.PathLike, recipe: Recipe | str, out: str | os.PathLike, *,
                       device=None, dtype: torch.dtype | None = None, overwrite: bool = False,
                       progress: bool = True, on_module: Callable[[str, float], None] | None = None) -> StreamResult:
    """Compress the safetensors checkpoint in ``folder`` by ``recipe`` one target at a time and save to ``out``.

    Args:
        folder: a Hugging Face folder: ``config.json``, ``model.safetensors.index.json`` with its shards (or
            ``model.safetensors``) and the tokenizer files, which are copied.
        recipe: a :class:`~tensorlm.recipe.Recipe` or a built-in name / YAML path, without calibration or
            budgets (:func:`streaming_refusal`).
        out: the new output folder (written atomically).
        device: where each target is decomposed (``"cpu"``, ``"cuda"``, ``"cuda:N"``); the compressed model
            is assembled on the CPU. Default CPU.
        dtype: floating-point dtype of the compressed model and of each dense weight read (default: as in
            the checkpoint).
        overwrite: replace ``out`` if tensorlm wrote it.
        progress: a progress bar over the targets.
        on_module: called as ``on_module(name, seconds)`` after each target is built (e.g. to log progress).

    Returns:
        A :class:`StreamResult`.

    Raises:
        TensorLMError: a recipe that cannot stream, a device this machine lacks, a dtype that is not
            floating point, an existing ``out``, a folder without ``config.json``, tokenizer or safetensors weights
            (:func:`tensorlm.models.check_folder`), a shard missing from the index, a tensor whose shape
            disagrees with the config, NaN or Inf in any weight, and what the recipe's plan and build raise.
            All are found before ``out`` is touched; nothing half-written is left.
    """
    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    reason = streaming_refusal(recipe)
    if reason:
        raise TensorLMError(reason)
    place = check_device(None if device is None else str(device)) or torch.device("cpu")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TensorLMError(f"dtype {dtype!r} is not a floating-point torch.dtype (torch.bfloat16, torch.float32)")
    folder = Path(folder)
    refuse_existing(out, overwrite, inputs=[folder])
    check_folder(folder)
    checkpoint = Checkpoint(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise TensorLMError(f"{folder / 'config.json'}: {str(err).splitlines()[0]}") from err
    auto = AutoModelForCausalLM if model_kind(config) == "causal-lm" else AutoModel
    model = empty_model(auto.from_config, config)
    checkpoint.check(model)
    plan = plan_recipe(model, recipe)
    seconds: dict[str, float] = {}
    for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True):
        groups = [stage_plan.entries] if get_method(stage.method).joint else [[e] for e in stage_plan.entries]
        for group in tqdm(groups, desc=f"{stage.name} ({stage.method}, streamed)", disable=not progress):
            tick = time.perf_counter()
            for entry in group:
                materialise(model, checkpoint, entry.name, device=place, dtype=dtype, finite=True)
            apply_stage(model, stage, progress=False,
                        stage_plan=StagePlan(stage_plan.name, stage_plan.method, group, stage_plan.shared))
            for entry in group:
                model.get_submodule(entry.name).to("cpu")
                seconds[entry.name] = time.perf_counter() - tick
                if on_module is not None:
                    on_module(entry.name, seconds[entry.name])
    materialise(model, checkpoint, dtype=dtype, finite=True)  # the rest, in the checkpoint's (or the asked) dtype
    tokenizer = AutoTokenizer.from_pretrained(folder)
    notes = [f"compressed by streaming from the safetensors checkpoint {folder} ({checkpoint.nbytes:,} bytes)"]
    save_compressed(model.eval(), out, tokenizer=tokenizer, kind=model_kind(config), recipe=recipe, notes=notes,
                    overwrite=overwrite, inputs=[folder])
    return StreamResult(Path(out), checkpoint.nbytes, seconds, time.perf_counter() - start)
