import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorlm.decompose.kronecker import (
    choose_kronecker_shape,
    kronecker_sum,
    nearest_kronecker,
    rearrange,
    valid_factor_shapes,
)
from tensorlm.errors import TensorLMError
from tensorlm.layers.kronecker import KroneckerEmbedding, KroneckerLinear, TiedHead
from tensorlm.layers.lowrank import LowRankLinear


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_planted_kronecker_sum_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 6, 4, generator=g), torch.randn(3, 5, 7, generator=g)
    w = kronecker_sum(a, b)
    f = nearest_kronecker(w, (6, 4), (5, 7), rank=3)
    assert f.rel_error < 1e-6
    assert rel(kronecker_sum(f.a, f.b), w) < 1e-6


def test_kronecker_sum_matches_torch_kron_convention():
    a, b = torch.randn(1, 2, 3), torch.randn(1, 4, 5)
    assert torch.equal(kronecker_sum(a, b), torch.kron(a[0], b[0]))
    # row (i1, j1) of R(W) is vec of block (i1, j1)
    w = torch.arange(8 * 15.0).reshape(8, 15)
    r = rearrange(w, (2, 3), (4, 5))
    assert torch.equal(r[1 * 3 + 2], w[4:8, 10:15].reshape(-1))


def test_reported_error_equals_measured_error():
    w = torch.randn(24, 18)
    f = nearest_kronecker(w, (6, 3), (4, 6), rank=2)
    assert f.rel_error == pytest.approx(rel(kronecker_sum(f.a, f.b), w), rel=1e-5)


def test_bad_factor_shape_lists_valid_splits():
    with pytest.raises(TensorLMError, match=r"valid splits include .*\(384, 192\)x\(2, 2\)"):
        nearest_kronecker(torch.randn(768, 384), (5, 5), (2, 2))


def test_nan_weight_is_refused():
    w = torch.randn(8, 8)
    w[1, 2] = float("nan")
    with pytest.raises(TensorLMError, match="NaN"):
        nearest_kronecker(w, (4, 4), (2, 2))


def test_valid_splits_and_ratio_choice():
    splits = valid_factor_shapes((4, 6))
    assert len(splits) == 3 * 4 - 2  # divisors(4) x divisors(6) minus the two trivial ones
    choice = choose_kronecker_shape((1536, 384), 0.5)
    assert choice.dense_shape == (1536, 384)
    assert 0.9 * 0.5 <= choice.params / (1536 * 384) <= 1.01 * 0.5


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("shapes", [((8, 3), (4, 4), 2), ((16, 6), (2, 2), 3)])
def test_kronecker_linear_forward_equals_dense(conv, shapes):
    torch.manual_seed(0)
    dense = Conv1D(32, 12) if conv else nn.Linear(12, 32)
    a_shape, b_shape, rank = shapes
    p, q = torch.randperm(32), torch.randperm(12)
    layer = KroneckerLinear.from_dense(dense, a_shape, b_shape, rank, row_perm=p, col_perm=q)
    x = torch.randn(5, 7, 12)
    assert rel(layer(x), layer.to_dense()(x)) < 1e-5
    # the dense reconstruction undoes the permutations: W[p][:, q] is the Kronecker sum
    w = layer.to_dense().weight
    assert rel(w[p][:, q], layer.kronecker_weight()) < 1e-6


def test_kronecker_linear_replaces_conv1d_exactly_when_planted():
    a, b = torch.randn(1, 4, 3), torch.randn(1, 2, 5)
    conv = Conv1D(8, 15)
    with torch.no_grad():
        conv.weight.copy_(kronecker_sum(a, b).T)  # Conv1D stores (in, out)
    layer = KroneckerLinear.from_dense(conv, (4, 3), (2, 5))
    x = torch.randn(3, 15)
    assert rel(layer(x), conv(x)) < 1e-6
    assert sum(p.numel() for p in layer.parameters()) == 4 * 3 + 2 * 5 + 8


def test_bad_permutation_is_refused():
    with pytest.raises(TensorLMError, match="not a bijection"):
        KroneckerLinear((2, 2), (2, 2), row_perm=torch.tensor([0, 0, 1, 2]))
    with pytest.raises(TensorLMError, match="expected"):
        KroneckerLinear((2, 2), (2, 2), col_perm=torch.arange(3))
    layer = KroneckerLinear((2, 2), (2, 2), row_perm=torch.arange(4))
    state = layer.state_dict()
    state["row_perm"] = torch.tensor([3, 3, 1, 0])
    with pytest.raises(TensorLMError, match="row_perm"):
        layer.load_state_dict(state)


def test_lowrank_linear_forward_and_count():
    dense = nn.Linear(20, 30)
    layer = LowRankLinear.from_dense(dense, rank=4)
    x = torch.randn(6, 20)
    assert rel(layer(x), layer.to_dense()(x)) < 1e-5
    assert sum(p.numel() for p in layer.parameters()) == 4 * (20 + 30) + 30
    full = LowRankLinear.from_dense(dense, rank=20)
    assert rel(full(x), dense(x)) < 1e-5


def test_kronecker_embedding_lookup_and_tied_logits():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 12)
    layer = KroneckerEmbedding.from_dense(emb, factor=2, col_perm=torch.randperm(12))
    ids = torch.randint(0, 50, (3, 9))
    dense = layer.to_dense()
    assert rel(layer(ids), dense(ids)) < 1e-6
    h = torch.randn(3, 9, 12)
    assert rel(TiedHead(layer, "wte")(h), h @ dense.weight.T) < 1e-5
    assert sum(p.numel() for p in layer.parameters()) == 50 * 6 + 2


def test_nested_kronecker_embedding_is_exact_on_a_planted_table():
    # E = (A (x) b2) (x) b1, with column permutations at both stages
    a, b2, b1 = torch.randn(40, 3), torch.randn(1, 2), torch.randn(1, 2)
    emb = nn.Embedding(40, 12)
    q = torch.randperm(12)
    with torch.no_grad():
        emb.weight[:, q] = torch.kron(torch.kron(a, b2), b1)
    outer = KroneckerEmbedding.from_dense(emb, factor=2, col_perm=q)
    outer.table = KroneckerEmbedding.from_dense(outer.table, factor=2)
    ids = torch.randint(0, 40, (4, 5))
    assert rel(outer(ids), emb(ids)) < 1e-5
    h = torch.randn(4, 5, 12)
    assert rel(TiedHead(outer, "wte")(h), h @ emb.weight.T) < 1e-5
    assert sum(p.numel() for p in outer.parameters()) == 40 * 3 + 2 + 2
