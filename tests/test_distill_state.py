"""Distillation runs with different mixed precision follow each other in one process (issue 11).

accelerate keeps one mixed-precision setting per process and refuses a second; :func:`tensorlm.distill.distill`
resets its state between runs that differ, and nothing of a bf16 run leaks into a later float32 one.
"""

import pytest
import torch
from accelerate.state import AcceleratorState
from test_distill_trainer import causal_config, gpt2_pair, params, tiny_tokenizer, write_text

from tensorlm.distill import distill


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_runs_with_different_mixed_precision_follow_each_other_in_one_process(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    trained = []
    for n, precision in enumerate(("no", "bf16", "no")):
        student, teacher = gpt2_pair()
        cfg = causal_config(text, steps=4, eval_every=4, save_every=4, mixed_precision=precision)
        distill(student, teacher, tok, cfg, tmp_path / f"run{n}", kind="causal-lm", progress=False)
        assert AcceleratorState().mixed_precision == precision
        trained.append(params(student))
    # bf16 autocast trained differently, and the float32 run after it trains exactly as the one before it
    assert any(not torch.equal(trained[1][k], v) for k, v in trained[0].items())
    assert all(torch.equal(trained[2][k], v) for k, v in trained[0].items())
