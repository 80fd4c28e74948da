"""The per-layer forward choice (factored forward or one through the reconstructed dense weight), the
Kronecker contraction orders, and placing/casting a compressed model on load."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from safetensors.torch import load_file
from torch import nn

from tensorlm import Recipe, compress, load_compressed, save_compressed
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import (
    FACTORIZED,
    FORWARD_KEY,
    RECONSTRUCTED,
    TiedHead,
    choose_forward,
    factorized_layers,
    forward_all,
    get_forward,
    normalize_forward,
    path_for,
    set_forward,
    set_forward_all,
)
from tensorlm.layers.kronecker import CONTRACTIONS, KroneckerEmbedding, KroneckerLinear
from tensorlm.layers.lowrank import LowRankLinear
from tensorlm.layers.tt import TTEmbedding, TTLinear
from tensorlm.layers.tucker import bank_from_dense

FIXTURES = Path(__file__).parent / "fixtures"
TOL = {"atol": 1e-5, "rtol": 1e-5}
LLAMA_MLP = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj"
LLAMA_ATTN = "re:model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj"


def linear(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Every layer type with an input of its kind: features ``(2, 5, in)`` or ids ``(2, 5)``."""
    torch.manual_seed(1)
    x64, ids = torch.randn(2, 5, 64), torch.randint(0, 40, (2, 5))
    kron = KroneckerLinear.from_dense(linear(32, 64), (8, 16), (4, 4), rank=2, row_perm=torch.randperm(32),
                                      col_perm=torch.randperm(64))
    emb = nn.Embedding(40, 16)
    nested = KroneckerEmbedding.from_dense(emb, factor=2, col_perm=torch.randperm(16))
    nested.table = KroneckerEmbedding.from_dense(nested.table, factor=2)
    tt_emb = TTEmbedding.from_dense(emb, shape=[2, 2, 4], ranks=[2, 2])
    bank = bank_from_dense({"q": linear(64, 64, 2), "up": linear(128, 64, 3)}, ranks=(3, 16), block_size=32)
    return {
        "kronecker": (kron, x64),
        "lowrank": (LowRankLinear.from_dense(linear(48, 64), rank=7), x64),
        "bank": (bank["up"], x64),
        "tt_linear": (TTLinear.from_dense(linear(48, 64), ranks=[3, 3]), x64),
        "kronecker_embedding": (nested, ids),
        "tt_embedding": (tt_emb, ids),
        "tied_head_kronecker": (TiedHead(nested, "wte"), torch.randn(2, 5, 16)),
        "tied_head_tt": (TiedHead(tt_emb, "wte"), torch.randn(2, 5, 16)),
    }


@pytest.mark.parametrize("kind", sorted(layers()))
def test_reconstructed_and_chosen_forwards_equal_the_factored_forward(kind):
    layer, x = layers()[kind]
    with torch.no_grad():
        factored = layer(x)
        set_forward(layer, RECONSTRUCTED)
        assert get_forward(layer) == RECONSTRUCTED
        torch.testing.assert_close(layer(x), factored, **TOL)
        assert not any("tensorlm" in key for key in layer.state_dict())  # the cache is no parameter or buffer
        report = choose_forward(layer, [x, x[:1, :1]], repeats=1, warmup=0)
        assert set(report[""]["seconds"]) == {10, 1}  # rows: 2 x 5 tokens, then 1
        torch.testing.assert_close(layer(x), factored, **TOL)
        torch.testing.assert_close(layer(x[:1, :1]), factored[:1, :1], **TOL)


def test_every_kronecker_contraction_order_computes_the_same_map():
    layer, x = layers()["kronecker"]
    with torch.no_grad():
        expected = layer.to_dense()(x)
        for order in CONTRACTIONS:
            layer.order = order
            torch.testing.assert_close(layer(x), expected, **TOL)
    with pytest.raises(TensorLMError, match="order 'c_first'"):
        KroneckerLinear((8, 16), (4, 4), order="c_first")


