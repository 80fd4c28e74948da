"""Streaming compression: a checkpoint larger than memory compressed one target module (or block) at a time.

``compress_streaming(folder, recipe, out)`` builds the model from ``config.json`` on the meta device
(:func:`tensorlm.io.empty_model`: no memory, no initialiser), checks
every shard against it (:class:`tensorlm.shards.Checkpoint`), plans the recipe on the skeleton, then walks
the targets in plan order: it reads one module's weights from the shards onto ``device``, builds its
factorized layer there (the method's ``build``, through :func:`tensorlm.surgery.apply_stage` with that one
entry), moves the layer to the CPU, and lets the dense weight go. The tensors no recipe targets are read
last, once, in the checkpoint's dtype (or ``dtype``). The result is written atomically by
:func:`tensorlm.io.save_compressed`.

Calibrated stages (a method option ``calibration``) run block by block. The recipe's calibration text is
the in-memory path's (:func:`tensorlm.calibrate.calibration_batches`: the same samples, lengths and seed). The
tensors outside the transformer blocks are read first, and one forward pass per batch, with every block
replaced by the identity, records the hidden states entering the first block and the arguments each block
receives (rotary position embeddings, masks; :func:`tensorlm.heal.blocks.capture_calls`). Then, for each
block in order: its weights are read onto ``device``; it runs on every batch with the calibration hooks of
:mod:`tensorlm.calibrate` on its calibrated targets, which accumulate ``G = sum x x^T`` (float64), and its
DENSE outputs replace the hidden states, as in the in-memory pass over the uncompressed model; its targets
are built with their ``G``; the block goes to the CPU and its dense target weights are let go. Blocks after
the last calibrated one are streamed module by module as above. Token tables with ``calibration:
frequency`` get their token counts without a forward pass. The statistics are not cached: the cache key
hashes every weight and the cache file holds every ``G`` at once, which is what streaming avoids holding.

Peak memory is about the compressed model plus one target's dense weight and its decomposition's work
arrays (for truncated SVD: the float64 copy and its factors); with calibration, one dense block, the
float64 ``G`` of its targets, and the calibration set's hidden states (``samples x length x hidden size`` in
the model's dtype) with the recorded block arguments. The result equals what
:func:`tensorlm.surgery.compress` builds from the loaded model, up to round-off.

Not streamed: recipes that need all weights before building (stage ``budget`` allocation, a plan that reads
weights such as a Kronecker ``ratio`` shape choice) are refused in one line (:func:`streaming_refusal`), and
so is a calibrated linear target outside the transformer blocks (a head's inputs come after the final norm);
use :func:`tensorlm.surgery.compress` on a loaded model for them. A ``joint`` method (the Tucker bank) reads
all targets of its stage at once, so its peak includes them (calibrated, they stay dense after their block
ran until the stage is built).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from tensorlm.calibrate import calibration_batches, embedding_token_counts, moment_hooks
from tensorlm.errors import TensorLMError
from tensorlm.files import refuse_existing
from tensorlm.heal.blocks import BlockCall, capture_calls, find_blocks
from tensorlm.io import empty_model, save_compressed
from tensorlm.methods import get_method
from tensorlm.models import check_folder, model_kind
from tensorlm.plan import Plan, StagePlan
from tensorlm.preflight import check_device
from tensorlm.recipe import Recipe
from tensorlm.shards import Checkpoint, materialise
from tensorlm.surgery import apply_stage, calibrated_targets, plan_reads_weights, plan_recipe

__all__ = ["StreamResult", "compress_streaming", "streaming_refusal"]


@dataclass
class StreamResult:
    """What :func:`compress_streaming` did.

    Attributes:
        out: the written folder.
        checkpoint_bytes: the input shards' size on disk (bytes).
        module_seconds: ``module name -> seconds`` to read, decompose and place it (wall clock; a target built
            in the calibration pass counts its block's read and run too).
        seconds: the whole call, from reading the config to the saved folder (wall clock).
        block_seconds: seconds per block of the calibration pass (read, run on every batch, build its
            targets), in block order; empty without calibration.
    """

    out: Path
    checkpoint_bytes: int
    module_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    block_seconds: list[float] = field(default_factory=list)


def streaming_refusal(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot be streamed (one sentence), or None when it can.

    Calibrated stages stream; a calibrated linear target outside the transformer blocks is refused later, by
    :func:`compress_streaming`, once the model's blocks are known.
    """
    budgeted = [s.name for s in recipe.stages if s.budget is not None]
    if budgeted:
        return (f"recipe {recipe.name!r}: stage(s) {budgeted} allocate a budget, which reads every weight before "
                "building; streaming needs per-module ranks or ratios")
    if plan_reads_weights(recipe):
        return f"recipe {recipe.name!r}: its plan compares factor shapes on the weights; streaming plans on shapes"
    return None


def compress_streaming(folder: str | os.PathLike, recipe: Recipe | str, out: str | os.PathLike, *,
                       device=None, dtype: torch.dtype | None = None, overwrite: bool = False,
                       progress: bool = True, on_module: Callable[[str, float], None] | None = None,
                       data_dir: str | os.PathLike | None = None) -> StreamResult:
    """Compress the safetensors checkpoint in ``folder`` by ``recipe`` one target at a time and save to ``out``.

    Args:
        folder: a Hugging Face folder: ``config.json``, ``model.safetensors.index.json`` with its shards (or
            ``model.safetensors``) and the tokenizer files, which are copied.
        recipe: a :class:`~tensorlm.recipe.Recipe` or a built-in name / YAML path, without budgets
            (:func:`streaming_refusal`); calibrated stages run block by block (module docstring).
        out: the new output folder (written atomically).
        device: where each target is decomposed and each block runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``); the
            compressed model is assembled on the CPU. Default CPU.
        dtype: floating-point dtype of the compressed model and of each dense weight read (default: as in
            the checkpoint); calibration runs the blocks in it.
        overwrite: replace ``out`` if tensorlm wrote it.
        progress: progress bars over the blocks and the targets.
        on_module: called as ``on_module(name, seconds)`` after each target is built (e.g. to log progress).
        data_dir: the data folder whose ``lm_text`` (and, for encoders, STS-B/SICK train pairs) calibrated
            stages read (default ``$TENSORLM_DATA``).

    Returns:
        A :class:`StreamResult`.

    Raises:
        TensorLMError: a recipe that cannot stream, a device this machine lacks, a dtype that is not
            floating point, an existing ``out``, a folder without ``config.json``, tokenizer or safetensors weights
            (:func:`tensorlm.models.check_folder`), a shard missing from the index, a tensor whose shape
            disagrees with the config, NaN or Inf in any weight, a calibrated linear target outside the
            transformer blocks, calibration text that is missing or too short, and what the recipe's plan and
            build raise. All are found before ``out`` is touched; nothing half-written is left.
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
    kind = model_kind(config)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = empty_model(auto.from_config, config)
    checkpoint.check(model)
    plan = plan_recipe(model, recipe)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result = StreamResult(Path(out), checkpoint.nbytes)

    def done(name: str, tick: float) -> None:
        result.module_seconds[name] = time.perf_counter() - tick
        if on_module is not None:
            on_module(name, result.module_seconds[name])

    stats: dict = {}
    if recipe.calibrated:
        batches = _calibration_pass(model, checkpoint, recipe, plan, tokenizer, kind, data_dir, place=place,
                                    dtype=dtype, progress=progress, stats=stats, done=done, result=result)
    for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True):
        entries = [e for e in stage_plan.entries if e.name not in result.module_seconds]
        groups = [entries] if get_method(stage.method).joint else [[e] for e in entries]
        for group in tqdm([g for g in groups if g], desc=f"{stage.name} ({stage.method}, streamed)",
                          disable=not progress):
            tick = time.perf_counter()
            for entry in group:
                materialise(model, checkpoint, entry.name, device=place, dtype=dtype, finite=True)
                model.get_submodule(entry.name).to(place)  # read earlier (on the CPU) when the calibration pass ran
            apply_stage(model, stage, progress=False, stats=stats or None,
                        stage_plan=StagePlan(stage_plan.name, stage_plan.method, group, stage_plan.shared))
            for entry in group:
                model.get_submodule(entry.name).to("cpu")
                stats.pop(entry.name, None)
                done(entry.name, tick)
    materialise(model, checkpoint, dtype=dtype, finite=True)  # the rest, in the checkpoint's (or the asked) dtype
    notes = [f"compressed by streaming from the safetensors checkpoint {folder} ({checkpoint.nbytes:,} bytes)"]
    if recipe.calibrated:
        how = f", block by block over {len(result.block_seconds)} block(s)" if result.block_seconds else ""
        notes.append(f"calibrated on {len(batches)} batch(es) of the recipe's calibration text{how}")
    save_compressed(model.eval(), out, tokenizer=tokenizer, kind=kind, recipe=recipe, notes=notes,
                    overwrite=overwrite, inputs=[folder])
    result.seconds = time.perf_counter() - start
    return result


def _calibration_pass(model: nn.Module, checkpoint: Checkpoint, recipe: Recipe, plan: Plan, tokenizer, kind: str,
                      data_dir, *, place: torch.device, dtype: torch.dtype | None, progress: bool, stats: dict,
                      done: Callable[[str, float], None], result: StreamResult) -> list:
    """Collect the calibration statistics of ``recipe`` block by block and build each block's targets.

    Fills ``stats`` with the token counts of ``frequency`` tables and the ``G`` of calibrated targets that
    are built later (those of ``joint`` stages); every non-joint target inside a block up to the last
    calibrated one is built here (``done(name, tick)`` marks it), the others are left to the caller.

    Returns:
        The calibration batches.

    Raises:
        TensorLMError: a calibrated linear target outside the blocks; what the calibration text, the
            hooks and the builds raise.
    """
    names, tables, tied = calibrated_targets(recipe, plan)
    if tied:
        raise TensorLMError(f"recipe {recipe.name!r}: {tied[0]} asks for calibration 'frequency-whitened', whose tied "
                            "head lies outside the transformer blocks that streaming calibrates; load the model and "
                            "use tensorlm.compress")
    path, blocks = find_blocks(model) if names else ("", nn.ModuleList())
    block_of = {n: _block_index(n, path, len(blocks)) for n in names}
    outside = [n for n, i in block_of.items() if i is None]
    if outside:
        raise TensorLMError(f"recipe {recipe.name!r}: calibrated target(s) {outside[:3]} lie outside the transformer "
                            f"blocks ({path}); streaming collects inputs block by block, so load the model and use "
                            "tensorlm.compress")
    batches, _ = calibration_batches(recipe.calibration, tokenizer, kind, data_dir)
    if tables:
        stats.update(embedding_token_counts(model, tables, batches))
    if not names:
        return batches
    model.eval()  # no dropout, as in the in-memory pass
    materialise(model, checkpoint, dtype=dtype, finite=True, skip=path)  # embeddings, norms, head: on the CPU
    hidden, calls = _block_arguments(model, blocks, batches)
    if place.type != "cpu":
        memo: dict[int, torch.Tensor] = {}
        calls = [[BlockCall(_moved(c.args, place, memo), _moved(c.kwargs, place, memo), c.hidden_in_kwargs)
                  for c in row] for row in calls]
    dense = {n for n, _ in model.named_modules()}
    todo = [(stage, stage_plan, [e for e in stage_plan.entries if e.name in dense
                                 and _block_index(e.name, path, len(blocks)) is not None])
            for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True)
            if not get_method(stage.method).joint]
    last = max(block_of.values())
    for i in tqdm(range(last + 1), desc="calibration (streamed, block by block)", unit="block", disable=not progress):
        tick = time.perf_counter()
        prefix = f"{path}.{i}"
        materialise(model, checkpoint, prefix, device=place, dtype=dtype, finite=True)
        here = [n for n in names if block_of[n] == i]
        stats.update(_run_block(model, blocks[i], here, batches, calls[i], hidden))
        for stage, stage_plan, entries in todo:
            group = [e for e in entries if _block_index(e.name, path, len(blocks)) == i]
            if group:
                apply_stage(model, stage, progress=False, stats=stats,
                            stage_plan=StagePlan(stage_plan.name, stage_plan.method, group, stage_plan.shared))
                for entry in group:
                    stats.pop(entry.name, None)  # its G is no longer needed
                    done(entry.name, tick)
        blocks[i].to("cpu")
        result.block_seconds.append(time.perf_counter() - tick)
    return batches


def _block_arguments(model: nn.Module, blocks: nn.ModuleList, batches: Sequence) -> tuple[list, list]:
    """The hidden states ``(B, L, d)`` entering ``blocks[0]`` on each batch (in the model's dtype, where the
    embedding left them) and ``calls[i][j]``, the arguments of ``blocks[i]`` on batch ``j``
    (:func:`~tensorlm.heal.blocks.capture_calls`), from one forward pass per batch in which every block
    returns its input: the blocks' weights may still be on the meta device."""
    hidden: list[torch.Tensor] = []

    def first(module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = blocks[0].register_forward_pre_hook(first, with_kwargs=True)
    try:
        with _identity_blocks(blocks):
            calls = capture_calls(model, blocks, batches)
    finally:
        handle.remove()
    return hidden, calls


@contextlib.contextmanager
def _identity_blocks(blocks: nn.ModuleList):
    """Every block's ``forward`` returns its hidden-state input unchanged (transformers 5 blocks return a
    tensor, not a tuple) until the context ends; hooks still run."""
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = _identity
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            del block.forward
            if forward is not None:
                block.forward = forward


def _identity(*args, **kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def _run_block(model: nn.Module, block: nn.Module, names: list[str], batches: Sequence, calls: list[BlockCall],
               hidden: list[torch.Tensor]) -> dict:
    """Run the (dense) ``block`` on every batch, replacing ``hidden[j]`` by its output (kept where the input
    was), with the calibration hooks on the modules ``names``; return their statistics (name ->
    :class:`~tensorlm.calibrate.Calibration`), empty when ``names`` is."""
    device = next(block.parameters()).device
    start = time.perf_counter()
    with moment_hooks(model, names) as hooks:
        for j, (batch, call) in enumerate(zip(batches, calls, strict=True)):
            hooks.next_batch(batch)
            hidden[j] = call(block, hidden[j].to(device)).to(hidden[j].device)
    return hooks.result("", time.perf_counter() - start) if names else {}


def _block_index(name: str, path: str, count: int) -> int | None:
    """The index of the block of ``path`` (the block list) that module ``name`` lies in, or None."""
    head, _, rest = name.partition(f"{path}.") if path else ("", "", "")
    index = rest.split(".", 1)[0] if head == "" and rest else ""
    return int(index) if index.isdigit() and int(index) < count else None


def _moved(value, device: torch.device, memo: dict[int, torch.Tensor]):
    """``value`` (a tensor, or tuples, lists and dicts of them) with every tensor on ``device``; a tensor
    shared by several values (the rotary tables, the mask) is moved once (``memo``: ``id -> moved``)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, tuple | list):
        return type(value)(_moved(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device, memo) for k, v in value.items()}
    return value
