"""Budget-driven ranks: a stage with ``budget:`` gets its ranks chosen across all its targets at once.

Between planning and building (``match -> plan -> calibrate -> allocate -> build``): every entry of such a
stage offers its method's rank curve (the loss of each rank it may take, whitened when the stage is
calibrated), :func:`tensorlm.decompose.allocation.allocate_ranks` spends the budget where the loss falls
most per parameter (SVD-LLM V2's idea, arXiv 2503.12340, Sec. 3.1), and the entries are re-planned at
the chosen ranks. A matrix whose best rank would cost as much as the matrix itself is kept dense (dropped
from the stage's entries and listed in ``StagePlan.kept_dense``). The plan's totals are updated, so the
printed plan is what the build will produce.
"""

from __future__ import annotations

from torch import nn

from tensorlm.decompose.allocation import RankCurve, allocate_ranks
from tensorlm.errors import TensorLMError
from tensorlm.methods import METHODS, get_method
from tensorlm.plan import Plan, StagePlan
from tensorlm.recipe import Recipe, Stage


def allocate(model: nn.Module, plan: Plan, recipe: Recipe, stats=None) -> Plan:
    """``plan`` with the ranks of every budgeted stage chosen by the greedy allocation.

    Args:
        model: the uncompressed model (the budgeted stages' targets are read from it).
        plan: the recipe's plan on ``model`` (:func:`tensorlm.plan`); changed in place and returned.
        recipe: the recipe (its stages' ``budget`` blocks).
        stats: calibration statistics of the calibrated stages (:mod:`tensorlm.calibrate`), or None.

    Raises:
        TensorLMError: a budgeted stage whose method has no rank curve, whose targets an earlier stage
            replaced, or whose budget is below every target at its smallest rank (the minimum is given).
    """
    for stage, stage_plan in zip(recipe.stages, plan.stages, strict=True):
        if stage.budget is not None:
            change = _allocate_stage(model, stage, stage_plan, stats)
            plan.params_after += change
            plan.params_after_without_head += change
    return plan


def _allocate_stage(model: nn.Module, stage: Stage, stage_plan: StagePlan, stats) -> int:
    """Re-plan the entries of one budgeted stage; returns the change in the model's parameter count."""
    method = get_method(stage.method)
    if method.rank_curve is None or method.rerank is None:
        able = sorted(n for n, m in METHODS.items() if m.rank_curve is not None)
        raise TensorLMError(f"stage {stage.name!r}: method {stage.method!r} cannot allocate ranks to a budget; "
                            f"methods that can: {', '.join(able)}")
    entries = stage_plan.entries
    modules = {e.name: model.get_submodule(e.name) for e in entries}
    if any(p.is_meta for m in modules.values() for p in m.parameters()):
        raise TensorLMError(f"stage {stage.name!r}: a budget needs the real weights of its targets; an earlier "
                            "stage replaces some of them")
    budget = stage.budget
    normalise = budget.normalise and budget.sensitivity is None
    curves = [method.rank_curve(modules[e.name], e, stats, normalise, budget.floor) for e in entries]
    if budget.sensitivity == "fisher":
        curves = [in_nats(curve, (stats or {}).get(e.name)) for curve, e in zip(curves, entries, strict=True)]
    fixed = sum(e.params_after - e.ranks[0] * c.cost_per_rank for e, c in zip(entries, curves, strict=True))
    before = sum(e.params_before for e in entries)
    limit = budget.limit(before)
    chosen = allocate_ranks(curves, limit - fixed).ranks
    new = {e.name: method.rerank(e, chosen[e.name]) for e in entries}
    kept = [e for e in entries if new[e.name] is None]  # the allocation keeps them dense: not replaced
    change = sum(n.params_after for n in new.values() if n is not None) + sum(e.params_before for e in kept) \
        - sum(e.params_after for e in entries)
    stage_plan.entries[:] = [n for n in new.values() if n is not None]
    stage_plan.kept_dense = [e.name for e in kept]
    return change


def in_nats(curve: RankCurve, calibration) -> RankCurve:
    """``curve``'s whitened losses ``sum_t ||dW x_t||^2`` turned into the estimated increase of the mean
    next-token loss, ``f / 2 * loss / tokens`` (nats per token; :mod:`tensorlm.fisher`), ``f`` the mean
    squared loss gradient at the module's outputs.

    Raises:
        TensorLMError: no output Fisher was collected for this module.
    """
    fisher = getattr(calibration, "output_fisher", None)
    if fisher is None:
        raise TensorLMError(f"{curve.name}: budget sensitivity fisher needs the output Fisher of this module; "
                            "it is collected by the calibration pass of tensorlm.compress / tensorlm run")
    scale = 0.5 * fisher.mean().item() / max(calibration.tokens, 1)
    return RankCurve(curve.name, curve.ranks, tuple(x * scale for x in curve.losses), curve.cost_per_rank)