@pytest.mark.parametrize("b_shape", [(2, 1), (1, 2), (1, 1)])
@pytest.mark.parametrize("rank", [1, 2])
def test_column_and_row_b_factors_take_the_copy_free_contractions_exactly(b_shape, rank):
    # B_k of one column (n2 = 1) or one row (m2 = 1): the A-first / B-first contractions skip the transposed
    # copies; every order, permuted rows and columns included, still computes the dense map
    torch.manual_seed(0)
    (m2, n2), (m1, n1) = b_shape, (8, 6)
    rank = min(rank, m2 * n2)  # the Kronecker rank is at most min(m1 n1, m2 n2)
    dense = nn.Linear(n1 * n2, m1 * m2)
    layer = KroneckerLinear.from_dense(dense, (m1, n1), b_shape, rank, row_perm=torch.randperm(m1 * m2),
                                       col_perm=torch.randperm(n1 * n2))
    x = torch.randn(3, 5, n1 * n2)
    with torch.no_grad():
        expected = layer.to_dense()(x)
        for order in CONTRACTIONS:
            layer.order = order
            torch.testing.assert_close(layer(x), expected, **TOL)


def test_choices_are_checked_and_pairs_pick_the_nearest_row_count():
    assert normalize_forward([[512, "reconstructed"], [1, "reconstructed"]]) == RECONSTRUCTED
    pairs = normalize_forward([[512, RECONSTRUCTED], [1, FACTORIZED]])
    assert pairs == ((1, FACTORIZED), (512, RECONSTRUCTED))
    paths = [path_for(pairs, rows) for rows in (1, 8, 22, 23, 4096)]  # geometric midpoint of 1 and 512: 22.6
    assert paths == [FACTORIZED] * 3 + [RECONSTRUCTED] * 2
    for bad in ("dense", [], [[0, FACTORIZED]], [[1, FACTORIZED], [1, RECONSTRUCTED]], [["x", FACTORIZED]]):
        with pytest.raises(TensorLMError, match="forward"):
            normalize_forward(bad)


@pytest.mark.parametrize("kind", sorted(layers()))
def test_gradients_reach_the_factors_whatever_the_choice(kind):
    layer, x = layers()[kind]
    set_forward(layer, RECONSTRUCTED)
    for mode in ("train", "eval"):  # eval with gradients (e.g. distillation without dropout): factored too
        layer.train(mode == "train")
        layer.zero_grad()
        layer(x).square().sum().backward()
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{kind} {mode}: no gradient to {name}"


