"""Data-aware embeddings (``calibration: frequency``): row-weighted Kronecker tables and ragged TT-ranks.

Objective: ``sum_t f_t ||E_t - E~_t||^2`` with ``f`` the smoothed token frequency. Checked on synthetic
tables where the answer is known: uniform ``f`` is the plain form, a planted Kronecker table is exact under
any positive weights, Zipf weights lower the weighted error, the ragged budget is exact arithmetic, and the
compressed models plan, save and reload exactly.
"""

import math

import pytest
import torch
from conftest import DATA, make_tiny_gpt2, make_tiny_llama
from torch import nn
from transformers import GPT2TokenizerFast

from tensorlm import Recipe, TensorLMError, compress, count_parameters, load_compressed, plan, save_compressed
from tensorlm.calibrate import Calibration, calibration_batches, frequency_weights, token_counts
from tensorlm.decompose.kronecker import kronecker_sum, nearest_kronecker
from tensorlm.decompose.tt import (
    allocate_row_classes,
    max_ranks,
    rank_ladder,
    tt_parameter_count,
    tt_row_errors,
    tt_rows_to_full,
    tt_svd_rows,
)
from tensorlm.decompose.weighted_kronecker import row_weighted_error, row_weighted_kronecker
from tensorlm.layers.base import TiedHead
from tensorlm.layers.kronecker import KroneckerEmbedding
from tensorlm.layers.tt import RaggedTTEmbedding, TTEmbedding
from tensorlm.layers.tt_matrix import TTMatrixEmbedding
from tensorlm.surgery import calibrate, plan_recipe


def zipf(n: int, s: float = 1.2) -> torch.Tensor:
    """Zipf weights ``1 / t^s`` of ranks ``t = 1..n``, normalised, shuffled so frequency is not row order."""
    f = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    return (f / f.sum())[torch.randperm(n, generator=torch.Generator().manual_seed(3))]


def table(v: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def embedding(weight: torch.Tensor) -> nn.Embedding:
    emb = nn.Embedding(*weight.shape, dtype=weight.dtype)
    with torch.no_grad():
        emb.weight.copy_(weight)
    return emb


def weighted_sq(w: torch.Tensor, approx: torch.Tensor, f: torch.Tensor) -> float:
    return float((f * (w.double() - approx.detach().double()).square().sum(1)).sum())


# --- row-weighted Kronecker ---------------------------------------------------------------------------

@pytest.mark.parametrize("a_shape, b_shape, rank", [((40, 6), (1, 4), 1), ((4, 3), (3, 4), 2)])
def test_uniform_frequency_is_plain_van_loan_pitsianis(a_shape, b_shape, rank):
    w = table(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1])
    plain = nearest_kronecker(w, a_shape, b_shape, rank)
    fit = row_weighted_kronecker(w, torch.full((w.shape[0],), 0.37, dtype=torch.float64), a_shape, b_shape, rank)
    ref = kronecker_sum(plain.a, plain.b)
    assert (kronecker_sum(fit.a, fit.b) - ref).norm() / ref.norm() < 1e-6
    assert abs(fit.rel_error - plain.rel_error) < 1e-6


@pytest.mark.parametrize("a_shape, b_shape, rank", [((200, 8), (1, 4), 1), ((8, 4), (8, 8), 2)])
def test_frequency_fit_beats_plain_in_the_weighted_norm(a_shape, b_shape, rank):
    w = table(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1], seed=1)
    f = zipf(w.shape[0])
    plain = nearest_kronecker(w, a_shape, b_shape, rank)
    fit = row_weighted_kronecker(w, f, a_shape, b_shape, rank, sweeps=10)
    ours = row_weighted_error(w, kronecker_sum(fit.a, fit.b), f)
    theirs = row_weighted_error(w, kronecker_sum(plain.a, plain.b), f)
    assert ours < 0.99 * theirs
    assert abs(ours - fit.rel_error) < 1e-9 and fit.rel_error_plain == pytest.approx(theirs)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(fit.history, fit.history[1:], strict=False))


