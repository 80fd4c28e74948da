"""Fisher-weighted rank allocation: the output Fisher is the mean squared loss gradient, and it moves ranks."""

import copy

import pytest
import torch
from conftest import make_tiny_llama

from tensorlm import Recipe, TensorLMError
from tensorlm.allocate import allocate, in_nats
from tensorlm.calibrate import Calibration, collect_second_moments
from tensorlm.decompose.allocation import RankCurve
from tensorlm.fisher import collect_output_fisher
from tensorlm.surgery import plan_recipe

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


def batches(n=3, length=16):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, 256, (2, length), generator=gen) for _ in range(n)]


def test_output_fisher_is_the_mean_squared_gradient_of_the_summed_token_loss(tmp_path):
    model = make_tiny_llama()
    got = collect_output_fisher(model, NAMES, batches(), progress=False, cache_dir=tmp_path)
    # independently: keep each output, backpropagate the summed loss with weights trainable, read y.grad
    ref = copy.deepcopy(model)
    sums, count = {n: 0.0 for n in NAMES}, 0
    for ids in batches():
        kept = {}
        handles = [ref.get_submodule(n).register_forward_hook(
            lambda m, a, y, n=n, kept=kept: kept.__setitem__(n, y) or y.retain_grad()) for n in NAMES]
        out = ref(input_ids=ids, labels=ids)
        torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1),
                                          reduction="sum").backward()
        for h in handles:
            h.remove()
        for n in NAMES:
            sums[n] = sums[n] + kept[n].grad.double().square().sum((0, 1))
        count += ids.numel()
    for n in NAMES:
        torch.testing.assert_close(got[n], sums[n] / count, rtol=1e-5, atol=0)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # the model is left as it was
    assert collect_output_fisher(model, NAMES, batches(), progress=False, cache_dir=tmp_path).keys() == got.keys()


def test_in_nats_scales_the_whitened_losses_by_half_the_mean_fisher_per_token():
    curve = RankCurve("m", (1, 2, 3), (8.0, 4.0, 0.0), 10)
    calibration = Calibration(torch.eye(2, dtype=torch.float64), tokens=4, output_fisher=torch.tensor([1.0, 3.0]))
    assert in_nats(curve, calibration).losses == (2.0, 1.0, 0.0)  # x 0.5 * 2 / 4
    with pytest.raises(TensorLMError, match="output Fisher"):
        in_nats(curve, Calibration(torch.eye(2), tokens=4))


def fisher_recipe(sensitivity="fisher", calibration="whitened"):
    return Recipe.from_dict({"name": "f", "stages": [{
        "name": "s", "method": "lowrank", "targets": ["re:model\\.layers\\.\\d+\\.mlp\\.down_proj"],
        "options": {"ratio": 0.5, "calibration": calibration},
        "budget": {"ratio": 0.5, "floor": 0.0, "sensitivity": sensitivity}}]})


def test_the_matrix_whose_outputs_matter_more_keeps_the_higher_rank():
    model = make_tiny_llama()
    down = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    model.get_submodule(down[1]).weight.data.copy_(model.get_submodule(down[0]).weight.data)
    stats = collect_second_moments(model, down, batches(), progress=False, cache=False)
    stats[down[1]].second_moment = stats[down[0]].second_moment.clone()  # same W, same G: only f differs
    ranks = {}
    for loud in down:
        for n in down:
            stats[n].output_fisher = torch.full((64,), 100.0 if n == loud else 1.0, dtype=torch.float64)
        plan = allocate(model, plan_recipe(model, fisher_recipe()), fisher_recipe(), stats)
        ranks[loud] = {e.name: e.ranks[0] for e in plan.stages[0].entries}
        assert ranks[loud][loud] > ranks[loud][next(n for n in down if n != loud)]


def test_bad_sensitivity_settings_are_refused_in_one_line():
    with pytest.raises(TensorLMError, match="sensitivity must be fisher"):
        fisher_recipe(sensitivity="kl")
    with pytest.raises(TensorLMError, match="calibration: whitened"):
        fisher_recipe(calibration=None)
