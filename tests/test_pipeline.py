import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tensorlm import Recipe, load_compressed
from tensorlm.cli import main
from tensorlm.evaluate import CAUSAL_PROTOCOLS, CausalProtocol
from tensorlm.pipeline import run

DATA = Path(os.environ.get("TENSORLM_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DATA / "gpt2-tokenizer").save_pretrained(folder)
    return folder


def test_two_stage_run_distills_after_each_stage_and_reports_it(tiny_gpt2_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(CAUSAL_PROTOCOLS, "quick", CausalProtocol("tiny", 512, 8, 2))  # keep the test short
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("\n\n".join(f"Document {i}. " + "The quick brown fox jumps. " * 40
                                            for i in range(30)))
    distill = {"steps": 2, "batch_size": 2, "seq_len": 32, "warmup": 0, "eval_every": 1, "save_every": 1,
               "val_size": 2, "text_dir": str(text)}
    recipe = Recipe.from_dict({"name": "tiny-two-stage", "stages": [
        {"name": "embedding", "method": "kronecker_embedding", "targets": ["transformer.wte"],
         "options": {"head": "tie"}, "distill": distill},
        {"name": "mlp", "method": "lowrank", "targets": ["re:.*mlp\\.c_fc"], "options": {"rank": 4},
         "distill": distill},
    ]})
    out = tmp_path / "run"
    results = run(str(tiny_gpt2_folder), recipe, out, data_dir=DATA, eval_mode="quick")
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["before"].keys() == saved["metrics"]["after"].keys() == {"wikitext2_ppl", "lambada_acc",
                                                                                       "lambada_ppl"}
    assert saved["metrics"]["agreement"]["teacher_kl"] >= 0 and "held-out lm_text" in saved["protocols"]["teacher_kl"]
    assert saved["samples"]["prompt"] == "The capital of France is" and "Greedy continuation" in (
        out / "report.md").read_text()
    assert [s["name"] for s in saved["stages"]] == ["embedding", "mlp"]
    assert all(s["distill"]["steps"] == 2 and "wikitext2_ppl" in s["metrics"] for s in saved["stages"])
    assert saved["params"]["after"]["total"] < saved["params"]["before"]["total"]
    assert {"distill-embedding.jsonl", "distill-mlp.jsonl", "report.md", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert "## Stages" in (out / "report.md").read_text()
    assert not Path(f"{out}.partial").exists()
    assert results.compression["model_ratio"] > 1
    # the saved model is the distilled one
    loaded = load_compressed(out)
    assert loaded.kind == "causal-lm"


def test_cli_bad_inputs_exit_2_with_one_line(tiny_gpt2_folder, tmp_path, capsys):
    assert main(["run", "--model", "no/such-model-anywhere", "--out", str(tmp_path / "x"), "--eval", "none",
                 "--data-dir", str(DATA)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tensorlm: error: cannot resolve model 'no/such-model-anywhere'")
    assert sum(line.startswith("tensorlm: error") for line in err) == 1
    (tmp_path / "exists").mkdir()
    assert main(["run", "--model", str(tiny_gpt2_folder), "--out", str(tmp_path / "exists"), "--eval", "none",
                 "--data-dir", str(DATA)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["run", "--model", str(tiny_gpt2_folder), "--recipe", "minilm-kronecker-ffn", "--eval", "none",
                 "--out", str(tmp_path / "y"), "--data-dir", str(DATA)]) == 2
    assert "matches no module" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))


def test_cli_compress_then_inspect(tiny_gpt2_folder, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: lowrank\n    targets: ['re:.*attn\\.c_proj']\n    options: {rank: 3}\n")
    assert main(["compress", "--recipe", str(recipe), "--model", str(tiny_gpt2_folder),
                 "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c")]) == 0
    shown = capsys.readouterr().out
    assert "transformer.h.1.attn.c_proj: LowRankLinear" in shown and "tied" in shown


def test_calibrated_budget_run_prints_and_records_the_allocated_plan(tiny_gpt2_folder, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "lm_text").mkdir(parents=True)
    (data / "lm_text" / "a.txt").write_text("\n\n".join(f"Document {i}. " + "A quick brown fox jumps over it. " * 30
                                                        for i in range(40)))
    recipe = Recipe.from_dict({"name": "tiny-calibrated", "calibration": {"samples": 8, "length": 64},
                               "stages": [{"name": "linear", "method": "lowrank",
                                           "targets": ["re:.*(attn|mlp)\\.c_(attn|proj|fc)"],
                                           "options": {"ratio": 0.5, "calibration": "whitened"},
                                           "budget": {"ratio": 0.4}}]})
    results = run(str(tiny_gpt2_folder), recipe, tmp_path / "run", data_dir=data, eval_mode="none")
    entries = [e for s in results.plan["stages"] for e in s["entries"]]
    assert sum(e["params_after"] for e in entries) <= 0.4 * sum(e["params_before"] for e in entries)
    assert results.plan["params_after"] == results.params["after"]["total"]  # the printed total is the model's
    assert results.calibration["tokens"] == 8 * 64 and results.seconds["calibrate"] > 0
    assert "model parameters:" in capsys.readouterr().err  # the plan was printed before decomposing
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["recipe"]["calibration"] == {"samples": 8, "length": 64, "seed": 0, "count_samples": None}
    assert saved["recipe"]["stages"][0]["budget"]["ratio"] == 0.4
