import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from tensorlm import Recipe, compress, count_parameters
from tensorlm.errors import TensorLMError
from tensorlm.layers.kronecker import KroneckerEmbedding, KroneckerLinear, TiedHead
from tensorlm.recipe import builtin_recipes
from tensorlm.surgery import layer_index, match_targets


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


def test_builtin_recipes_parse_and_round_trip():
    assert {"minilm-kronecker-ffn", "minilm-lowrank-ffn", "kngpt2"} <= set(builtin_recipes())
    for name in builtin_recipes():
        recipe = Recipe.load(name)
        assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


def test_unknown_recipe_and_bad_options_are_named():
    with pytest.raises(TensorLMError, match="built-ins: .*kngpt2"):
        Recipe.load("no-such-recipe")
    with pytest.raises(TensorLMError, match=r"unknown option\(s\) \['rnak'\]"):
        Recipe.from_dict({"stages": [{"method": "lowrank", "targets": ["x"], "options": {"rnak": 3}}]})
    with pytest.raises(TensorLMError, match="method 'svd' is not one of"):
        Recipe.from_dict({"stages": [{"method": "svd", "targets": ["x"]}]})


def test_layer_index_and_odd_filter():
    assert layer_index("transformer.h.11.mlp.c_fc") == 11
    assert layer_index("encoder.layer.3.output.dense") == 3
    assert layer_index("transformer.wte") is None
    recipe = Recipe.from_dict({"stages": [{"method": "lowrank", "options": {"rank": 2},
                                           "targets": [{"match": "re:.*mlp\\.c_fc", "layers": "odd"}]}]})
    assert match_targets(tiny_gpt2(), recipe.stages[0]) == ["transformer.h.1.mlp.c_fc", "transformer.h.3.mlp.c_fc"]


def test_target_matching_nothing_names_the_closest_modules():
    recipe = Recipe.from_dict({"stages": [{"method": "lowrank", "options": {"rank": 2},
                                           "targets": ["transformer.h.0.mlp.cfc"]}]})
    with pytest.raises(TensorLMError, match=r"matches no module.*transformer\.h\.0\.mlp\.c_fc"):
        compress(tiny_gpt2(), recipe, progress=False)


def test_factor_shape_that_does_not_divide_lists_valid_ones():
    recipe = Recipe.from_dict({"stages": [{"method": "kronecker", "targets": ["transformer.h.0.mlp.c_fc"],
                                           "options": {"a_shape": [5, 5], "b_shape": [2, 2]}}]})
    with pytest.raises(TensorLMError, match=r"\(128, 32\) cannot be split .*valid splits include"):
        compress(tiny_gpt2(), recipe, progress=False)


def test_nan_weight_is_refused_by_compress():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    recipe = Recipe.from_dict({"stages": [{"method": "lowrank", "targets": ["transformer.h.0.mlp.c_fc"],
                                           "options": {"rank": 4}}]})
    with pytest.raises(TensorLMError, match="NaN/Inf"):
        compress(model, recipe, progress=False)