def test_the_embedding_case_is_exact_without_als():
    """``diag(f) = diag(f) (x) 1``: the whitened start is already optimal; b is the top eigenvector of
    ``sum_t f_t E_t^T E_t`` (``E_t`` the row as a ``(d/f, f)`` matrix)."""
    w, f = table(300, 12, seed=2), zipf(300)
    fit = row_weighted_kronecker(w, f, (300, 3), (1, 4), 1, sweeps=0)
    rows = w.reshape(300, 3, 4)
    m = torch.einsum("t,tij,tik->jk", f, rows, rows)  # (4, 4)
    top = torch.linalg.eigh(m).eigenvalues[-1]
    best = float((f * w.square().sum(1)).sum() - top)  # the optimum of the weighted rank-1 problem
    assert weighted_sq(w, kronecker_sum(fit.a, fit.b), f) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("a_shape, b_shape, rank", [((50, 6), (1, 4), 1), ((6, 4), (5, 3), 2)])
def test_a_planted_kronecker_table_is_recovered_under_any_positive_weights(a_shape, b_shape, rank):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(rank, *a_shape, generator=gen, dtype=torch.float64)
    b = torch.randn(rank, *b_shape, generator=gen, dtype=torch.float64)
    w = kronecker_sum(a, b)
    f = torch.rand(w.shape[0], generator=gen, dtype=torch.float64) * 1e3 + 1e-3
    fit = row_weighted_kronecker(w, f, a_shape, b_shape, rank)
    assert (kronecker_sum(fit.a, fit.b) - w).norm() / w.norm() < 1e-9


def test_bad_row_weights_get_one_clear_line():
    w = table(8, 4)
    for bad in (torch.ones(7), torch.zeros(8), torch.full((8,), float("nan"))):
        with pytest.raises(TensorLMError, match=r"row weights .* must be \(8,\), finite and > 0"):
            row_weighted_kronecker(w, bad, (8, 2), (1, 2))
    with pytest.raises(TensorLMError, match="no calibration statistics"):
        frequency_weights(None, "model.embed_tokens", 8)
    with pytest.raises(TensorLMError, match=r"token counts \(7,\) must be \(8,\)"):
        frequency_weights({"e": torch.ones(7)}, "e", 8)


def test_frequency_weights_are_add_one_smoothed():
    f = frequency_weights({"e": torch.tensor([3.0, 0.0, 1.0])}, "e", 3)
    assert torch.allclose(f, torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64) / 7)


# --- ragged TT-ranks --------------------------------------------------------------------------------

SHAPE = [2, 3, 4]  # d = 24, max ranks [2, 4]; ladder [1,1], [2,2], [2,3], [2,4]


def test_ragged_budget_is_exact_arithmetic_and_never_worse_than_uniform():
    w, f = table(120, 24, seed=5), zipf(120)
    stored = 120 * tt_parameter_count(SHAPE, [2, 2])
    layer = RaggedTTEmbedding.from_dense(embedding(w), SHAPE, stored, f, reference=[2, 2])
    costs = [tt_parameter_count(SHAPE, c) for c in rank_ladder(SHAPE)]
    used = sum(costs[c] for c in layer.row_class.tolist())
    assert layer.values.numel() == stored == sum(p.numel() for p in layer.parameters())
    steps = [b - a for a, b in zip(costs, costs[1:], strict=False)]
    assert layer.used == used <= stored and stored - used < min(steps)  # less than one rank step left
    assert layer.values[used:].abs().sum() == 0  # the slack is zeros
    uniform = TTEmbedding.from_dense(embedding(w), SHAPE, ranks=2)
    ours, theirs = weighted_sq(w, layer.weight_rows(), f), weighted_sq(w, uniform.weight_rows(), f)
    assert ours < 0.8 * theirs
    assert len(set(layer.row_class.tolist())) > 1


