"""Model surgery: match recipe targets to modules, plan every target, then build and swap in the layers.

``compress = match targets -> plan (tensorlm.plan) -> build``. Surgery knows a method only through the
registry (:mod:`tensorlm.methods`): its ``accepts``, ``plan``, ``prepare``, ``build`` and ``tied_head``.
The plan of a whole recipe is computed on a skeleton of the model (parameters on the meta device, each
planned layer rebuilt there from its config), so a later stage can target what an earlier one builds
(``transformer.wte.table``) and the totals are exact, with no decomposition run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorlm.allocate import allocate
from tensorlm.calibrate import (
    CalibrationResult,
    calibration_batches,
    collect_second_moments,
    embedding_token_counts,
    head_moment_key,
)
from tensorlm.errors import TensorLMError
from tensorlm.fisher import collect_output_fisher
from tensorlm.layers.base import LAYERS
from tensorlm.layers.scaled import ScaledEmbedding, row_scale
from tensorlm.methods import Method, PlanContext, get_method
from tensorlm.params import group_of, unique_parameters
from tensorlm.plan import Plan, StagePlan
from tensorlm.recipe import Recipe, Stage, Target

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layer|layers|blocks)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The transformer block index in a module path (``transformer.h.3.mlp`` -> 3), or None."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def match_targets(model: nn.Module, stage: Stage) -> list[str]:
    """Module names the stage's targets select, in model order, restricted to what its method accepts.

    Raises:
        TensorLMError: a target matches no module (the closest module names are listed), or an exact
            name is a module the method cannot take.
    """
    accepts = get_method(stage.method).accepts
    modules = dict(model.named_modules())
    chosen: dict[str, None] = {}
    for target in stage.targets:
        hits = _match(target, modules)
        if target.match in modules and hits and not accepts(modules[target.match]):
            raise TensorLMError(f"stage {stage.name!r}: module {target.match!r} is a "
                                f"{type(modules[target.match]).__name__}, which method {stage.method!r} cannot take")
        hits = [n for n in hits if accepts(modules[n])]
        if not hits:
            raise TensorLMError(_no_match_message(stage, target, modules, accepts))
        chosen.update(dict.fromkeys(hits))
    return list(chosen)


def _match(target: Target, modules: dict[str, nn.Module]) -> list[str]:
    if target.match.startswith("re:"):
        pattern = re.compile(target.match[3:])
        names = [n for n in modules if pattern.fullmatch(n)]
    else:
        names = [target.match] if target.match in modules else []
    return [n for n in names if target.layer_ok(layer_index(n))]


def _no_match_message(stage: Stage, target: Target, modules: dict, accepts) -> str:
    candidates = [n for n, m in modules.items() if n and accepts(m)]
    probe = target.match[3:] if target.match.startswith("re:") else target.match
    close = difflib.get_close_matches(probe, candidates, n=5, cutoff=0.3) or candidates[:5]
    layers = "" if target.layers is None else f" with layers={target.layers!r}"
    return (f"stage {stage.name!r}: target {target.match!r}{layers} matches no module that method "
            f"{stage.method!r} accepts; closest names: {', '.join(close)}")


def plan_stage(model: nn.Module, stage: Stage, context: PlanContext | None = None, *,
               real: nn.Module | None = None) -> StagePlan:
    """Plan every module ``stage`` targets in ``model``; nothing is decomposed.

    Args:
        model: the model (or its skeleton) as it stands before this stage.
        stage: the recipe stage.
        context: what the method may know (default: this stage; real weights unless a target is on meta).
        real: the model whose modules hold the real weights where ``model`` is a skeleton: a target the
            skeleton still shares with it is planned on the real module.

    Raises:
        TensorLMError: from target matching or the method's ``plan`` (shapes, ranks, options).
    """
    method = get_method(stage.method)
    modules = {name: _planned_module(model, real, name) for name in match_targets(model, stage)}
    real_weights = not any(p.is_meta for module in modules.values() for p in module.parameters())
    context = context or PlanContext(stage.name, weights=real_weights)
    if method.joint:
        entries, shared = method.plan(modules, stage.options, context)
    else:
        entries, shared = [method.plan(module, name, stage.options, context) for name, module in modules.items()], {}
    options = dataclasses.asdict(stage.options)
    for entry in entries:
        entry.options = options
    return StagePlan(stage.name, stage.method, entries, shared)


def _planned_module(skeleton: nn.Module, real: nn.Module | None, name: str) -> nn.Module:
    """The module of ``real`` under ``name`` unless the skeleton has replaced it or a module above it."""
    if real is None or _replaced_above(skeleton, name):
        return skeleton.get_submodule(name)
    return real.get_submodule(name)


def _replaced_above(skeleton: nn.Module, name: str) -> bool:
    """True when a module on the path to ``name`` (itself included) is a planned layer."""
    parts = name.split(".")
    return any(type(skeleton.get_submodule(".".join(parts[:i]))).__name__ in LAYERS for i in range(1, len(parts) + 1))


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (shapes only, no memory).

    Tensors shared in ``model`` (a tied head) stay shared in the copy.
    """
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _place_skeleton(skeleton: nn.Module, stage: Stage, stage_plan: StagePlan) -> None:
    """Put the uninitialised layers of ``stage_plan`` into ``skeleton`` (meta device) and settle its head."""
    method = get_method(stage.method)
    shared: dict = {}
    with torch.device("meta"):
        for entry in stage_plan.entries:
            old = skeleton.get_submodule(entry.name)
            new = LAYERS[entry.layer].from_tensorlm_config(entry.config, shared)
            shared[entry.name] = new
            skeleton.set_submodule(entry.name, new)
            _settle_head(skeleton, old, new, entry.name, method, stage.options)


