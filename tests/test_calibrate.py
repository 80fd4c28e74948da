"""The calibration pass: hooks give exactly X^T X, masks skip padding, the cache is bit-identical."""

from pathlib import Path

import pytest
import torch
from conftest import DATA
from torch import nn
from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from tensorlm.calibrate import (
    collect_second_moments,
    lm_calibration_batches,
    sentence_calibration_batches,
    token_counts,
)
from tensorlm.errors import TensorLMError

TOKENIZER = DATA / "gpt2-tokenizer"


class Toy(nn.Module):
    """Features in, called like a Hugging Face model: ``input_ids`` holds ``(B, L, 6)`` float features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 5)
        self.twin = nn.Linear(6, 4)  # sees the same input tensor as ``first``
        self.conv = Conv1D(3, 5)  # GPT-2 layout: weight (in=5, out=3)

    def forward(self, input_ids, attention_mask=None):
        hidden = torch.relu(self.first(input_ids))
        return self.conv(hidden) + self.twin(input_ids).sum(-1, keepdim=True)


def _features(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 7, 6, generator=gen) for _ in range(3)]


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        tie_word_embeddings=True))


def test_hooks_give_exactly_xtx(tmp_path):
    model, batches = Toy(), _features()
    res = collect_second_moments(model, ["first", "twin", "conv"], batches, progress=False, cache_dir=tmp_path)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()  # (42, 6)
    hidden = torch.cat([torch.relu(model.first(b)).reshape(-1, 5) for b in batches]).detach().double()
    assert torch.allclose(res["first"].second_moment, x.T @ x, rtol=1e-6, atol=1e-6)  # float32 x^T x per batch
    assert torch.equal(res["first"].second_moment, res["twin"].second_moment)
    assert torch.allclose(res["conv"].second_moment, hidden.T @ hidden, rtol=1e-6, atol=1e-6)  # float32 x^T x per batch
    assert res["first"].second_moment.dtype == torch.float64 and res["conv"].tokens == 42 == res.tokens
    assert res.seconds > 0 and res.peak_rss_mb > 0 and not res.cached


def test_attention_mask_skips_padded_positions(tmp_path):
    batches = _features(1)
    masks = [torch.rand(2, 7, generator=torch.Generator().manual_seed(i)) > 0.4 for i in range(3)]
    res = collect_second_moments(Toy(), ["first"], [{"input_ids": b, "attention_mask": m}
                                                    for b, m in zip(batches, masks, strict=True)],
                                 progress=False, cache=False)
    x = torch.cat([b[m] for b, m in zip(batches, masks, strict=True)]).double()
    assert res["first"].tokens == int(sum(m.sum() for m in masks))
    assert torch.allclose(res["first"].second_moment, x.T @ x, rtol=1e-6, atol=1e-6)  # float32 x^T x per batch


def test_tiny_llama_padded_batch_equals_separate_runs(tmp_path):
    model = _tiny_llama()
    names = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 256, (1, 5), generator=gen), torch.randint(0, 256, (1, 9), generator=gen)
    padded = torch.cat([torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1), long])  # right padding
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    together = collect_second_moments(model, names, [{"input_ids": padded, "attention_mask": mask}],
                                      progress=False, cache=False)
    apart = collect_second_moments(model, names, [short, long], progress=False, cache=False)
    for name in names:
        assert together[name].tokens == 14 == apart[name].tokens
        g, ref = together[name].second_moment, apart[name].second_moment
        assert (g - ref).norm() <= 1e-5 * ref.norm()  # float32 model: batched and single runs differ by round-off
    assert torch.equal(together[names[0]].second_moment, together[names[1]].second_moment)  # gate, up: same x


def test_cache_hit_is_bit_identical_and_keyed(tmp_path):
    model, batches = _tiny_llama(), [torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))]
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    first = collect_second_moments(model, names, batches, progress=False, cache_dir=tmp_path)
    again = collect_second_moments(model, names, batches, progress=False, cache_dir=tmp_path)
    assert again.cached and again.key == first.key and again.seconds == first.seconds
    assert all(torch.equal(first[n].second_moment, again[n].second_moment) for n in names)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]
    other_data = collect_second_moments(model, names, [batches[0] + 1], progress=False, cache_dir=tmp_path)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    other_model = collect_second_moments(model, names, batches, progress=False, cache_dir=tmp_path)
    assert not other_data.cached and not other_model.cached
    assert len({first.key, other_data.key, other_model.key}) == 3


def test_bad_modules_and_non_finite_activations(tmp_path):
    model = Toy()
    with pytest.raises(TensorLMError, match="no module 'nope'"):
        collect_second_moments(model, ["nope"], _features(), progress=False, cache=False)
    with pytest.raises(TensorLMError, match="is a Toy"):
        collect_second_moments(model, [""], _features(), progress=False, cache=False)
    bad = _features()
    bad[1][0, 0, 0] = float("inf")
    with pytest.raises(TensorLMError, match="'first' holds NaN/Inf") as info:
        collect_second_moments(model, ["first"], bad, progress=False, cache=False)
    assert "\n" not in str(info.value)


def test_token_counts_skip_padding():
    ids = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    counts = token_counts([{"input_ids": ids, "attention_mask": mask}, torch.tensor([[4]])], 5)
    assert counts.tolist() == [1, 1, 2, 3, 1]
    with pytest.raises(TensorLMError, match="outside a vocabulary of 3"):
        token_counts([ids], 3)


def _write_text(folder: Path, n_docs: int) -> Path:
    folder.mkdir()
    docs = [f"Document {i} tells of the {i % 7}th river. It ran past {i * 3} stones in the valley."
            for i in range(n_docs)]
    (folder / "a.txt").write_text("\n\n".join(docs))
    return folder


def test_lm_calibration_text_is_deterministic_and_refuses_too_short(tmp_path):
    tokenizer = GPT2TokenizerFast.from_pretrained(TOKENIZER)
    text = _write_text(tmp_path / "lm_text", 200)
    one = lm_calibration_batches(tokenizer, text, n_samples=5, seq_len=32, batch_size=2, held_out=4, cache_dir=tmp_path)
    two = lm_calibration_batches(tokenizer, text, n_samples=5, seq_len=32, batch_size=2, held_out=4, cache_dir=tmp_path)
    assert [b.shape for b in one] == [(2, 32), (2, 32), (1, 32)]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    with pytest.raises(TensorLMError, match="too short") as info:
        lm_calibration_batches(tokenizer, text, n_samples=500, seq_len=32, held_out=4, cache_dir=tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(TensorLMError, match="too short"):
        lm_calibration_batches(tokenizer, _write_text(tmp_path / "tiny", 2), n_samples=1, seq_len=32,
                               cache_dir=tmp_path)


def test_sentence_calibration_batches(tmp_path):
    tokenizer = GPT2TokenizerFast.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.eos_token
    text = _write_text(tmp_path / "lm_text", 1100)
    batches = sentence_calibration_batches(tokenizer, text, None, n_samples=40, max_length=16, batch_size=16)
    assert [b["input_ids"].shape[0] for b in batches] == [16, 16, 8]
    assert all(b["attention_mask"].shape == b["input_ids"].shape for b in batches)
    with pytest.raises(TensorLMError, match="too short"):
        sentence_calibration_batches(tokenizer, text, None, n_samples=10**6)