def test_compress_leaves_the_input_model_untouched():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress(model, Recipe.from_dict({"stages": [{"method": "lowrank", "targets": ["re:.*c_fc"],
                                                  "options": {"rank": 4}}]}), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"


def test_kngpt2_on_gpt2_small_has_the_arithmetic_parameter_count():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    dense = count_parameters(model)
    assert dense["total"] == 124_439_808 and dense["tied_head"] == "tied"
    small = compress(model, "kngpt2", progress=False, inplace=True)
    per_block_dense = 768 * 2304 + 768 * 768 + 768 * 3072 * 2
    per_block_kron = (1152 * 768 + 2) + (384 * 768 + 2) + 2 * (1536 * 768 + 2)
    expected = 124_439_808 - 50257 * 768 + (50257 * 384 + 2) - 6 * (per_block_dense - per_block_kron)
    table = count_parameters(small)
    assert table["total"] == expected == 83_907_506
    assert 83.0e6 <= table["total"] <= 84.5e6
    assert table["tied_head"] == "tied-factored" and isinstance(small.lm_head, TiedHead)
    assert isinstance(small.transformer.h[1].attn.c_attn, KroneckerLinear)
    assert type(small.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    ids = torch.tensor([[464, 2068, 7586]])
    out = small.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


def test_tied_and_untied_head_policies():
    model = tiny_gpt2()
    base = {"method": "kronecker_embedding", "targets": ["transformer.wte"]}
    tied = compress(model, Recipe.from_dict({"stages": [{**base, "options": {"head": "tie"}}]}), progress=False)
    untied = compress(model, Recipe.from_dict({"stages": [{**base, "options": {"head": "untie"}}]}), progress=False)
    assert isinstance(tied.transformer.wte, KroneckerEmbedding)
    assert count_parameters(tied)["tied_head"] == "tied-factored"
    assert count_parameters(untied)["tied_head"] == "untied"
    assert count_parameters(untied)["groups"]["head"] == 100 * 32
    ids = torch.randint(0, 100, (2, 7))
    # tied: logits are h @ E^T with E the factored table
    with torch.no_grad():
        h = tied.transformer(ids).last_hidden_state
        expected = h @ tied.transformer.wte.to_dense().weight.T
        assert torch.allclose(tied(ids).logits, expected, atol=1e-5)


def test_encoder_ffn_recipe_on_a_bert_config():
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2,
                                 num_attention_heads=12, vocab_size=200)).eval()
    small = compress(model, "minilm-kronecker-ffn", progress=False)
    before, after = count_parameters(model), count_parameters(small)
    assert before["total"] - after["total"] == 2 * 2 * (1536 * 384 - 2 * (768 * 192 + 4))


def test_tucker_bank_recipe_shares_one_bank_and_counts_it_once(tmp_path):
    from tensorlm import load_compressed, save_compressed
    from tensorlm.layers.tucker import BankLinear

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 vocab_size=50), add_pooling_layer=False).eval()
    recipe = Recipe.load("tucker-bank-1x7")
    recipe.stages[0].options.ranks, recipe.stages[0].options.block_size = [5, 8], 32
    small = compress(model, recipe, progress=False)
    layers = [m for m in small.modules() if isinstance(m, BankLinear)]
    assert len(layers) == 12 and len({id(m.bank) for m in layers}) == 1
    blocks = 2 * (4 + 2 + 2)  # per layer: Q, K, V, O one 32x32 block each, each FFN matrix two
    dense_weights = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    bank = 2 * 32 * 8 + 5 * 8 * 8 + blocks * 5
    before, after = count_parameters(model), count_parameters(small)
    assert before["total"] - after["total"] == dense_weights - bank
    assert after["groups"]["bank"] == 2 * 32 * 8 + 5 * 8 * 8
    folder = save_compressed(small, tmp_path / "bank")
    again = load_compressed(folder).model
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(small(ids).last_hidden_state, again(ids).last_hidden_state)
    assert len({id(m.bank) for m in again.modules() if isinstance(m, BankLinear)}) == 1


@pytest.mark.parametrize("name,head", [("tq-gpt2", "untied"), ("tq-gpt2-tied", "tied-factored")])
def test_tq_gpt2_has_tq_parameter_count(name, head):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    recipe = Recipe.load(name)
    for stage in recipe.stages:  # the count does not depend on the permutations: skip the search here
        stage.options.permute = None
    small = compress(model, recipe, progress=False, inplace=True)
    table = count_parameters(small)
    assert table["total_without_head"] == 81_336_388
    assert table["tied_head"] == head
    if head == "untied":
        assert table["stored"] == table["total"] == 81_336_388 + 50257 * 768
    wte = small.transformer.wte
    assert isinstance(wte, KroneckerEmbedding) and isinstance(wte.table, KroneckerEmbedding)
    assert tuple(wte.table.table.weight.shape) == (50257, 192)


