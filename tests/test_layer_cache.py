"""Inference caches of factored layers (issue 14): a Tucker bank's cores, a TT table behind a tied head and a
Kronecker layer's inverse row permutation are built once without a gradient to record, equal the uncached
computation, are rebuilt after an optimiser step or a load, and never stand in for the parameters while
training."""

import json

import pytest
import torch
from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.layers.base import TiedHead, measure_paths
from tensorlm.layers.kronecker import KroneckerLinear
from tensorlm.layers.tt import RaggedTTEmbedding, TTEmbedding
from tensorlm.layers.tucker import ORDERS, BankLinear, bank_from_dense

TOL = {"atol": 1e-6, "rtol": 1e-6}


def bank_layers() -> dict[str, BankLinear]:
    """Three float32 layers of one bank, ``D = 8``, ``(l, d) = (5, 6)``: grids 2x1, 1x2 and 1x1."""
    torch.manual_seed(0)
    dense = {"up": nn.Linear(8, 16), "down": nn.Linear(16, 8), "q": nn.Linear(8, 8)}
    return bank_from_dense(dense, ranks=(5, 6), block_size=8)


def reference(layer: BankLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` through the formed weight, in float64."""
    return (x.double() @ layer.weight_matrix().double().T + layer.bias.double()).float()


@pytest.mark.parametrize("order", ORDERS)
def test_bank_cached_forward_equals_uncached(order):
    """Every contraction order under no_grad (cached cores) equals the training path (cores recomputed from
    P and C) and the formed weight within 1e-6 in float32."""
    x = torch.randn(3, 4, 16)
    for layer in bank_layers().values():
        inputs = x[..., : layer.in_features]
        uncached = layer(inputs)  # grad enabled, parameters require grad: recomputed, contracted "v_g_u"
        layer.order = order
        with torch.no_grad():
            first, second = layer(inputs), layer(inputs)
        assert "_tensorlm_factor" in layer.__dict__ and not first.requires_grad
        torch.testing.assert_close(first, uncached.detach(), **TOL)
        torch.testing.assert_close(first, reference(layer, inputs), **TOL)
        assert torch.equal(first, second)


def test_bank_shared_part_built_once_per_bank():
    """The bank's folded cores are one tensor for all layers of the bank: built by the first layer, reused by
    the others; each layer keeps only its own factor."""
    layers = bank_layers()
    bank = layers["up"].bank
    with torch.no_grad():
        layers["up"].order = "v_gu"
        layers["up"](torch.randn(2, 8))
        folded = bank.__dict__["_tensorlm_folded_v_gu"][1]
        for name in ("down", "q"):
            layers[name].order = "v_gu"
            layers[name](torch.randn(2, layers[name].in_features))
        assert bank.__dict__["_tensorlm_folded_v_gu"][1] is folded
    assert folded.shape == (5, 6 * 8)  # (l, d D)
    shapes = {name: tuple(layer.__dict__["_tensorlm_factor"][1].shape) for name, layer in layers.items()}
    assert shapes == {"up": (6, 16), "down": (12, 8), "q": (6, 8)}  # (K d, out)


def test_bank_cache_rebuilt_after_optimizer_step_and_gradients_flow():
    """One SGD step on a layer (its P, bias and the shared U, V, C) invalidates every cached factor of the
    bank: the next no_grad forward equals the new weight, not the old output. The training forward gives
    U, V, C and P the gradient of the loss through the formed weight."""
    layers = bank_layers()
    up, q = layers["up"], layers["q"]
    x = torch.randn(6, 8)
    with torch.no_grad():
        before_up, before_q = up(x), q(x)  # caches built
    loss = up(x).square().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in up.named_parameters()}
    for p in up.parameters():
        p.grad = None
    (reference_loss := (x @ up.weight_matrix().T + up.bias).square().sum()).backward()
    for name, p in up.named_parameters():
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], p.grad, atol=1e-4, rtol=1e-4)
    assert reference_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    torch.optim.SGD(up.parameters(), lr=0.1).step()
    with torch.no_grad():
        after_up, after_q = up(x), q(x)
    torch.testing.assert_close(after_up, reference(up, x), **TOL)
    torch.testing.assert_close(after_q, reference(q, x), **TOL)  # q shares the bank that stepped
    assert (after_up - before_up).abs().max() > 1e-3 and (after_q - before_q).abs().max() > 1e-3


@pytest.mark.parametrize("order", ORDERS)
def test_bank_factor_with_gradient_is_uncached(order):
    """With a gradient to record, every order's factor is rebuilt from the parameters (no cache is touched)
    and a loss through it reaches P, U, V and C as the loss through the formed weight does."""
    up = bank_layers()["up"]
    rows, cols = up.grid
    x = torch.randn(5, 8)
    factor = up.factor(order)
    assert factor.requires_grad and "_tensorlm_factor" not in up.__dict__
    if order == "v_gu":
        y = ((x.reshape(-1, 8) @ up.bank.V).reshape(5, -1) @ factor) + up.bias
    elif order == "vg_u":
        y = ((x @ factor).reshape(-1, 6) @ up.bank.U.T).reshape(5, -1) + up.bias
    else:
        y = (((x @ up.bank.V) @ factor).reshape(-1, 6) @ up.bank.U.T).reshape(5, -1) + up.bias
    y.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in up.named_parameters()}
    for p in up.parameters():
        p.grad = None
    (x @ up.weight_matrix().T + up.bias).square().sum().backward()
    for name, p in up.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(TensorLMError, match="order 'zigzag'"):
        up.factor("zigzag")


def test_bank_macs_and_order_in_config():
    """Multiply-adds per row equal the arithmetic (``D = 8, d = 6``; up: 2 block rows, 1 column); the default
    order is the cheapest; a chosen order travels in the config; an unknown order is refused."""
    up = bank_layers()["up"]
    assert {o: up.macs_per_token(o) for o in ORDERS} == {
        "v_g_u": 8 * 6 + 2 * 36 + 2 * 6 * 8, "v_gu": 8 * 6 + 6 * 16, "vg_u": 8 * 2 * 6 + 2 * 6 * 8}
    assert up.order == "v_gu"
    up.order = "vg_u"
    cfg = json.loads(json.dumps(up.tensorlm_config()))
    shared = {}
    assert BankLinear.from_tensorlm_config(cfg, shared).order == "vg_u"
    with pytest.raises(TensorLMError, match="order 'zigzag' is not one of"):
        up.order = "zigzag"
    with pytest.raises(TensorLMError, match="order 'zigzag'"):
        BankLinear.from_tensorlm_config({**cfg, "order": "zigzag"}, {})


def test_bank_orders_are_timed_and_restored():
    """choose_forward's timer measures every order plus the reconstructed path, and restores the order."""
    up = bank_layers()["up"]
    up.order = "vg_u"
    times = measure_paths(up, torch.randn(4, 8), repeats=1, warmup=0)
    assert set(times) == {("factorized", o) for o in ORDERS} | {("reconstructed", None)}
    assert up.order == "vg_u"


def tt_table(ragged: bool) -> nn.Module:
    torch.manual_seed(0)
    emb = nn.Embedding(40, 16)
    if ragged:
        return RaggedTTEmbedding.from_dense(emb, [2, 2, 4], 40 * 24, torch.rand(40) + 0.1)
    return TTEmbedding.from_dense(emb, shape=[2, 2, 4], ranks=[2, 2])


@pytest.mark.parametrize("ragged", [False, True])
def test_tied_tt_head_caches_table(ragged):
    """The tied head's logits under no_grad come from one cached table, equal to the block-wise logits of
    the training path within 1e-6; an optimiser step rebuilds the table; training gets gradients through
    the blocks, never through the cache."""
    table = tt_table(ragged)
    table.block_rows = 7  # several blocks on the training path
    head = TiedHead(table, "wte")
    h = torch.randn(3, 5, 16)
    uncached = head(h)  # grad enabled: block by block
    assert uncached.requires_grad and "_tensorlm_dense" not in table.__dict__
    with torch.no_grad():
        first = head(h)
        cache = table.__dict__["_tensorlm_dense"][1][1]
        second = head(h)
    assert table.__dict__["_tensorlm_dense"][1][1] is cache and cache.shape == (40, 16)
    torch.testing.assert_close(first, uncached.detach(), **TOL)
    torch.testing.assert_close(first, h @ table.to_dense().weight.T, **TOL)
    assert torch.equal(first, second)
    uncached.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in table.parameters())
    torch.optim.SGD(table.parameters(), lr=0.1).step()
    with torch.no_grad():
        after = head(h)
    assert table.__dict__["_tensorlm_dense"][1][1] is not cache
    torch.testing.assert_close(after, h @ table.to_dense().weight.T, **TOL)
    assert (after - first).abs().max() > 1e-3


@pytest.mark.parametrize("ragged", [False, True])
def test_tt_lookup_padding_row_gets_no_gradient(ragged):
    """Lookup without grad skips the padding mask and equals the training lookup; with grad the padding row's
    cores get no gradient, the other looked-up rows do."""
    table = tt_table(ragged)
    table.padding_idx = 3
    ids = torch.tensor([[3, 5, 3, 9]])
    out = table(ids)
    with torch.no_grad():
        torch.testing.assert_close(table(ids), out.detach(), **TOL)
    out.sum().backward()
    if ragged:
        grad = table.values.grad
        pad_rows = table.row_class[3]
        block = table._block(int(pad_rows))
        start = block.data_ptr() - table.values.data_ptr()
        offset = start // table.values.element_size() + int(table.slot[3]) * block.shape[1]
        assert grad[offset:offset + block.shape[1]].abs().sum() == 0 and grad.abs().sum() > 0
    else:
        for core in table.cores:
            assert core.grad[3].abs().sum() == 0 and core.grad[5].abs().sum() > 0


def test_kronecker_row_gather_follows_loaded_permutation():
    """The inverse row permutation is built once and rebuilt when ``load_state_dict`` brings another ``p``:
    the forward equals the dense map of the loaded layer within 1e-6."""
    torch.manual_seed(0)
    first = KroneckerLinear.from_dense(nn.Linear(6, 8), (4, 3), (2, 2), rank=2, row_perm=torch.randperm(8))
    other = KroneckerLinear.from_dense(nn.Linear(6, 8), (4, 3), (2, 2), rank=2, row_perm=torch.randperm(8))
    x = torch.randn(5, 6)
    with torch.no_grad():
        first(x)  # builds the gather for the first permutation
        first.load_state_dict(other.state_dict())
        torch.testing.assert_close(first(x), other.to_dense()(x), **TOL)
