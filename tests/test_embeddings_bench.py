"""``benchmarks/embeddings.py --smoke --heal`` on tiny random models (a Gemma 3 with its scaled table, a BERT):
every row is written with its parameter count, and a healed row carries its own measurement and the table's
reconstruction, which only lowers the held-out objective; the dense row's size is that of its tensors."""

from __future__ import annotations

import json
import sys

import pytest
from benchmark_scripts import benchmark_script

embeddings = benchmark_script("embeddings")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_sweep_with_healing_writes_every_row_and_its_healed_measurement(tmp_path, monkeypatch):
    out = tmp_path / "e.json"
    monkeypatch.setattr(sys, "argv", ["embeddings.py", "--smoke", "--heal", "--methods", "svd", "kronecker",
                                      "--ratios", "4", "--out", str(out)])
    embeddings.main()
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {(m, k) for m in ("tiny-gemma3", "tiny-bert")
                                                         for k in ("dense", "svd", "kronecker")}
    for r in rows:
        dense = next(d for d in rows if d["model"] == r["model"] and d["method"] == "dense")
        # the table replaced, everything else (a tied head included: it holds no tensor of its own) kept
        assert r["params"] == dense["params"] - dense["embedding_params"] + r["embedding_params"]
        if r["method"] == "dense":
            assert r["size_bytes"] >= 4 * r["params"] and "healed" not in r
            continue
        heal = r["healed"]["heal"]
        assert heal["tied_head"] == (r["model"] == "tiny-gemma3") and heal["steps"] >= 1
        assert heal["val_after"] <= heal["val_before"] and heal["config"]["embedding_steps"] == 300
        assert r["healed"]["output_mse"] >= 0 and (out.with_suffix(".md")).exists()


def test_tolerance_eps_is_the_smallest_that_meets_the_ratio():
    import torch
    from torch import nn

    from tensorlm.layers.tt import RaggedTTEmbedding

    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shape = [4, 4, 4]
    eps = embeddings.tolerance_eps(weight, shape, 2.0)  # every row sampled (300 < 4,096)
    layer = RaggedTTEmbedding.from_tolerance(nn.Embedding.from_pretrained(weight), shape, eps)
    assert layer.stored <= weight.numel() / 2
    tighter = RaggedTTEmbedding.from_tolerance(nn.Embedding.from_pretrained(weight), shape, eps * 0.99)
    assert tighter.stored > weight.numel() / 2  # the bisection stops within 1% of eps
    assert embeddings.tolerance_eps(weight, shape, 1000.0) == 0.999  # below rank 1 everywhere: out of reach