def plan_recipe(model: nn.Module, recipe: Recipe | str) -> Plan:
    """The plan of ``recipe`` on ``model``: every target with method, shapes, ranks and parameters, and
    the compressed model's totals; no decomposition and no permutation search runs.

    A ``ratio`` Kronecker target compares the errors of its candidate shapes on the real weights (as
    :func:`~tensorlm.decompose.kronecker.choose_kronecker_shape` does); a target that an earlier stage
    builds is planned from shapes alone.

    Raises:
        TensorLMError: invalid targets, shapes, ranks or options.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    skeleton = meta_skeleton(model)
    stages = []
    for stage in recipe.stages:
        stage_plan = plan_stage(skeleton, stage, real=model)
        _place_skeleton(skeleton, stage, stage_plan)
        stages.append(stage_plan)
    before, _ = _totals(model)
    after, head = _totals(skeleton)
    return Plan(recipe.name, stages, before, after, after - head)


def plan_reads_weights(recipe: Recipe) -> bool:
    """True when some stage's plan depends on weight values (a ``ratio`` Kronecker shape choice), False when
    :func:`plan_recipe` gives the same plan on a meta-device model (``load_model(..., weights=False)``)."""
    for stage in recipe.stages:
        reads = get_method(stage.method).plan_reads_weights
        if reads is not None and reads(stage.options):
            return True
    return False


def _totals(model: nn.Module) -> tuple[int, int]:
    """``(unique parameters, of which in the head group)``; works on meta tensors."""
    params = unique_parameters([("", model)])
    return sum(p.numel() for _, p in params), sum(p.numel() for n, p in params if group_of(n) == "head")


def _settle_head(model: nn.Module, old: nn.Module, new: nn.Module, name: str, method: Method, options) -> None:
    """After replacing embedding ``old`` by ``new``: keep ``old``'s row scale (Gemma's ``embed_scale``: ``new``
    is wrapped in a :class:`~tensorlm.layers.scaled.ScaledEmbedding`), then re-tie an LM head that shared
    its table to the unscaled factored table, or leave it untied."""
    if method.tied_head is None:
        return
    scale = row_scale(old) if isinstance(old, nn.Embedding) else None
    tied_to = name
    if scale is not None:
        model.set_submodule(name, ScaledEmbedding(new, scale))
        tied_to = f"{name}.embedding"
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out else None
    if not isinstance(out, nn.Linear) or not isinstance(old, nn.Embedding) or out.weight is not old.weight:
        return
    if getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = False  # stop transformers from re-tying to a table that is gone
    head = method.tied_head(new, tied_to, options)
    if head is not None:
        model.set_output_embeddings(head)


def apply_stage(model: nn.Module, stage: Stage, *, progress: bool = True, stage_plan: StagePlan | None = None,
                stats: dict | None = None) -> list[str]:
    """Replace, in place, every module ``stage`` targets; return their names.

    Args:
        model: the model, modified in place.
        stage: the recipe stage.
        progress: a progress bar over the targets.
        stage_plan: this stage's plan (from :func:`plan_recipe`, perhaps changed by an allocator);
            default: planned here.
        stats: per-module calibration statistics handed to the method's ``build``, or None.

    Raises:
        TensorLMError: from target matching, planning or the method's ``build``.
    """
    method = get_method(stage.method)
    stage_plan = stage_plan or plan_stage(model, stage)
    entries = stage_plan.entries
    if method.joint:
        built = method.build({e.name: model.get_submodule(e.name) for e in entries}, entries, stats)
        for name, new in built.items():
            model.set_submodule(name, new)
        return [e.name for e in entries]
    for entry in tqdm(entries, desc=f"{stage.name} ({stage.method})", disable=not progress, leave=False):
        old = model.get_submodule(entry.name)
        new = method.build(old, entry, stats)
        model.set_submodule(entry.name, new)
        _settle_head(model, old, new, entry.name, method, stage.options)
    return [e.name for e in entries]


TABLE_CALIBRATIONS = ("frequency", "frequency-whitened")
"""Calibrations of token tables: token counts instead of input second moments; ``frequency-whitened`` also
takes the second moment of the tied head's inputs."""