def test_tensorgpt_gpt2_ties_the_head_to_the_tt_table():
    from tensorlm.layers.tt import TTEmbedding

    model = tiny_gpt2()
    recipe = Recipe.load("tensorgpt-gpt2")
    recipe.stages[0].options.shape, recipe.stages[0].options.ranks = [2, 4, 4], 2  # the tiny model's d = 32
    small = compress(model, recipe, progress=False)
    assert isinstance(small.transformer.wte, TTEmbedding) and isinstance(small.lm_head, TiedHead)
    assert count_parameters(small)["tied_head"] == "tied-factored"
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        h = small.transformer(ids).last_hidden_state
        assert torch.allclose(small(ids).logits, h @ small.transformer.wte.to_dense().weight.T, atol=1e-5)
    per_row = 2 * 2 + 2 * 4 * 2 + 2 * 4
    assert count_parameters(model)["total"] - count_parameters(small)["total"] == 100 * (32 - per_row)


def test_permuted_tq_style_model_equals_its_dense_reconstruction(tmp_path):
    from tensorlm import load_compressed, save_compressed
    from tensorlm.surgery import decompress

    model = tiny_gpt2()
    permute = {"time_budget_s": 1, "max_rounds": 2, "seed": 0}
    recipe = Recipe.from_dict({"stages": [
        {"name": "wte", "method": "kronecker_embedding", "targets": ["transformer.wte"],
         "options": {"head": "tie", "permute": permute}},
        {"name": "wte2", "method": "kronecker_embedding", "targets": ["transformer.wte.table"],
         "options": {"permute": permute}},
        {"name": "mlp", "method": "kronecker", "targets": [{"match": "re:.*mlp\\.(c_fc|c_proj)", "layers": "odd"}],
         "options": {"shapes": {"128x32": {"a_shape": [64, 16], "b_shape": [2, 2], "rank": 2},
                                "32x128": {"a_shape": [16, 64], "b_shape": [2, 2], "rank": 2}},
                     "permute": permute}},
    ]})
    small = compress(model, recipe, progress=False)
    layer = small.transformer.h[1].mlp.c_fc
    assert layer.row_perm is not None and not torch.equal(layer.row_perm, torch.arange(128))
    assert small.transformer.wte.col_perm is not None
    dense = decompress(small)
    assert not any(type(m).__name__ in ("KroneckerLinear", "KroneckerEmbedding", "TiedHead") for m in dense.modules())
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        logits = small(ids).logits
        assert ((logits - dense(ids).logits).norm() / logits.norm()) < 1e-5
        again = load_compressed(save_compressed(small, tmp_path / "tq")).model
        assert torch.equal(logits, again(ids).logits)
    assert again.generate(ids[:1, :3], max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 5)


def test_tq_gpt2_matches_its_dense_reconstruction_and_reloads_identically(tmp_path):
    from tensorlm import load_compressed, save_compressed
    from tensorlm.surgery import decompress

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    recipe = Recipe.load("tq-gpt2")
    for stage in recipe.stages:  # the real search, bounded tightly to keep the test short
        stage.options.permute.max_rounds, stage.options.permute.time_budget_s = 1, 1.0
    small = compress(model, recipe, progress=False, inplace=True)
    mlp = small.transformer.h[1].mlp.c_fc
    assert mlp.row_perm is not None and mlp.col_perm is not None
    assert count_parameters(small)["total_without_head"] == 81_336_388
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]])
    with torch.no_grad():
        logits = small(ids).logits
        dense = decompress(small)
        assert ((dense(ids).logits - logits).norm() / logits.norm()) < 1e-5
        del dense
        again = load_compressed(save_compressed(small, tmp_path / "tq")).model
        assert torch.equal(again(ids).logits, logits)
    assert again.generate(ids[:, :3], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 6)