def test_uniform_weights_with_one_class_is_plain_tensorgpt():
    w = table(60, 24, seed=6)
    stored = 60 * tt_parameter_count(SHAPE, [2, 3])
    ragged = RaggedTTEmbedding.from_dense(embedding(w), SHAPE, stored, torch.ones(60), classes=[[2, 3]])
    plain = TTEmbedding.from_dense(embedding(w), SHAPE, ranks=[2, 3])
    ref = plain.weight_rows()
    assert (ragged.weight_rows() - ref).norm() / ref.norm() < 1e-6
    # over the whole ladder, uniform weights spread the ranks by error alone: never worse than uniform
    spread = RaggedTTEmbedding.from_dense(embedding(w), SHAPE, stored, torch.ones(60), reference=[2, 3])
    assert weighted_sq(w, spread.weight_rows(), torch.ones(60)) <= weighted_sq(w, ref, torch.ones(60)) + 1e-9


def test_frequent_rows_keep_at_least_the_ranks_of_rare_rows_and_full_rank_is_exact():
    row = table(1, 24, seed=7)
    w = row.repeat(80, 1)  # identical rows: only f differs
    f = zipf(80, s=2.0)
    layer = RaggedTTEmbedding.from_dense(embedding(w), SHAPE, 80 * tt_parameter_count(SHAPE, [2, 2]), f)
    total = layer.row_ranks().sum(1)  # (80,)
    order = torch.argsort(f, descending=True)
    assert (total[order][1:] <= total[order][:-1]).all()  # ranks fall with frequency
    top = order[0]
    assert layer.row_ranks()[top].tolist() == max_ranks(SHAPE)
    assert (layer.weight_rows(int(top), int(top) + 1) - w[top]).norm() / w[top].norm() < 1e-12


def test_lookup_is_the_table_row_and_the_padding_row_gets_no_gradient():
    emb = nn.Embedding(30, 24, padding_idx=2)
    layer = RaggedTTEmbedding.from_dense(emb, SHAPE, 30 * 24, zipf(30))
    ids = torch.tensor([[2, 5, 7, 2], [1, 2, 3, 29]])
    out = layer(ids)  # (2, 4, 24)
    assert torch.equal(out, layer.weight_rows()[ids])
    out.sum().backward()
    c, row = int(layer.row_class[2]), int(layer.slot[2])
    start = sum(n * k for n, k in zip(layer.sizes[:c], layer.costs[:c], strict=True)) + row * layer.costs[c]
    assert layer.values.grad[start:start + layer.costs[c]].abs().sum() == 0
    assert layer.values.grad.abs().sum() > 0
    with pytest.raises(IndexError, match="valid \\[0, 30\\)"):
        layer(torch.tensor([30]))


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 4), (2, 2, 3, 2)])
def test_row_errors_are_the_reconstruction_errors_of_tt_svd_at_every_class(shape):
    x = table(50, math.prod(shape)) * torch.rand(50, 1, generator=torch.Generator().manual_seed(1))
    classes = rank_ladder(shape) + [[1] * (len(shape) - 1)]  # a repeated class shares every step
    errors = tt_row_errors(x, shape, classes, chunk=16)  # (50, C), over 4 chunks
    truth = torch.stack([(x - tt_rows_to_full(tt_svd_rows(x, shape, ranks=c)[0])).square().sum(1)
                         for c in classes], dim=1)  # (50, C)
    torch.testing.assert_close(errors, truth, rtol=1e-9, atol=1e-12)
    assert (errors[:, -2] < 1e-20).all() and (errors[:, 0] > 0).all()  # the ladder's top is TT-SVD exact


def test_allocation_refuses_a_budget_below_the_cheapest_class():
    errors = tt_row_errors(table(10, 24), SHAPE, rank_ladder(SHAPE))
    with pytest.raises(TensorLMError, match="budget 89 is below 10 rows at the cheapest class"):
        allocate_row_classes(errors, [9, 24, 34, 44], 89)