def calibrated_targets(recipe: Recipe, plan: Plan) -> tuple[list[str], list[str], list[str]]:
    """The targets of the recipe's calibrated stages, in plan order: ``(linear, tables, tied)``, the modules
    whose input second moments are collected, the token tables (``calibration: frequency`` or
    ``frequency-whitened``) that get token counts instead, and those of the tables whose tied head's inputs
    are collected too (``frequency-whitened``)."""
    chosen = [(getattr(stage.options, "calibration", None), e.name)
              for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True) for e in stage_plan.entries]
    return ([name for how, name in chosen if how and how not in TABLE_CALIBRATIONS],
            [name for how, name in chosen if how in TABLE_CALIBRATIONS],
            [name for how, name in chosen if how == "frequency-whitened"])


def tied_head_name(model: nn.Module, table: str) -> str:
    """The name of the ``nn.Linear`` LM head that shares token table ``table``'s weight.

    Raises:
        TensorLMError: the model's output embedding is not an ``nn.Linear`` tied to ``table``.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out else None
    if not isinstance(out, nn.Linear) or out.weight is not getattr(model.get_submodule(table), "weight", None):
        raise TensorLMError(f"{table}: calibration 'frequency-whitened' weights the table by the inputs of the LM "
                            "head tied to it, and this model has no head tied to it; use calibration: frequency")
    return next(name for name, module in model.named_modules() if module is out)


def calibrate(model: nn.Module, recipe: Recipe, plan: Plan, tokenizer, kind: str = "causal-lm",
              data_dir=None, *, progress: bool = True) -> CalibrationResult | None:
    """Second moments of the inputs of every target of the recipe's calibrated stages, on training text.

    One pass of the recipe's calibration text (:func:`~tensorlm.calibrate.calibration_batches`: ``lm_text``
    blocks for causal LMs, training sentences for encoders; never a test split) through the uncompressed
    ``model``, cached on disk (:mod:`tensorlm.calibrate`). Targets of stages with ``calibration: frequency``
    (token tables) get their token counts ``(V,)`` float64 on the same text instead, or on
    ``count_samples`` samples of it when the recipe gives that many
    (:func:`~tensorlm.calibrate.embedding_token_counts`, no forward pass, not cached); ``frequency-whitened``
    tables also get the second moment of their tied head's inputs, under
    :func:`~tensorlm.calibrate.head_moment_key`. None when no stage is calibrated.

    Raises:
        TensorLMError: no data folder, calibration text too short for the asked sample count, a target
            that is not a linear map of ``model`` (or, for ``frequency``, not its input token embedding; for
            ``frequency-whitened``, a table without a tied head), non-finite activations.
    """
    names, tables, tied = calibrated_targets(recipe, plan)
    if not names and not tables:
        return None
    heads = {table: tied_head_name(model, table) for table in tied}
    names += [head for head in dict.fromkeys(heads.values()) if head not in names]
    batches, description = calibration_batches(recipe.calibration, tokenizer, kind, data_dir)
    counted = batches
    if tables and recipe.calibration.count_samples:
        more = dataclasses.replace(recipe.calibration, samples=recipe.calibration.count_samples)
        counted, _ = calibration_batches(more, tokenizer, kind, data_dir)
    counts = embedding_token_counts(model, tables, counted) if tables else None
    if not names:
        return counts
    result = collect_second_moments(model, names, batches, progress, description=description)
    for table, head in heads.items():
        result[head_moment_key(table)] = result[head]
    sensitive = [e.name for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True)
                 if stage.budget is not None and stage.budget.sensitivity == "fisher" for e in stage_plan.entries]
    if sensitive:
        if kind != "causal-lm":
            raise TensorLMError(f"recipe {recipe.name!r}: budget sensitivity fisher needs a causal LM's next-token "
                                f"loss; this model is an {kind}")
        for name, fisher in collect_output_fisher(model, sensitive, batches, progress).items():
            result[name].output_fisher = fisher
    result.update(counts or {})  # after the cache write: the cached file holds the G matrices only
    return result


def compress(model: nn.Module, recipe: Recipe | str, *, progress: bool = True, inplace: bool = False,
             after_stage=None, plan: Plan | None = None, stats: dict | None = None, tokenizer=None,
             kind: str = "causal-lm", data_dir=None) -> nn.Module:
    """Compress ``model`` by ``recipe``: plan every stage, calibrate and allocate if asked, then build.

    ``match -> plan -> calibrate -> allocate -> build``: a recipe whose stages ask for ``calibration``
    gets one calibration pass on the uncompressed model (:func:`calibrate`, needs ``tokenizer`` and the
    data folder) unless ``stats`` are given; a stage with a ``budget`` has its ranks allocated
    (:func:`tensorlm.allocate.allocate`) before anything is built.

    Args:
        model: a Hugging Face model (or any ``nn.Module``); left untouched unless ``inplace``.
        recipe: a :class:`~tensorlm.recipe.Recipe` or a built-in name / YAML path.
        progress: show a progress bar per stage.
        inplace: modify ``model`` itself instead of a deep copy.
        after_stage: ``callable(model, stage, replaced_names)`` run after each stage (the
            healing and distillation of iterative compression). Without it, a stage's ``heal:`` and
            ``distill:`` blocks are recorded in the recipe and skipped with a message.
        plan: the recipe's plan on this model (from :func:`tensorlm.plan`); default: planned (and
            allocated) here. Permutations found by a prepare step travel in it.
        stats: per-module calibration statistics handed to every ``build``; default: computed here when
            a stage asks for calibration.
        tokenizer, kind, data_dir: the model's tokenizer, ``causal-lm`` or ``encoder``, and the data folder
            (``lm_text``; default ``$TENSORLM_DATA``), for the calibration pass.

    Returns:
        The compressed model (eval mode unless it was training).

    Raises:
        TensorLMError: invalid targets, shapes or options, a plan of another recipe, a calibrated recipe
            without a tokenizer or statistics, an impossible budget.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if plan is None:
        plan = plan_recipe(model, recipe)
        if stats is None and recipe.calibrated:
            if tokenizer is None:
                raise TensorLMError(f"recipe {recipe.name!r} is calibrated: pass tokenizer= (and data_dir=) to "
                                    "tensorlm.compress, or use tensorlm run")
            stats = calibrate(model, recipe, plan, tokenizer, kind, data_dir, progress=progress)
        plan = allocate(model, plan, recipe, stats)
    if [s.name for s in plan.stages] != [s.name for s in recipe.stages]:
        raise TensorLMError(f"the plan's stages {[s.name for s in plan.stages]} are not the recipe's "
                            f"{[s.name for s in recipe.stages]}")
    out = model if inplace else copy.deepcopy(model)
    for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True):
        replaced = apply_stage(out, stage, progress=progress, stage_plan=stage_plan, stats=stats)
        if after_stage is not None:
            after_stage(out, stage, replaced)
        elif (stage.distill is not None or stage.heal is not None) and progress:
            print(f"stage {stage.name!r}: heal/distill blocks recorded but not run here (use tensorlm run)")
    return out


def decompress(model: nn.Module) -> nn.Module:
    """A dense copy of ``model``: every factorized layer replaced by its ``to_dense()`` module.

    Permutations are undone, tied heads become untied dense heads holding a copy of the table, and
    nested factorizations are expanded from the outside (the outer ``to_dense()`` forms the whole
    table). The input model is left untouched.
    """
    out = copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if type(m).__name__ in LAYERS]
    for name in [n for n in names if not any(n.startswith(p + ".") for p in names)]:
        out.set_submodule(name, out.get_submodule(name).to_dense())
    return out
