"""Distillation losses and their config: zero for identical models, equal to hand computations."""

import copy
import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from tensorlm.distill import DistillConfig
from tensorlm.distill.losses import (
    PRESETS,
    TERMS,
    attention_kl,
    check_layer_map,
    cosine_loss,
    distillation_loss,
    hidden_mse,
    logit_kl,
    masked_mse,
    next_token_ce,
    required_outputs,
    resolve_weights,
)
from tensorlm.errors import TensorLMError

ALL_ON = dict.fromkeys(TERMS, 1.0)
ENCODER_TERMS = {"hidden_mse": 1.0, "attention_kl": 1.0, "embedding_mse": 1.0, "cosine": 1.0}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
                     eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(cfg).eval()


def both(model_s, model_t, **inputs):
    flags = {"output_hidden_states": True, "output_attentions": True}
    return model_s(**inputs, **flags), model_t(**inputs, **flags)


def test_every_term_is_zero_for_identical_causal_models():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 9))
    s, t = both(model, copy.deepcopy(model), input_ids=ids)
    weights = dict(ALL_ON, ce=0.0)
    loss, parts = distillation_loss(s, t, weights, input_ids=ids, temperature=2.0)
    assert set(parts) == set(TERMS) - {"ce"}
    for term, value in parts.items():
        assert abs(value) < 1e-6, term
    assert abs(float(loss.detach())) < 1e-5


def test_every_encoder_term_is_zero_for_identical_models_with_padding():
    model = tiny_bert()
    ids = torch.randint(1, 64, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    s, t = both(model, copy.deepcopy(model), input_ids=ids, attention_mask=mask)
    loss, parts = distillation_loss(s, t, ENCODER_TERMS, input_ids=ids, attention_mask=mask)
    assert set(parts) == set(ENCODER_TERMS)
    assert all(abs(v) < 1e-6 for v in parts.values()), parts


def test_terms_are_positive_when_the_student_differs():
    model = tiny_gpt2()
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 64, (2, 9))
    s, t = both(student, model, input_ids=ids)
    _, parts = distillation_loss(s, t, ALL_ON, input_ids=ids)
    assert all(v > 1e-6 for v in parts.values()), parts


def test_logit_kl_matches_hand_computation_with_temperature_scaling():
    z_s = torch.tensor([[[1.0, 2.0, 0.0]]])
    z_t = torch.tensor([[[0.0, 1.0, 3.0]]])
    temperature = 2.0

    def softmax(z):
        e = [math.exp(v / temperature) for v in z]
        return [v / sum(e) for v in e]

    p_s, p_t = softmax([1.0, 2.0, 0.0]), softmax([0.0, 1.0, 3.0])
    expected = temperature**2 * sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True))
    assert float(logit_kl(z_s, z_t, temperature)) == pytest.approx(expected, rel=1e-6)


def test_logit_kl_averages_over_unmasked_tokens_only():
    z_t = torch.zeros(1, 2, 3)
    z_s = torch.tensor([[[1.0, 0.0, 0.0], [5.0, -5.0, 0.0]]])
    only_first = logit_kl(z_s[:, :1], z_t[:, :1])
    masked = logit_kl(z_s, z_t, attention_mask=torch.tensor([[1, 0]]))
    assert float(masked) == pytest.approx(float(only_first), rel=1e-6)


def test_logit_kl_rejects_different_vocabularies():
    with pytest.raises(TensorLMError, match="same vocabulary"):
        logit_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


def test_next_token_ce_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]]])  # (1, 3, 2)
    ids = torch.tensor([[0, 1, 0]])
    # position 0 predicts token 1, position 1 predicts token 0; position 2 has no target
    nll0 = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0)))
    nll1 = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(1.0)))
    assert float(next_token_ce(logits, ids)) == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    masked = next_token_ce(logits, ids, attention_mask=torch.tensor([[1, 1, 0]]))
    assert float(masked) == pytest.approx(nll0, rel=1e-6)


def test_masked_mse_matches_hand_computation():
    s = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    assert float(masked_mse(s, t, torch.tensor([[1, 0]]))) == pytest.approx((1 + 4) / 2)
    assert float(masked_mse(s, t)) == pytest.approx((1 + 4 + 81 + 81) / 4)


def test_hidden_mse_follows_the_layer_map_and_sums_over_it():
    s = tuple(torch.full((1, 2, 3), float(i)) for i in range(3))  # embeddings, block 0, block 1
    t = tuple(torch.full((1, 2, 3), 10.0 * i) for i in range(3))
    assert float(hidden_mse(s, t, {0: 1})) == pytest.approx((1 - 20) ** 2)
    assert float(hidden_mse(s, t, {0: 0, 1: 1})) == pytest.approx((1 - 10) ** 2 + (2 - 20) ** 2)


def test_a_layer_map_naming_missing_layers_is_an_error():
    s = tuple(torch.zeros(1, 2, 3) for _ in range(3))
    with pytest.raises(TensorLMError, match="out of range"):
        hidden_mse(s, s, {0: 5})
    with pytest.raises(TensorLMError, match="out of range"):
        hidden_mse(s, s, {2: 0})
    with pytest.raises(TensorLMError, match="out of range"):
        check_layer_map({-1: 0}, 2, 2)
    with pytest.raises(TensorLMError, match="empty"):
        check_layer_map({}, 2, 2)