def test_the_class_map_reloads_and_a_corrupt_one_is_refused():
    layer = RaggedTTEmbedding.from_dense(embedding(table(20, 24, dtype=torch.float32)), SHAPE, 20 * 24, zipf(20))
    fresh = RaggedTTEmbedding.from_tensorlm_config(layer.tensorlm_config(), {})
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight_rows(), layer.weight_rows()) and fresh.sizes == layer.sizes
    for bad in (torch.full((20,), 4), torch.full((20,), 3), torch.zeros(19, dtype=torch.int64)):
        state = {**layer.state_dict(), "row_class": bad}  # class 4 does not exist; 20 rows at class 3 do not fit
        with pytest.raises(TensorLMError, match="not a valid rank-class map of 20 rows over 4 classes"):
            fresh.load_state_dict(state)


# --- whole models: plan, tied head, save and load -----------------------------------------------------

def recipe(method: str, target: str, options: dict) -> Recipe:
    return Recipe.from_dict({"name": "freq", "stages": [
        {"name": "embedding", "method": method, "targets": [target], "options": options}]})


def counts_for(model, name: str, n_ids: int = 4000) -> dict:
    """Zipf-distributed token ids as calibration counts of table ``name``."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.multinomial(zipf(vocab).float(), n_ids, replacement=True, generator=torch.Generator().manual_seed(8))
    return {name: token_counts([ids[None]], vocab).double()}


CASES = [
    (make_tiny_llama, "model.embed_tokens", "tt_embedding", {"shape": [4, 4, 4], "ranks": 2,
                                                            "calibration": "frequency"}),
    (make_tiny_gpt2, "transformer.wte", "tt_embedding", {"shape": [2, 4, 4], "ranks": 2, "calibration": "frequency"}),
    (make_tiny_llama, "model.embed_tokens", "kronecker_embedding", {"factor": 4, "calibration": "frequency"}),
    (make_tiny_gpt2, "transformer.wte", "kronecker_embedding", {"factor": 2, "calibration": "frequency"}),
    (make_tiny_llama, "model.embed_tokens", "tt_matrix_embedding", {"vocab_shape": [4, 8, 8], "dim_shape": [4, 4, 4],
                                                                   "ranks": 4, "calibration": "frequency"}),
]
LAYER = {"tt_embedding": RaggedTTEmbedding, "kronecker_embedding": KroneckerEmbedding,
         "tt_matrix_embedding": TTMatrixEmbedding}


@pytest.mark.parametrize("make, name, method, options", CASES)
def test_plan_tied_head_and_bit_identical_reload(make, name, method, options, tmp_path):
    model = make()
    r = recipe(method, name, options)
    the_plan = plan(model, r)
    small = compress(model, r, progress=False, plan=the_plan, stats=counts_for(model, name))
    table_ = small.get_submodule(name)
    assert isinstance(table_, LAYER[method])
    head = small.get_output_embeddings()
    assert isinstance(head, TiedHead) and head.embedding is table_
    assert count_parameters(small)["total"] == the_plan.params_after
    again = load_compressed(save_compressed(small, tmp_path / "m", recipe=r))
    ids = torch.randint(0, table_.num_embeddings, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(small(ids).logits, again.model(ids).logits)
    assert isinstance(again.model.get_output_embeddings(), TiedHead)


@pytest.mark.parametrize("make, name, method, options", [
    (make_tiny_llama, "model.embed_tokens", "tt_embedding", {"shape": [4, 4, 4], "ranks": [4, 4],
                                                            "calibration": "frequency"}),
    (make_tiny_gpt2, "transformer.wte", "kronecker_embedding", {"factor": 1, "calibration": "frequency"}),
    (make_tiny_llama, "model.embed_tokens", "tt_matrix_embedding", {"vocab_shape": [4, 8, 8], "dim_shape": [4, 4, 4],
                                                                   "ranks": [16, 32], "calibration": "frequency"}),
])
def test_full_rank_frequency_compression_gives_the_dense_logits(make, name, method, options):
    model = make()
    small = compress(model, recipe(method, name, options), progress=False, stats=counts_for(model, name))
    ids = torch.randint(0, small.get_submodule(name).num_embeddings, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_frequency_lowers_the_weighted_error_of_the_tiny_llama_table():
    model = make_tiny_llama()
    name = "model.embed_tokens"
    stats = counts_for(model, name)
    f = frequency_weights(stats, name, 256)
    w = model.get_input_embeddings().weight.detach()
    for method, options in (("tt_embedding", {"shape": [4, 4, 4], "ranks": 2}), ("kronecker_embedding", {"factor": 4}),
                            ("tt_matrix_embedding", {"vocab_shape": [4, 8, 8], "dim_shape": [4, 4, 4], "ranks": 4})):
        plain = compress(model, recipe(method, name, options), progress=False)
        ours = compress(model, recipe(method, name, {**options, "calibration": "frequency"}), progress=False,
                        stats=stats)
        err = [weighted_sq(w, m.get_submodule(name).to_dense().weight.detach(), f) for m in (plain, ours)]
        assert err[1] < err[0], method


def test_bad_options_are_refused():
    with pytest.raises(TensorLMError, match="needs ranks"):
        recipe("tt_embedding", "transformer.wte", {"eps": 0.1, "calibration": "frequency"})
    with pytest.raises(TensorLMError, match=r"calibration must be one of \[None, 'frequency'\]"):
        recipe("kronecker_embedding", "transformer.wte", {"calibration": "whitened"})


# --- the calibration pass: token counts of the input table ---------------------------------------------

def write_text(folder, words: int = 6000):
    (folder / "lm_text").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    vocab = ["the", "a", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "and", "then", "slept"]
    picks = torch.multinomial(zipf(len(vocab)).float(), words, replacement=True, generator=gen).tolist()
    (folder / "lm_text" / "part.txt").write_text(" ".join(vocab[i] for i in picks) + "\n")


def text_and_model(tmp_path, monkeypatch):
    """Calibration text under ``tmp_path``, an empty cache, the GPT-2 tokenizer and a tiny GPT-2 of its size."""
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "cache"))
    write_text(tmp_path)
    tokenizer = GPT2TokenizerFast.from_pretrained(DATA / "gpt2-tokenizer")
    model = make_tiny_gpt2(vocab_size=len(tokenizer))
    return tokenizer, model


def test_calibrate_counts_input_tokens_beside_second_moments(tmp_path, monkeypatch):
    tokenizer, model = text_and_model(tmp_path, monkeypatch)
    r = Recipe.from_dict({"name": "mixed", "calibration": {"samples": 4, "length": 16}, "stages": [
        {"name": "e", "method": "kronecker_embedding", "targets": ["transformer.wte"],
         "options": {"factor": 2, "calibration": "frequency"}},
        {"name": "m", "method": "lowrank", "targets": ["transformer.h.0.mlp.c_fc"],
         "options": {"rank": 4, "calibration": "whitened"}}]})
    stats = calibrate(model, r, plan_recipe(model, r), tokenizer, data_dir=tmp_path, progress=False)
    counts = stats["transformer.wte"]
    assert counts.dtype == torch.float64 and counts.shape == (len(tokenizer),)
    assert counts.sum() == 4 * 16 and isinstance(stats["transformer.h.0.mlp.c_fc"], Calibration)
    assert counts[tokenizer.encode(" the")[0]] > 0
    again = calibrate(model, r, plan_recipe(model, r), tokenizer, data_dir=tmp_path, progress=False)
    assert again.cached and torch.equal(again["transformer.wte"], counts)  # the G cache still hits
    small = compress(model, r, progress=False, stats=stats)
    assert isinstance(small.transformer.wte, KroneckerEmbedding)
    wpe = Recipe.from_dict({"name": "pos", "calibration": {"samples": 4, "length": 16}, "stages": [
        {"name": "p", "method": "kronecker_embedding", "targets": ["transformer.wpe"],
         "options": {"factor": 2, "calibration": "frequency"}}]})
    with pytest.raises(TensorLMError, match="not the model's input token embedding"):
        calibrate(model, wpe, plan_recipe(model, wpe), tokenizer, data_dir=tmp_path, progress=False)


# --- lowrank_embedding: frequency- and head-weighted truncated SVD ---------------------------------------

def random_moment(d: int, seed: int = 4) -> torch.Tensor:
    """A full-rank, badly conditioned ``G (d, d)`` (eigenvalues 1e-3 .. 1e3)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.logspace(-3, 3, d, dtype=torch.float64)) @ q.T


