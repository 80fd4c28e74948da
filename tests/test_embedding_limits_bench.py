"""``benchmarks/embedding_limits.py``: its per-token scoring is the library's sliding-window perplexity, split
exactly into factored-row and dense-row targets; each side of an untied head is the table it was given."""

from __future__ import annotations

import math

import pytest
import torch
from benchmark_scripts import benchmark_script

from tensorlm.evaluate.perplexity import perplexity

limits = benchmark_script("embedding_limits")

pytestmark = pytest.mark.usefixtures("one_thread")


class IdsTokenizer:
    """A "tokenizer" whose text is already its ids, space-separated."""

    def __call__(self, text, verbose=False):
        return {"input_ids": [int(t) for t in text.split()]}


@pytest.fixture(scope="module")
def tiny():
    model, table, _ = benchmark_script("embeddings").smoke_models()["tiny-gemma3"]
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(3))
    return model.model, table, ids


def test_score_is_the_sliding_window_perplexity_split_by_factored_targets(tiny):
    model, _, ids = tiny
    factored = torch.arange(512) >= 100  # (V,): every token id from 100 on counts as factored
    got = limits.score(model, ids, factored, context=64, stride=32)
    want = perplexity(model, IdsTokenizer(), " ".join(map(str, ids.tolist())), context=64, stride=32, progress=False)
    assert got["wikitext2_ppl"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["scored"] == want["tokens"] == 149
    share = got["factored_share"]
    assert share == pytest.approx((ids[1:] >= 100).float().mean().item())
    mixed = share * got["nll_factored"] + (1 - share) * got["nll_dense_rows"]
    assert mixed == pytest.approx(math.log(got["wikitext2_ppl"]), rel=1e-5)
    assert 0 < got["factored_mass"] < 1


def test_set_sides_unties_the_head_and_each_side_uses_its_own_table(tiny):
    model, table, ids = tiny
    dense = model.get_submodule(table).weight.detach().clone()  # (V, d)
    other = dense.flip(0)  # another table of the same shape
    x = ids[None, :16]
    with torch.no_grad():
        limits.set_sides(model, table, dense, other)
        hidden = model.model(input_ids=x).last_hidden_state  # (1, 16, d): the lookups are dense's
        logits = model(input_ids=x).logits
        assert torch.allclose(logits, hidden @ other.T, atol=1e-5)  # the head is the other table
        limits.set_sides(model, table, other, dense)
        assert not torch.allclose(model.model(input_ids=x).last_hidden_state, hidden)
    limits.set_sides(model, table, dense, dense)
