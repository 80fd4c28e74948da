"""The Tucker matrix bank (Ren, Wang et al., ICLR 2022): decomposition, layers, counts, save/load."""

import json

import pytest
import safetensors.torch
import tensorly
import torch
from safetensors import safe_open
from torch import nn
from transformers import BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

from tensorlm.decompose.tucker import (
    BankFactors,
    bank_parameter_count,
    identity_bank,
    merge_blocks,
    relative_errors,
    split_blocks,
    tucker_bank,
)
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import LAYERS
from tensorlm.layers.tucker import BankLinear, TuckerBank, bank_from_dense, bank_parameters

torch.set_num_threads(1)


def linears(seed=0, hidden=8, ffn=16, n_layers=2, dtype=torch.float64):
    """Q, K, V, O (hidden x hidden) and FFN in/out (ffn x hidden, hidden x ffn) of a toy encoder."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(n_layers):
        for name, (n_in, n_out) in {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden),
                                    "o": (hidden, hidden), "up": (hidden, ffn), "down": (ffn, hidden)}.items():
            layer = nn.Linear(n_in, n_out, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=dtype))
                layer.bias.copy_(torch.randn(n_out, generator=gen, dtype=dtype))
            layers[f"layer.{i}.{name}"] = layer
    return layers


def rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


class Holder(nn.Module):
    """A model whose children are the given modules, under names with '.' replaced by '_'."""

    def __init__(self, modules):
        super().__init__()
        self.layers = nn.ModuleDict({name.replace(".", "_"): m for name, m in modules.items()})


# ---------------------------------------------------------------- decomposition


def test_split_merge_block_order_and_round_trip():
    w = torch.arange(4 * 6, dtype=torch.float64).reshape(4, 6)  # (out 4, in 6), D = 2: 2 x 3 blocks
    v = torch.randn(2, 2, dtype=torch.float64)
    blocks, layout = split_blocks({"w": w, "v": v})
    assert blocks.shape == (7, 2, 2) and layout.block_size == 2 and layout.n_blocks == 7
    assert layout.grid("w") == (2, 3) and layout.blocks_of("v") == slice(6, 7)
    assert torch.equal(blocks[1 * 3 + 2], w[2:4, 4:6])  # block (r=1, c=2), row-major
    assert torch.equal(merge_blocks(blocks[layout.blocks_of("w")], 4, 6), w)
    assert torch.equal(blocks[6], v)


def test_identity_bank_is_exact_at_full_ranks():
    weights = {n: m.weight.detach() for n, m in linears().items()}
    blocks, layout = split_blocks(weights)  # 2 layers x (4 + 2 + 2) = 16 blocks of 8
    factors = identity_bank(blocks)
    assert factors.P.shape == (16, 16) and factors.C.shape == (16, 8, 8)
    errors = relative_errors(weights, factors, layout)
    assert max(errors.values()) == 0.0


def test_hooi_at_full_ranks_reproduces_every_weight():
    weights = {n: m.weight.detach().float() for n, m in linears().items()}
    blocks, layout = split_blocks(weights)
    errors = relative_errors(weights, tucker_bank(blocks, (16, 8)), layout)
    assert max(errors.values()) < 1e-5


def test_hooi_recovers_a_tensor_of_exact_multilinear_rank():
    gen = torch.Generator().manual_seed(1)
    q = lambda n, r: torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]  # noqa: E731
    truth = BankFactors(U=q(12, 4), V=q(12, 4), C=torch.randn(5, 4, 4, generator=gen, dtype=torch.float64),
                        P=q(9, 5))
    blocks = truth.reconstruct()  # (9, 12, 12), multilinear rank (5, 4, 4)
    fit = tucker_bank(blocks, (5, 4))
    assert rel(fit.reconstruct(), blocks) < 1e-10
    for factor in (fit.P, fit.U, fit.V):  # documented normalisation: orthonormal columns
        assert torch.allclose(factor.T @ factor, torch.eye(factor.shape[1], dtype=factor.dtype), atol=1e-10)


def test_truncated_error_equals_core_energy_and_is_deterministic():
    weights = {n: m.weight.detach() for n, m in linears().items()}
    blocks, layout = split_blocks(weights)
    fit = tucker_bank(blocks, (6, 5), seed=3)
    overall = relative_errors(weights, fit, layout)["overall"]
    # orthonormal factors: ||T - T_hat||^2 = ||T||^2 - ||C||^2
    expected = (1 - fit.C.norm() ** 2 / blocks.norm() ** 2).sqrt().item()
    assert overall == pytest.approx(expected, rel=1e-9) and 0.1 < overall < 1
    again = tucker_bank(blocks, (6, 5), seed=3)
    for name in ("U", "V", "C", "P"):
        assert torch.equal(getattr(fit, name), getattr(again, name))


def test_tensorly_backend_is_restored():
    before = tensorly.get_backend()
    tucker_bank(torch.randn(3, 4, 4), (2, 2))
    assert tensorly.get_backend() == before


@pytest.mark.parametrize(("shape", "block_size"), [((8, 12), 8), ((6, 4), None)])
def test_weight_not_a_multiple_of_block_size_is_refused(shape, block_size):
    with pytest.raises(TensorLMError, match="not a multiple of block_size"):
        split_blocks({"w": torch.randn(8, 8), "bad": torch.randn(*shape)}, block_size)


@pytest.mark.parametrize(("ranks", "message"), [((17, 8), "l=17"), ((4, 9), "d=9"), ((10, 3), "d\\^2=9"),
                                                ((0, 4), "l=0")])
def test_ranks_beyond_the_stack_are_refused(ranks, message):
    with pytest.raises(TensorLMError, match=message):
        bank_from_dense(linears(), ranks=ranks)  # M = 16 blocks of D = 8


# ---------------------------------------------------------------- layers


def test_bank_layers_share_one_bank_and_match_their_dense_maps():
    layers = linears()
    bank = bank_from_dense(layers, ranks=(6, 5))
    assert len({id(layer.bank) for layer in bank.values()}) == 1
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for name, layer in bank.items():
        assert layer.P.shape == ({"up": 2, "down": 2}.get(name.split(".")[-1], 1), 6)
        xin = x[..., : layer.in_features]
        assert rel(layer(xin), layer.to_dense()(xin)) < 1e-5
        assert torch.equal(layer.bias, layers[name].bias)
    model = Holder(bank)
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith(".bank.U") for n in names) == 1  # the bank is listed once


def test_full_rank_bank_layers_equal_linear_and_conv1d():
    gen = torch.Generator().manual_seed(2)
    conv = Conv1D(24, 8)  # GPT-2 layout: weight (in 8, out 24)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(8, 24, generator=gen))
        conv.bias.copy_(torch.randn(24, generator=gen))
    lin = nn.Linear(16, 8)
    bank = bank_from_dense({"conv": conv, "lin": lin}, ranks=(5, 8))  # M = 3 + 2 blocks of 8: full ranks
    x8, x16 = torch.randn(4, 8, generator=gen), torch.randn(4, 16, generator=gen)
    assert rel(bank["conv"](x8), conv(x8)) < 1e-5
    assert rel(bank["lin"](x16), lin(x16)) < 1e-5
    assert rel(bank["conv"].to_dense().weight, conv.weight.T) < 1e-5


def test_from_dense_and_registry():
    layer = BankLinear.from_dense(nn.Linear(8, 16), ranks=(2, 8))
    assert isinstance(layer, BankLinear) and LAYERS["BankLinear"] is BankLinear
    assert "blocks=2x1" in repr(layer) and "l=2, d=8" in repr(layer)


# ---------------------------------------------------------------- parameter counts


def test_parameter_counts_equal_the_arithmetic():
    bank = bank_from_dense(linears(), ranks=(6, 5))
    counts = bank_parameters(bank)
    assert counts["weights"] == bank_parameter_count(16, 8, 6, 5) == 2 * 8 * 5 + 6 * 25 + 16 * 6
    assert counts["bias"] == 2 * (4 * 8 + 16 + 8)
    assert sum(p.numel() for p in Holder(bank).parameters()) == counts["weights"] + counts["bias"]


def test_bert_base_shrinks_7_57x_at_l72_d384():
    """bert-base-uncased shapes (BertConfig defaults), all Q, K, V, O and FFN matrices of 12 layers."""
    config = BertConfig()
    model = BertModel(config, add_pooling_layer=False)
    targets = {}
    for i, block in enumerate(model.encoder.layer):
        for path in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"):
            targets[f"encoder.layer.{i}.{path}"] = block.get_submodule(path)
    dense = sum(m.weight.numel() for m in targets.values())
    assert dense == 144 * 768 * 768 == 84_934_656
    bank = TuckerBank("bert", 768, 72, 384)  # built from the config: no HOOI on 85M weights
    for name, layer in targets.items():
        parent, child = name.rsplit(".", 1)
        model.get_submodule(parent).register_module(
            child, BankLinear(layer.in_features, layer.out_features, bank, bias=True))
    replaced = {n: model.get_submodule(n) for n in targets}
    counts = bank_parameters(replaced)
    assert counts["weights"] == bank_parameter_count(144, 768, 72, 384) == 11_217_024
    assert round(dense / counts["weights"], 2) == 7.57
    unique = {id(p): p.numel() for p in model.encoder.parameters()}
    biases = sum(m.bias.numel() for m in targets.values())
    norms = sum(p.numel() for n, p in model.encoder.named_parameters() if "LayerNorm" in n)
    assert sum(unique.values()) == counts["weights"] + biases + norms


# ---------------------------------------------------------------- save / load


def rebuild(model, tmp_path, drop=()):
    """Save with safetensors, rebuild every BankLinear from its config through one shared dict, load strict."""
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_model(model, str(path))
    if drop:
        tensors = safetensors.torch.load_file(str(path))
        safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.endswith(drop)}, str(path))
    configs = json.loads(json.dumps({n: m.tensorlm_config() for n, m in model.layers.items()}))
    shared = {}
    fresh = Holder({n: BankLinear.from_tensorlm_config(cfg, shared) for n, cfg in configs.items()}).double()
    safetensors.torch.load_model(fresh, str(path), strict=True)
    return fresh, path


def test_save_load_keeps_one_copy_of_the_bank(tmp_path):
    model = Holder(bank_from_dense(linears(), ranks=(6, 5)))
    fresh, path = rebuild(model, tmp_path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith(".bank.C") for k in keys) == 1 and sum(k.endswith(".P") for k in keys) == 12
    assert len({id(m.bank) for m in fresh.layers.values()}) == 1
    for name, layer in model.layers.items():
        x = torch.randn(2, layer.in_features, dtype=torch.float64)
        assert torch.equal(fresh.layers[name](x), layer(x))


def test_missing_bank_in_saved_file_fails_loudly(tmp_path):
    model = Holder(bank_from_dense(linears(), ranks=(6, 5)))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*bank\.(C|U|V)"):
        rebuild(model, tmp_path, drop=(".bank.U", ".bank.V", ".bank.C"))


def test_bad_bank_config_is_refused():
    cfg = BankLinear.from_dense(nn.Linear(8, 8), ranks=(1, 4)).tensorlm_config()
    shared = {}
    BankLinear.from_tensorlm_config(cfg, shared)
    other = {**cfg, "bank": {**cfg["bank"], "rank": 3}}
    with pytest.raises(TensorLMError, match="bank rebuilt under"):
        BankLinear.from_tensorlm_config(other, shared)
    with pytest.raises(TensorLMError, match="lacks"):
        BankLinear.from_tensorlm_config({k: v for k, v in cfg.items() if k != "bank"}, {})