def two_sided_sq(w: torch.Tensor, approx: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> float:
    """``||D^{1/2} (W - W~) G^{1/2}||_F^2 = sum_t f_t (w_t - w~_t) G (w_t - w~_t)^T``."""
    diff = w.double() - approx.detach().double()
    return float((f * ((diff @ g) * diff).sum(1)).sum())


def lowrank_table(w: torch.Tensor, rank: int, **weights) -> torch.Tensor:
    from tensorlm.layers.lowrank_embedding import LowRankEmbedding

    return LowRankEmbedding.from_dense(embedding(w), rank, **weights).to_dense().weight.detach()


def test_uniform_weights_and_identity_moment_are_the_plain_truncated_svd():
    w = table(60, 12)
    plain = lowrank_table(w, 5)
    ours = lowrank_table(w, 5, row_weights=torch.full((60,), 0.2, dtype=torch.float64),
                         head_moment=torch.eye(12, dtype=torch.float64))
    assert ((ours - plain).norm() / plain.norm()).item() < 1e-10


def test_a_planted_rank_table_is_recovered_under_any_weights():
    w = table(60, 4) @ table(4, 12, seed=1)  # rank 4
    ours = lowrank_table(w, 4, row_weights=zipf(60), head_moment=random_moment(12))
    assert ((ours - w).norm() / w.norm()).item() < 1e-9


def test_weighted_svd_beats_the_plain_one_in_its_own_norm():
    w, f, g = table(80, 16), zipf(80), random_moment(16)
    plain = lowrank_table(w, 4)
    by_frequency = lowrank_table(w, 4, row_weights=f)
    both = lowrank_table(w, 4, row_weights=f, head_moment=g)
    assert weighted_sq(w, by_frequency, f) < 0.9 * weighted_sq(w, plain, f)
    assert two_sided_sq(w, both, f, g) < 0.5 * min(two_sided_sq(w, a, f, g) for a in (plain, by_frequency))


def test_bad_row_weights_for_the_weighted_svd_get_one_line():
    with pytest.raises(TensorLMError, match=r"row weights \(59,\) must be \(60,\), finite and > 0"):
        lowrank_table(table(60, 12), 3, row_weights=torch.ones(59, dtype=torch.float64))
    with pytest.raises(TensorLMError, match="finite and > 0"):
        lowrank_table(table(60, 12), 3, row_weights=torch.zeros(60, dtype=torch.float64))


def test_dense_rows_keep_the_most_frequent_rows_exactly_and_fit_the_rest():
    from tensorlm.layers.lowrank_embedding import LowRankEmbedding

    w, f, g = table(80, 16), zipf(80), random_moment(16)
    layer = LowRankEmbedding.from_dense(embedding(w), 4, row_weights=f, head_moment=g, dense_rows=10)
    got = layer.to_dense().weight.detach()
    kept = torch.argsort(f, descending=True)[:10]
    rest = torch.tensor(sorted(set(range(80)) - set(kept.tolist())))
    assert torch.equal(got[kept], w[kept])  # stored as they are
    torch.testing.assert_close(got[rest], lowrank_table(w[rest], 4, row_weights=f[rest], head_moment=g),
                               rtol=1e-12, atol=1e-12)  # the weighted SVD of the other rows alone
    ids = torch.tensor([[int(kept[0]), int(rest[0]), int(kept[9])], [int(rest[-1]), 0, 79]])
    torch.testing.assert_close(layer(ids), got[ids], rtol=1e-12, atol=1e-12)
    h = table(5, 16, seed=7)
    torch.testing.assert_close(layer.project(h), h @ got.T, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in layer.parameters()) == 10 * 16 + 4 * (70 + 16)


def test_dense_rows_lower_the_weighted_error_at_equal_parameters():
    from tensorlm.layers.lowrank_embedding import LowRankEmbedding

    w, f = table(200, 16), zipf(200)  # budget: rank 6 without a split, 6 * 216 = 1296 values
    split = LowRankEmbedding.from_dense(embedding(w), 4, row_weights=f, dense_rows=20)  # 320 + 4 * 196 = 1104
    assert sum(p.numel() for p in split.parameters()) <= 6 * 216
    whole = lowrank_table(w, 6, row_weights=f)
    assert weighted_sq(w, split.to_dense().weight, f) < 0.75 * weighted_sq(w, whole, f)  # 0.66 here


def test_dense_rows_are_planned_counted_and_reloaded_bit_for_bit(tmp_path):
    model = make_tiny_gpt2()
    r = recipe("lowrank_embedding", "transformer.wte", {"ratio": 0.5, "dense_rows": 20,
                                                         "calibration": "frequency"})
    the_plan = plan_recipe(model, r)
    (entry,) = the_plan.entries
    vocab, dim = model.transformer.wte.weight.shape
    rank = (vocab // 2 - 20) * dim // (vocab - 20 + dim)  # the largest r with 20 d + r (V - 20 + d) <= V d / 2
    assert entry.config["rank"] == rank and entry.params_after == 20 * dim + rank * (vocab - 20 + dim)
    counts = {"transformer.wte": torch.arange(vocab, dtype=torch.float64) % 11}
    small = compress(model, r, progress=False, plan=the_plan, stats=counts)
    assert count_parameters(small)["total"] == the_plan.params_after
    again = load_compressed(save_compressed(small, tmp_path / "m", recipe=r)).model
    probe = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(small(probe).logits, again(probe).logits)


def test_dense_rows_bad_input_is_one_line():
    with pytest.raises(TensorLMError, match="dense_rows keeps the most frequent tokens on calibration text"):
        recipe("lowrank_embedding", "transformer.wte", {"ratio": 0.5, "dense_rows": 4})
    model = make_tiny_gpt2()
    vocab, dim = model.transformer.wte.weight.shape
    big = recipe("lowrank_embedding", "transformer.wte", {"ratio": 0.1, "dense_rows": vocab // 10,
                                                           "calibration": "frequency"})
    with pytest.raises(TensorLMError, match=rf"SVD rank 0 must be in 1\.\.{dim} with {vocab // 10} dense rows"):
        plan_recipe(model, big)
    from tensorlm.layers.lowrank_embedding import LowRankEmbedding

    with pytest.raises(TensorLMError, match="needs row weights"):
        LowRankEmbedding.from_dense(embedding(table(20, 4)), 2, dense_rows=3)


def test_count_samples_count_tokens_on_more_text_than_the_second_moments(tmp_path, monkeypatch):
    tokenizer, model = text_and_model(tmp_path, monkeypatch)
    r = Recipe.from_dict({"name": "c", "calibration": {"samples": 2, "length": 16, "count_samples": 6}, "stages": [
        {"name": "e", "method": "lowrank_embedding", "targets": ["transformer.wte"],
         "options": {"rank": 8, "calibration": "frequency-whitened"}}]})
    stats = calibrate(model, r, plan_recipe(model, r), tokenizer, data_dir=tmp_path, progress=False)
    assert stats["lm_head"].tokens == 2 * 16  # the head's G on `samples`
    six = Recipe.from_dict({**r.to_dict(), "calibration": {"samples": 6, "length": 16}}).calibration
    counted = calibration_batches(six, tokenizer, "causal-lm", tmp_path)[0]
    assert torch.equal(stats["transformer.wte"], token_counts(counted, len(tokenizer)).double())  # 6 x 16 tokens
    with pytest.raises(TensorLMError, match="count_samples must be a positive integer"):
        Recipe.from_dict({**r.to_dict(), "calibration": {"count_samples": 0}})


def test_frequency_whitened_calibration_collects_the_tied_heads_inputs(tmp_path, monkeypatch):
    from tensorlm.calibrate import head_moment_key
    from tensorlm.layers.lowrank_embedding import LowRankEmbedding

    tokenizer, model = text_and_model(tmp_path, monkeypatch)
    r = Recipe.from_dict({"name": "svd-fw", "calibration": {"samples": 4, "length": 16}, "stages": [
        {"name": "e", "method": "lowrank_embedding", "targets": ["transformer.wte"],
         "options": {"rank": 8, "calibration": "frequency-whitened"}}]})
    the_plan = plan_recipe(model, r)
    stats = calibrate(model, r, the_plan, tokenizer, data_dir=tmp_path, progress=False)
    head = stats[head_moment_key("transformer.wte")]
    assert head is stats["lm_head"] and head.second_moment.shape == (32, 32) and head.tokens == 4 * 16
    hidden = []  # the head's inputs on the same calibration blocks: G = sum_t h_t h_t^T
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: hidden.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        for batch in calibration_batches(r.calibration, tokenizer, "causal-lm", tmp_path)[0]:
            model(batch)
    handle.remove()
    h = torch.cat(hidden).double()  # (64, 32)
    torch.testing.assert_close(head.second_moment, h.T @ h, rtol=1e-5, atol=1e-6)
    small = compress(model, r, progress=False, plan=the_plan, stats=stats)
    assert isinstance(small.transformer.wte, LowRankEmbedding)
    assert isinstance(small.get_output_embeddings(), TiedHead)
    assert count_parameters(small)["total"] == the_plan.params_after
    again = load_compressed(save_compressed(small, tmp_path / "m", recipe=r))
    probe = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(small(probe).logits, again.model(probe).logits)
    full = Recipe.from_dict({**r.to_dict(), "stages": [
        {"name": "e", "method": "lowrank_embedding", "targets": ["transformer.wte"],
         "options": {"rank": 32, "calibration": "frequency-whitened"}}]})
    exact = compress(model, full, progress=False, stats=stats)
    with torch.no_grad():
        torch.testing.assert_close(exact(probe).logits, model(probe).logits, rtol=1e-4, atol=1e-4)


def test_frequency_whitened_without_a_tied_head_is_refused(tmp_path):
    with pytest.raises(TensorLMError, match="needs head: tie"):
        recipe("lowrank_embedding", "transformer.wte", {"rank": 4, "head": "untie",
                                                        "calibration": "frequency-whitened"})
    with pytest.raises(TensorLMError, match=r"calibration must be one of \[None, 'frequency', 'frequency-whitened'\]"):
        recipe("lowrank_embedding", "transformer.wte", {"rank": 4, "calibration": "whitened"})
    model = make_tiny_gpt2()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    r = recipe("lowrank_embedding", "transformer.wte", {"rank": 4, "calibration": "frequency-whitened"})
    with pytest.raises(TensorLMError, match="no head tied to it; use calibration: frequency"):
        calibrate(model, r, plan_recipe(model, r), None, data_dir=tmp_path, progress=False)
