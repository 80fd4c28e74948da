"""``benchmarks/heal_causal_lm.py`` without a model: the Markdown and PNG from the JSON alone (CPU and GPU
scale), and how a distillation phase is sized on each device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from benchmark_scripts import benchmark_script

heal = benchmark_script("heal_causal_lm")


def row(recipe: str, phase: str, cpu: float, wall: float, ppl: float, **extra) -> dict:
    return {"recipe": recipe, "phase": phase, "params": 1000, "cpu_minutes": cpu, "wall_minutes": wall,
            "budget_cpu_minutes": 60.0, "wikitext2_ppl": ppl, "lambada_acc": 0.2, "teacher_kl": 0.3,
            "heal": {phase: {"load_before": 1.0, "load_after": 2.0}}, **extra}


def table(text: str) -> dict[str, str]:
    return {line.split(" | ")[0] + line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| ")}


def write(path: Path, device: str) -> str:
    dense = {"recipe": "dense", "phase": "dense", "params": 2000, "cpu_minutes": 0.0, "wall_minutes": 0.0,
             "wikitext2_ppl": 20.0, "lambada_acc": 0.3, "teacher_kl": 0.0, "full": {"wikitext2_ppl": 12.5}}
    rows = [row("smollm2-svd-llm-fisher-30", "training-free", 0.0, 0.0, 200.0),
            row("smollm2-svd-llm-fisher-30", "distill", 50.0, 4.0, 28.0, full={"wikitext2_ppl": 17.25}),
            row("smollm2-svd-llm-fisher-10", "distill", 30.0, 3.0, 25.0),
            row("smollm2-tq-whitened-mlp-83", "distill", 30.0, 3.0, 23.0), dense]
    path.write_text(json.dumps({"protocol": "Protocol.", "machine": "a test machine", "device": device,
                                "rows": rows}))
    return heal.write_outputs(path)


def test_cpu_table_uses_the_cpu_targets_and_shows_wt2_full(tmp_path):
    lines = table(write(tmp_path / "heal.json", "cpu"))
    assert "<= 3.0x: met" in lines["| smollm2-svd-llm-fisher-30distill"]  # 28 / 20 = 1.4
    assert "| 1.40 |" in lines["| smollm2-svd-llm-fisher-30distill"]
    assert "<= 1.2x: missed" in lines["| smollm2-svd-llm-fisher-10distill"]  # 25 / 20 = 1.25
    assert "<= 1.2x: met" in lines["| smollm2-tq-whitened-mlp-83distill"]  # the Kronecker path at -10%: 1.15
    assert lines["| smollm2-svd-llm-fisher-30distill"].endswith("| 17.25 |")
    assert lines["| densedense"].endswith("| 12.50 |")
    assert lines["| smollm2-svd-llm-fisher-30training-free"].endswith("| - |")
    assert "healing CPU-min (budget)" in (tmp_path / "heal.md").read_text()
    assert (tmp_path / "heal.png").stat().st_size > 0


def test_gpu_table_holds_the_gpu_target(tmp_path):
    text = write(tmp_path / "heal_gpu.json", "cuda")
    lines = table(text)
    assert "<= 1.5x: met" in lines["| smollm2-svd-llm-fisher-30distill"]  # 1.4 against TQ's scale of target
    assert "<= 1.5x: missed" in lines["| smollm2-svd-llm-fisher-30training-free"]
    assert "<= 1.2x: missed" in lines["| smollm2-svd-llm-fisher-10distill"]
    assert "healing CPU-min (process time)" in text


def args(**kw) -> argparse.Namespace:
    base = {"device": "cpu", "kd_steps": 100, "kd_batch": 4, "kd_seq_len": 256, "kd_lr": 2e-4, "kd_eval_every": 25,
            "kd_val_blocks": 16, "kd_topk": 64, "kd_wall_s": 600.0, "eval_reserve_s": 60.0,
            "teacher_cpu_s_per_token": 0.01, "student_cpu_s_per_token": 0.015}
    return argparse.Namespace(**{**base, **kw})


def test_cpu_distillation_is_sized_by_the_cpu_budget_left():
    config = heal.distill_config(600.0, 3600.0, "data", args())
    # 3000 CPU-s left; a step costs 1024 tokens x 0.025 s = 25.6 s: 117 steps, capped at --kd-steps
    assert config.steps == 100 and config.teacher_topk == 64
    reserve = 16 * 256 * 0.01  # one validation of 16 blocks of 256 tokens, after the step that spends the budget
    config = heal.distill_config(3600.0 - reserve - 25.6 * 10, 3600.0, "data", args())
    assert config.steps == 10 and config.eval_every == 10
    config = heal.distill_config(3600.0 - 25.6 * 10, 3600.0, "data", args())
    assert config.steps == 8


@pytest.mark.parametrize("left, expected", [(float("inf"), 600.0), (400.0, 340.0), (70.0, 30.0)])
def test_gpu_distillation_is_sized_by_wall_seconds_and_the_deadline(monkeypatch, left, expected):
    monkeypatch.setattr(heal, "seconds_left", lambda: left)
    config = heal.distill_config(0.0, 3600.0, "data", args(device="cuda", kd_topk=0, kd_steps=1500))
    assert config.steps == 1500 and config.teacher_topk == 0
    assert config.time_budget_s == pytest.approx(expected)


def test_a_rerun_with_full_final_adds_wt2_full_to_a_written_row_and_keeps_the_rest(tmp_path, monkeypatch):
    from torch import nn

    from tensorlm.layers.base import get_forward
    from tensorlm.layers.lowrank import LowRankLinear

    model = nn.Sequential(LowRankLinear(8, 8, rank=2))
    seen = []

    def fake_measure(student, teacher, tokenizer, data_dir, mode="sweep"):
        seen.append((mode, get_forward(student[0])))  # the forward each protocol ran through
        return {"wikitext2_ppl": 30.0, "lambada_acc": 0.25, "sample": " Paris."}

    monkeypatch.setattr(heal, "measure", fake_measure)
    rows = heal.Rows(tmp_path / "heal.json", {"rows": []})
    written = row("smollm2-svd-llm-fisher-30", "distill", 50.0, 4.0, 28.0)
    rows.put(written)
    loaded = argparse.Namespace(model=None, tokenizer=None)
    record = {"cpu_s": 3000.0, "wall_s": 240.0, "fields": {"params": 1000}, "heal": {}}
    heal.measure_phase(rows, loaded, "data", "smollm2-svd-llm-fisher-30", "distill", (model, record), 3600.0)
    assert seen == []  # written, and no full protocol asked for: nothing measured
    heal.measure_phase(rows, loaded, "data", "smollm2-svd-llm-fisher-30", "distill", (model, record), 3600.0,
                       full=True)
    assert seen == [("full", "reconstructed")]  # only the full protocol, at dense speed
    assert get_forward(model[0]) == "factorized"  # the layer's own choice restored
    stored = json.loads((tmp_path / "heal.json").read_text())["rows"]
    assert len(stored) == 1 and {k: v for k, v in stored[0].items() if k != "full"} == written
    assert stored[0]["full"]["wikitext2_ppl"] == 30.0 and "sample" not in stored[0]["full"]
    heal.measure_phase(rows, loaded, "data", "smollm2-svd-llm-fisher-30", "distill", (model, record), 3600.0,
                       full=True)
    assert len(seen) == 1  # measured once
    heal.measure_phase(rows, loaded, "data", "smollm2-svd-llm-fisher-30", "reconstruct", (model, record), 3600.0)
    assert seen[1:] == [("sweep", "reconstructed")] and get_forward(model[0]) == "factorized"
    assert rows.get("smollm2-svd-llm-fisher-30", "reconstruct")["forward"] == "reconstructed"


@pytest.mark.parametrize("other_ppl, shown", [(20.0015, "| 20.67 (causal_lm.json) |"), (20.01, "| - |")])
def test_dense_full_is_borrowed_only_from_a_dense_row_that_agrees(tmp_path, monkeypatch, other_ppl, shown):
    other = {"recipe": "dense", "wikitext2_ppl": other_ppl, "lambada_acc": 0.3, "full": {"wikitext2_ppl": 20.67}}
    monkeypatch.setattr(heal, "causal_lm_dense", lambda: other)
    dense = {"recipe": "dense", "phase": "dense", "params": 2000, "cpu_minutes": 0.0, "wall_minutes": 0.0,
             "wikitext2_ppl": 20.0, "lambada_acc": 0.3, "teacher_kl": 0.0}
    path = tmp_path / "heal.json"
    path.write_text(json.dumps({"protocol": "P.", "machine": "m", "rows": [dense]}))
    assert table(heal.write_outputs(path))["| densedense"].endswith(shown)
    measured = []
    monkeypatch.setattr(heal, "add_full", lambda *a: measured.append(a))
    heal.run_dense(heal.Rows(path, {}), argparse.Namespace(model=None), "data", full=True)
    assert len(measured) == (0 if "causal_lm" in shown else 1)  # measured only when it cannot be borrowed
