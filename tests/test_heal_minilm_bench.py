"""``benchmarks/heal_minilm.py``: the Markdown and PNG are rebuilt from the JSON alone (no model is loaded).

A row meets its target when STS-B test reaches it within the CPU budget; ``x dense`` is against the dense
row of the same file; a smoke run (``max_pairs``) says so; the phase folders are keyed by the healing settings.
"""

from __future__ import annotations

import json

from benchmark_scripts import benchmark_script

heal_minilm = benchmark_script("heal_minilm")


def row(recipe: str, phase: str, cpu: float, stsb: float) -> dict:
    heal = {p: {"load_before": 1.0, "load_after": 2.0} for p in ("reconstruct", "distill")}
    return {"recipe": recipe, "phase": phase, "params": 1000, "cpu_minutes": cpu, "wall_minutes": cpu / 2,
            "budget_cpu_minutes": 30.0, "target_stsb": heal_minilm.target(recipe), "stsb": stsb, "sickr": 0.7,
            "heal": heal}


def test_render_and_plot(tmp_path):
    rows = [row("minilm-kronecker-ffn", "training-free", 0.0, 0.75),
            row("minilm-kronecker-ffn", "reconstruct", 8.0, 0.80),
            row("minilm-kronecker-ffn", "distill", 29.0, 0.816),
            row("tucker-bank-1x7", "distill", 31.0, 0.80),
            {"recipe": "dense", "phase": "dense", "params": 2000, "cpu_minutes": 0.0, "wall_minutes": 0.0,
             "stsb": 0.82, "sickr": 0.77}]
    path = tmp_path / "heal_minilm.json"
    path.write_text(json.dumps({"protocol": "Protocol.", "machine": "a test machine", "max_pairs": None,
                                "rows": rows}))
    text = heal_minilm.write_outputs(path)
    lines = {line.split(" | ")[0] + line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| ")}
    assert ">= 0.815: met" in lines["| minilm-kronecker-ffndistill"]
    assert ">= 0.815: missed" in lines["| minilm-kronecker-ffnreconstruct"]
    assert ">= 0.793: missed" in lines["| tucker-bank-1x7distill"]  # above the target, but over the budget
    assert "| 0.995 |" in lines["| minilm-kronecker-ffndistill"]  # 0.816 / 0.82
    assert "Smoke run" not in text
    assert (tmp_path / "heal_minilm.png").stat().st_size > 0

    data = json.loads(path.read_text())
    data["max_pairs"] = 100
    path.write_text(json.dumps(data))
    assert "Smoke run: only the first 100 test pairs" in heal_minilm.write_outputs(path)


def test_phase_folders_keyed_by_settings():
    saved = dict(heal_minilm.SETTINGS)
    try:
        heal_minilm.SETTINGS.clear()
        heal_minilm.SETTINGS.update({"rec_steps": 300})
        full = heal_minilm.phase_key("tucker-bank-1x48")
        heal_minilm.SETTINGS["rec_steps"] = 3
        assert heal_minilm.phase_key("tucker-bank-1x48") != full
        assert full.startswith("minilm/tucker-bank-1x48-")
    finally:
        heal_minilm.SETTINGS.clear()
        heal_minilm.SETTINGS.update(saved)