def test_attention_kl_matches_hand_computation():
    a_t = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # (1, 1, 2, 2)
    a_s = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(attention_kl((a_s,), (a_t,), {0: 0})) == pytest.approx((0.0 + row1) / 2, rel=1e-6)
    masked = attention_kl((a_s,), (a_t,), {0: 0}, attention_mask=torch.tensor([[0, 1]]))
    assert float(masked) == pytest.approx(row1, rel=1e-6)


def test_attention_kl_gradient_is_finite_where_both_distributions_are_zero():
    a_t = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    logits = torch.tensor([[[[0.0, -float("inf")], [0.3, -0.2]]]], requires_grad=True)
    attention_kl((logits.softmax(-1),), (a_t,), {0: 0}).backward()
    assert torch.isfinite(logits.grad).all()


def test_attention_kl_needs_returned_attentions():
    with pytest.raises(TensorLMError, match="eager"):
        attention_kl((), (), {0: 0})


def test_cosine_loss_matches_hand_computation_with_mask_aware_pooling():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]])  # pooled over 2 tokens: (0.5, 0.5)
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-7.0, 3.0]]])  # pooled: (1, 0)
    mask = torch.tensor([[1, 1, 0]])
    assert float(cosine_loss(s, t, mask)) == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


def test_embedding_mse_uses_the_embedding_output():
    model = tiny_gpt2()
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.transformer.wpe.weight.add_(0.5)  # only the embedding output moves by exactly 0.5
    ids = torch.randint(0, 64, (1, 5))
    s, t = both(student, model, input_ids=ids)
    _, parts = distillation_loss(s, t, {"embedding_mse": 1.0}, input_ids=ids)
    assert parts["embedding_mse"] == pytest.approx(0.25, rel=1e-5)


def test_distillation_loss_is_the_weighted_sum_of_its_parts():
    model = tiny_gpt2()
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.lm_head.weight.mul_(1.3)
    ids = torch.randint(0, 64, (2, 6))
    s, t = both(student, model, input_ids=ids)
    weights = {"logit_kl": 0.5, "ce": 2.0, "hidden_mse": 3.0}
    loss, parts = distillation_loss(s, t, weights, input_ids=ids, temperature=1.5)
    assert float(loss.detach()) == pytest.approx(sum(weights[k] * parts[k] for k in weights), rel=1e-5)


def test_logit_terms_on_an_encoder_are_an_error():
    model = tiny_bert()
    ids = torch.randint(0, 64, (1, 4))
    s, t = both(model, model, input_ids=ids)
    with pytest.raises(TensorLMError, match="needs logits"):
        distillation_loss(s, t, {"logit_kl": 1.0}, input_ids=ids)
    with pytest.raises(TensorLMError, match="encoder"):
        DistillConfig(loss="logits").loss_weights("encoder")


def test_presets_and_requested_outputs():
    ilkd = resolve_weights("ilkd")
    assert {k for k, v in ilkd.items() if v > 0} == {"embedding_mse", "attention_kl", "hidden_mse", "logit_kl"}
    assert required_outputs(resolve_weights("logits")) == {"output_hidden_states": False,
                                                          "output_attentions": False}
    assert required_outputs(resolve_weights("embedding")) == {"output_hidden_states": True,
                                                             "output_attentions": False}
    assert required_outputs(ilkd) == {"output_hidden_states": True, "output_attentions": True}
    assert resolve_weights("logits", {"ce": 0.5})["ce"] == 0.5
    assert set(PRESETS) == {"ilkd", "logits", "embedding"}
    assert DistillConfig().loss_weights("causal-lm") == resolve_weights("logits")
    assert DistillConfig().loss_weights("encoder") == resolve_weights("embedding")


@pytest.mark.parametrize("bad", [{"preset": "nope"}, {"term": "mystery"}, {"term": "ce", "value": -1.0},
                                 {"all_zero": True}])
def test_bad_weights_are_errors(bad):
    with pytest.raises(TensorLMError):
        if "preset" in bad:
            resolve_weights(bad["preset"])
        elif "all_zero" in bad:
            resolve_weights("logits", {"logit_kl": 0.0})
        else:
            resolve_weights("logits", {bad["term"]: bad.get("value", 1.0)})


def test_config_round_trips_through_a_dict_and_reads_string_layer_maps():
    cfg = DistillConfig.from_dict({"loss": "ilkd", "layer_map": {"0": 1, "1": 3}, "steps": 7,
                                   "weights": {"ce": 0.5}, "time_budget_s": 60})
    assert cfg.layer_map == {0: 1, 1: 3}
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_unknown_key_names_the_valid_ones():
    with pytest.raises(TensorLMError, match="valid keys are .*'temperature'"):
        DistillConfig.from_dict({"temprature": 2.0})


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": -1.0}, {"batch_size": 2.5}, {"loss": "nope"},
                                 {"mixed_precision": "fp8"}, {"layer_map": {"a": 1}}, {"temperature": 0},
                                 {"weights": {"bogus": 1.0}}, {"steps": True}])
def test_config_bad_values_are_errors(bad):
    with pytest.raises(TensorLMError):
        DistillConfig.from_dict(bad)
