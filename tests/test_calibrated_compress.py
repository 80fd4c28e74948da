"""Calibrated recipes end to end: whitened methods, budget allocation, the plan's totals, bad input."""

import pytest
import torch
from conftest import make_tiny_llama

from tensorlm import TensorLMError, compress, count_parameters
from tensorlm.allocate import allocate
from tensorlm.calibrate import collect_second_moments
from tensorlm.decompose.weighted_kronecker import start_errors
from tensorlm.decompose.whitening import psd_sqrt
from tensorlm.layers.base import dense_weight
from tensorlm.methods import get_method
from tensorlm.recipe import Recipe
from tensorlm.surgery import plan_recipe

MLP = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj"
ALL = "re:model\\.layers\\.\\d+\\.(self_attn\\.(q|k|v|o)|mlp\\.(gate|up|down))_proj"


def recipe(method: str, options: dict, budget: dict | None = None, targets=(MLP,)) -> Recipe:
    stage = {"name": "s", "method": method, "targets": list(targets), "options": options}
    if budget is not None:
        stage["budget"] = budget
    return Recipe.from_dict({"name": "t", "stages": [stage]})


def stats_for(model, names):
    """Second moments on 4 x 32 random token ids (the inputs the layers really see in this model)."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(2)]
    return collect_second_moments(model, names, batches, progress=False, cache=False)


def weighted(model, small, name, g) -> float:
    """``||(W - W~) G^{1/2}||_F`` of one module."""
    w, _ = dense_weight(model.get_submodule(name))
    approx, _ = dense_weight(small.get_submodule(name).to_dense())
    return float(((w - approx).double() @ psd_sqrt(g)).norm())


@pytest.mark.parametrize("method, options", [("lowrank", {"rank": 8}),
                                             ("kronecker", {"a_shape": [64, 32], "b_shape": [2, 2], "rank": 2})])
def test_whitened_beats_plain_in_the_weighted_norm_on_every_module(method, options):
    model = make_tiny_llama()
    names = [e.name for e in plan_recipe(model, recipe("lowrank", {"rank": 1})).entries
             if e.dense_shape == [128, 64]]  # gate_proj, up_proj
    plain = recipe(method, options, targets=names)
    calibrated = recipe(method, {**options, "calibration": "whitened"}, targets=names)
    stats = stats_for(model, names)
    a = compress(model, plain, progress=False)
    b = compress(model, calibrated, progress=False, stats=stats)
    for name in names:
        g = stats[name].second_moment
        assert weighted(model, b, name, g) < weighted(model, a, name, g)


def test_whitened_tt_linear_is_never_worse_than_plain_in_the_weighted_norm():
    """Its ``G`` is factored over the input modes; on a module where that loses, the plain fit is kept."""
    model = make_tiny_llama()
    names = [e.name for e in plan_recipe(model, recipe("lowrank", {"rank": 1})).entries
             if e.dense_shape == [128, 64]]  # gate_proj, up_proj
    options = {"out_shape": [8, 4, 4], "in_shape": [4, 4, 4], "ranks": 4}
    stats = stats_for(model, names)
    a = compress(model, recipe("tt_linear", options, targets=names), progress=False)
    b = compress(model, recipe("tt_linear", {**options, "calibration": "whitened"}, targets=names), progress=False,
                 stats=stats)
    for name in names:
        g = stats[name].second_moment
        assert weighted(model, b, name, g) <= weighted(model, a, name, g) * (1 + 1e-9)


def test_budget_allocation_meets_the_budget_and_the_plan_is_the_model():
    model = make_tiny_llama()
    r = recipe("lowrank", {"ratio": 0.5, "calibration": "whitened"}, budget={"ratio": 0.4}, targets=(ALL,))
    plan = plan_recipe(model, r)
    stats = stats_for(model, [e.name for e in plan.entries])
    before = sum(e.params_before for e in plan.entries)
    plan = allocate(model, plan, r, stats)
    assert sum(e.params_after for e in plan.entries) <= 0.4 * before
    assert len({e.ranks[0] for e in plan.entries}) > 1  # the ranks differ across matrices
    small = compress(model, r, plan=plan, stats=stats, progress=False)
    assert count_parameters(small)["total"] == plan.params_after  # the printed total is the model's
    assert all(small.get_submodule(e.name).rank == e.ranks[0] for e in plan.entries)
    # the same through compress alone, with the statistics given
    again = compress(model, r, stats=stats, progress=False)
    assert count_parameters(again)["total"] == plan.params_after


def test_more_budget_never_raises_the_total_whitened_loss():
    model = make_tiny_llama()
    losses = []
    for ratio in (0.2, 0.3, 0.5):
        r = recipe("lowrank", {"ratio": 0.5, "calibration": "whitened"}, budget={"ratio": ratio})
        plan = plan_recipe(model, r)
        stats = stats_for(model, [e.name for e in plan.entries])
        small = compress(model, r, stats=stats, progress=False)
        losses.append(sum(weighted(model, small, e.name, stats[e.name].second_moment) ** 2
                          / float((dense_weight(model.get_submodule(e.name))[0].double()
                                   @ psd_sqrt(stats[e.name].second_moment)).norm()) ** 2 for e in plan.entries))
    assert losses[0] >= losses[1] >= losses[2]


KRON_SHAPES = {"128x64": {"a_shape": [16, 8], "b_shape": [8, 8], "rank": 4},
               "64x128": {"a_shape": [8, 16], "b_shape": [8, 8], "rank": 4}}


def test_kronecker_budget_meets_it_and_each_plain_curve_point_is_the_van_loan_pitsianis_error():
    model = make_tiny_llama()
    r = recipe("kronecker", {"shapes": KRON_SHAPES}, budget={"ratio": 0.3, "normalise": False})
    plan = plan_recipe(model, r)
    before = sum(e.params_before for e in plan.entries)
    plan = allocate(model, plan, r)
    assert sum(e.params_after for e in plan.entries) <= 0.3 * before
    assert len({e.ranks[0] for e in plan.entries}) > 1  # the terms differ across matrices
    small = compress(model, r, plan=plan, progress=False)
    assert count_parameters(small)["total"] == plan.params_after
    unit = 16 * 8 + 8 * 8  # m1 n1 + m2 n2
    for e in plan.entries:
        assert e.params_after == e.ranks[0] * unit and small.get_submodule(e.name).a.shape[0] == e.ranks[0]
        w, _ = dense_weight(model.get_submodule(e.name))
        approx, _ = dense_weight(small.get_submodule(e.name).to_dense())
        curve = get_method("kronecker").rank_curve(model.get_submodule(e.name), e, None, normalise=False)
        loss = curve.losses[curve.ranks.index(e.ranks[0])]
        assert float((w - approx).double().square().sum()) == pytest.approx(loss, rel=1e-6)


def test_whitened_kronecker_budget_has_a_lower_weighted_loss_than_the_plain_one():
    model = make_tiny_llama()
    names = [e.name for e in plan_recipe(model, recipe("lowrank", {"rank": 1})).entries]
    stats = stats_for(model, names)
    total = {}
    for calibration in (None, "whitened"):
        r = recipe("kronecker", {"shapes": KRON_SHAPES, "calibration": calibration}, budget={"ratio": 0.3})
        plan = allocate(model, plan_recipe(model, r), r, stats)
        assert sum(e.params_after for e in plan.entries) <= 0.3 * sum(e.params_before for e in plan.entries)
        small = compress(model, r, plan=plan, stats=stats, progress=False)
        assert count_parameters(small)["total"] == plan.params_after
        total[calibration] = sum(weighted(model, small, n, stats[n].second_moment) ** 2 for n in names)
        if calibration:  # each built fit is at most the start the curve measured at its rank
            for e in plan.entries:
                w, _ = dense_weight(model.get_submodule(e.name))
                g = stats[e.name].second_moment
                start = start_errors(w, g, e.config["a_shape"], e.config["b_shape"], [e.ranks[0]])[0]
                assert weighted(model, small, e.name, g) ** 2 <= start * (1 + 1e-9)
    assert total["whitened"] < total[None]


def test_bad_calibrated_input_is_one_line():
    model = make_tiny_llama()
    with pytest.raises(TensorLMError, match="is calibrated: pass tokenizer="):
        compress(model, recipe("lowrank", {"rank": 4, "calibration": "whitened"}), progress=False)
    with pytest.raises(TensorLMError, match="calibration must be one of"):
        recipe("lowrank", {"rank": 4, "calibration": "whitend"})
    with pytest.raises(TensorLMError, match="cannot allocate ranks to a budget; methods that can: kronecker, lowrank"):
        compress(model, recipe("tt_linear", {"ranks": 2}, budget={"ratio": 0.5}), progress=False)
    with pytest.raises(TensorLMError, match="below the minimum"):
        compress(model, recipe("lowrank", {"rank": 4}, budget={"params": 100}), progress=False)
    with pytest.raises(TensorLMError, match="budget needs exactly one of ratio or params"):
        recipe("lowrank", {"rank": 4}, budget={})


def test_a_generous_budget_keeps_matrices_dense_rather_than_at_a_lossy_break_even_rank():
    model = make_tiny_llama()
    r = recipe("lowrank", {"ratio": 0.5, "calibration": "whitened"}, budget={"ratio": 0.95}, targets=(ALL,))
    plan = plan_recipe(model, r)
    stats = stats_for(model, [e.name for e in plan.entries])
    plan = allocate(model, plan, r, stats)
    kept = plan.stages[0].kept_dense
    assert kept and len(kept) + len(plan.entries) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    small = compress(model, r, plan=plan, stats=stats, progress=False)
    assert count_parameters(small)["total"] == plan.params_after <= count_parameters(model)["total"]
    for name in kept:  # untouched: the same dense weights
        assert torch.equal(small.get_submodule(name).weight, model.get_submodule(name).weight)
