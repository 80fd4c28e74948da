"""The data-aware Tucker matrix bank (``tucker_bank`` with ``calibration: whitened`` / ``normalise``)."""

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama

from tensorlm import Recipe, compress, count_parameters, load_compressed, save_compressed
from tensorlm.calibrate import collect_second_moments
from tensorlm.decompose.tucker import BankFactors, merge_blocks, split_blocks, tucker_bank
from tensorlm.decompose.weighted_tucker import weighted_relative_errors, weighted_tucker_bank
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import dense_weight
from tensorlm.surgery import plan_recipe

torch.set_num_threads(1)

LLAMA = "re:model\\.layers\\.\\d+\\.(self_attn\\.(q|k|v|o)|mlp\\.(gate|up|down))_proj"
GPT2 = "re:transformer\\.h\\.\\d+\\.(attn\\.(c_attn|c_proj)|mlp\\.(c_fc|c_proj))"


def random_weights(seed=0, shapes=((8, 16), (16, 8), (8, 8), (16, 16))):
    gen = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(*shape, generator=gen, dtype=torch.float64) for i, shape in enumerate(shapes)}


def anisotropic_moment(n, seed, spread=5.0):
    """A random positive-definite ``(n, n)`` with eigenvalues from 1 down to ``10^-spread``, random axes."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.logspace(0, -spread, n, dtype=torch.float64)) @ q.T


def objective(errors, weights, moments):
    """``sum_i ||(W_i - W~_i) G_i^{1/2}||_F^2`` from the relative errors."""
    return sum(errors[n] ** 2 * float(((w @ moments[n]) * w).sum()) for n, w in weights.items())


def test_identity_moments_give_the_plain_hooi_bank():
    weights = random_weights()
    eye = {n: torch.eye(w.shape[1], dtype=torch.float64) for n, w in weights.items()}
    blocks, _ = split_blocks(weights)  # (14, 8, 8)
    plain = tucker_bank(blocks, (5, 6), seed=3).reconstruct()
    for moments in (eye, None):
        fit = weighted_tucker_bank(weights, moments, (5, 6), seed=3)
        approx = fit.factors.reconstruct()
        assert (approx - plain).norm() / plain.norm() < 1e-6
        assert fit.sweeps_run == 0 and abs(fit.rel - fit.rel_plain) < 1e-9


def test_a_planted_bank_is_recovered_under_any_metric():
    gen = torch.Generator().manual_seed(1)
    size, (slices, d) = 8, (3, 4)
    shapes = {"a": (8, 16), "b": (16, 8), "c": (8, 8)}
    n_blocks = sum(o * i // size**2 for o, i in shapes.values())
    true = BankFactors(*(torch.randn(*s, generator=gen, dtype=torch.float64)
                         for s in ((size, d), (size, d), (slices, d, d), (n_blocks, slices))))
    stack, start, weights = true.reconstruct(), 0, {}  # (M, D, D)
    for name, (out, inp) in shapes.items():
        n = out * inp // size**2
        weights[name] = merge_blocks(stack[start:start + n], out, inp)
        start += n
    moments = {n: anisotropic_moment(w.shape[1], seed=i) for i, (n, w) in enumerate(weights.items())}
    fit = weighted_tucker_bank(weights, moments, (slices, d))
    errors = weighted_relative_errors(weights, moments, fit.factors, fit.layout)
    assert max(errors.values()) < 1e-8
    assert fit.rel_whitened < 1e-8  # the whitened start alone recovers it, mapped back exactly


def test_an_anisotropic_metric_is_fitted_better_than_by_the_plain_bank():
    weights = random_weights(seed=2)
    moments = {n: anisotropic_moment(w.shape[1], seed=10 + i) for i, (n, w) in enumerate(weights.items())}
    blocks, layout = split_blocks(weights)
    plain = tucker_bank(blocks, (5, 6))
    fit = weighted_tucker_bank(weights, moments, (5, 6))
    before = objective(weighted_relative_errors(weights, moments, plain, layout), weights, moments)
    after = objective(weighted_relative_errors(weights, moments, fit.factors, layout), weights, moments)
    assert after < 0.7 * before
    assert fit.sweeps_run > 0 and all(a >= b for a, b in zip(fit.history, fit.history[1:], strict=False))
    assert fit.rel <= min(fit.rel_plain, fit.rel_whitened) + 1e-12


def test_normalise_keeps_a_matrix_of_small_norm_in_the_bank():
    weights = random_weights(seed=4, shapes=((16, 32), (32, 16), (16, 32), (32, 16), (16, 16)))
    weights["w4"] = weights["w4"] * 1e-4  # one block, 1e-4 of the others' scale: the k_proj of this bank
    for moments in (None, {n: anisotropic_moment(w.shape[1], seed=20 + i, spread=2.0)
                           for i, (n, w) in enumerate(weights.items())}):
        plain = weighted_tucker_bank(weights, moments, (4, 12))
        kept = weighted_tucker_bank(weights, moments, (4, 12), normalise=True)
        plain_errors = weighted_relative_errors(weights, moments, plain.factors, plain.layout)
        kept_errors = weighted_relative_errors(weights, moments, kept.factors, kept.layout)
        assert plain_errors["w4"] > 0.99  # dropped: its rows of P are ~0
        assert max(kept_errors.values()) < 0.9
        assert kept_errors["w4"] < 0.4


def test_bad_moments_are_one_line():
    weights = random_weights()
    moments = {n: torch.eye(w.shape[1], dtype=torch.float64) for n, w in weights.items()}
    with pytest.raises(TensorLMError, match="no input second moment for 'w3'"):
        weighted_tucker_bank(weights, {k: v for k, v in moments.items() if k != "w3"}, (2, 2))
    with pytest.raises(TensorLMError, match=r"w0: input second moment has shape \(8, 8\), expected \(16, 16\)"):
        weighted_tucker_bank(weights, {**moments, "w0": torch.eye(8)}, (2, 2))
    with pytest.raises(TensorLMError, match="NaN/Inf"):
        weighted_tucker_bank(weights, {**moments, "w1": torch.full((8, 8), float("nan"))}, (2, 2))
    with pytest.raises(TensorLMError, match="tucker_bank calibration must be one of"):
        Recipe.from_dict({"name": "t", "stages": [{"name": "s", "method": "tucker_bank", "targets": ["x"],
                                                   "options": {"ranks": [2, 2], "calibration": "white"}}]})


def stats_for(model, names, vocab):
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (2, 32), generator=gen) for _ in range(2)]
    return collect_second_moments(model, names, batches, progress=False, cache=False)


def relative_output_error(model, small, name, g):
    """``||(W - W~) G^{1/2}||_F / ||W G^{1/2}||_F`` of one module, float64."""
    w = dense_weight(model.get_submodule(name))[0].double()  # (out, in)
    diff = w - small.get_submodule(name).weight_matrix().double()
    return float(((diff @ g) * diff).sum() / ((w @ g) * w).sum()) ** 0.5


def bank_recipe(target, **extra):
    return Recipe.from_dict({"name": "t", "stages": [{"name": "bank", "method": "tucker_bank", "targets": [target],
                                                      "options": {"ranks": [6, 12], "block_size": 32, **extra}}]})


@pytest.mark.parametrize("make, target, vocab", [(make_tiny_llama, LLAMA, 256), (make_tiny_gpt2, GPT2, 100)])
def test_calibrated_bank_round_trip_and_plan(make, target, vocab, tmp_path):
    model = make()
    calibrated = bank_recipe(target, calibration="whitened", normalise=True)
    plan = plan_recipe(model, calibrated)
    names = [e.name for e in plan.entries]
    stats = stats_for(model, names, vocab)
    small = compress(model, calibrated, stats=stats, progress=False)
    plain = compress(model, bank_recipe(target), progress=False)
    assert count_parameters(small)["total"] == plan.params_after == plan_recipe(model, bank_recipe(target)).params_after
    with torch.no_grad():  # what the normalised fit minimises: the sum of squared relative output errors
        total = {label: sum(relative_output_error(model, compressed, n, stats[n].second_moment) ** 2 for n in names)
                 for label, compressed in (("calibrated", small), ("plain", plain))}
    assert total["calibrated"] < 0.95 * total["plain"]
    folder = save_compressed(small, tmp_path / "out", recipe=calibrated)
    loaded = load_compressed(folder).model
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(small(ids).logits, loaded(ids).logits)
    assert count_parameters(loaded) == count_parameters(small)