def test_the_dense_cache_follows_the_factors_after_a_training_step():
    layer, x = layers()["kronecker"]
    set_forward(layer, RECONSTRUCTED)
    with torch.no_grad():
        before = layer(x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
        set_forward(layer, FACTORIZED)
        torch.testing.assert_close(after, layer(x), **TOL)
    assert not torch.allclose(before, after)


def recipe(model_name: str) -> Recipe:
    if model_name == "gpt2":
        stages = [
            {"name": "wte", "method": "kronecker_embedding", "targets": ["transformer.wte"],
             "options": {"head": "tie"}},
            {"name": "mlp", "method": "kronecker", "targets": ["re:.*mlp\\.c_fc"],
             "options": {"a_shape": [64, 16], "b_shape": [2, 2], "rank": 2}},
            {"name": "attn", "method": "lowrank", "targets": ["re:.*attn\\.c_proj"], "options": {"rank": 5}},
            {"name": "wpe", "method": "tt_embedding", "targets": ["transformer.wpe"],
             "options": {"shape": [2, 4, 4], "ranks": 2}},
        ]
    else:
        stages = [
            {"name": "emb", "method": "tt_embedding", "targets": ["model.embed_tokens"],
             "options": {"shape": [4, 4, 4], "ranks": 3, "head": "tie"}},
            {"name": "mlp", "method": "kronecker", "targets": [LLAMA_MLP], "options": {"ratio": 0.5}},
            {"name": "attn", "method": "tucker_bank", "targets": [LLAMA_ATTN],
             "options": {"ranks": [6, 24], "block_size": 32}},
        ]
    return Recipe.from_dict({"name": f"tiny-{model_name}", "stages": stages})


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_the_choice_survives_save_and_load(model_name, tmp_path):
    dense = make_tiny_gpt2() if model_name == "gpt2" else make_tiny_llama()
    small = compress(dense, recipe(model_name), progress=False)
    ids = torch.randint(0, dense.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        factored = small(ids).logits
    report = choose_forward(small, [(2, 9), (1, 1)], repeats=1, warmup=0)
    found = factorized_layers(small)
    assert set(report) == set(found) and len(found) >= 4
    names = sorted(found)  # make sure all three kinds of choice travel, whatever was measured
    set_forward(found[names[0]], RECONSTRUCTED)
    set_forward(found[names[1]], [[1, FACTORIZED], [18, RECONSTRUCTED]])
    set_forward(found[names[2]], FACTORIZED)
    choices = {name: get_forward(layer) for name, layer in found.items()}
    orders = {name: layer.order for name, layer in found.items() if isinstance(layer, KroneckerLinear)}
    folder = save_compressed(small, tmp_path / "m", kind="causal-lm")
    manifest = json.loads((folder / "tensorlm.json").read_text())
    saved = {m["name"]: m["config"][FORWARD_KEY] for m in manifest["modules"] if FORWARD_KEY in m["config"]}
    assert saved == choices
    loaded = load_compressed(folder).model
    reloaded = factorized_layers(loaded)
    assert {name: get_forward(layer) for name, layer in reloaded.items()} == choices
    assert {name: reloaded[name].order for name in orders} == orders
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, factored, **TOL)
        set_forward_all(loaded, FACTORIZED)
        torch.testing.assert_close(loaded(ids).logits, factored, **TOL)


def test_forward_all_sets_a_choice_inside_the_block_and_restores_each_layers_own_after_an_error():
    loaded = load_compressed(FIXTURES / "gpt2-kron").model
    layers = factorized_layers(loaded)
    first = next(iter(layers.values()))
    set_forward(first, RECONSTRUCTED)
    before = {name: get_forward(layer) for name, layer in layers.items()}
    assert len(set(map(str, before.values()))) == 2  # one layer differs from the others
    with pytest.raises(RuntimeError), forward_all(loaded, RECONSTRUCTED):
        assert {get_forward(layer) for layer in layers.values()} == {RECONSTRUCTED}
        raise RuntimeError("evaluation failed")
    assert {name: get_forward(layer) for name, layer in layers.items()} == before

@pytest.mark.parametrize("fixture", ["gpt2-kron", "gpt2-tt"])
def test_a_folder_saved_before_the_choice_loads_factorized(fixture):
    manifest = json.loads((FIXTURES / fixture / "tensorlm.json").read_text())
    assert not any(FORWARD_KEY in m["config"] for m in manifest["modules"])
    loaded = load_compressed(FIXTURES / fixture).model
    assert {get_forward(layer) for layer in factorized_layers(loaded).values()} == {FACTORIZED}
    expected = load_file(str(FIXTURES / fixture / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(expected["ids"]).logits, expected["logits"], **TOL)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    small = compress(make_tiny_llama(), recipe("llama"), progress=False)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = small(ids).logits
    set_forward_all(small, RECONSTRUCTED)
    return save_compressed(small, tmp_path_factory.mktemp("cast") / "m", kind="causal-lm"), ids, logits


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32)]
                         + ([("cuda", torch.float16), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else []))
def test_load_places_and_casts_every_floating_tensor(llama_folder, device, dtype):
    folder, ids, reference = llama_folder
    model = load_compressed(folder, device=device, dtype=dtype).model
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {dtype}
    assert {t.device.type for t in tensors} == {device}
    with torch.no_grad():
        logits = model(ids.to(device)).logits.float().cpu()
    # bfloat16 keeps 8 significant bits (relative step 2^-8): over two blocks the logits of this random
    # model (|logits| ~ 1) stay within 5% of their scale; float16 (11 bits) and float32 are far closer.
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert (logits - reference).abs().max() <= tolerance * reference.abs().max()


def test_load_refuses_a_dtype_that_is_not_floating(llama_folder):
    with pytest.raises(TensorLMError, match="not a floating-point"):
        load_compressed(llama_folder[0], dtype=torch.int8)
    with pytest.raises(TensorLMError, match="cannot place"):
        load_compressed(llama_folder[0], device="nodevice")
