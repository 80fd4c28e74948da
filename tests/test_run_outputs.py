"""Issue 13's remaining joints: checks before loading (stale .partial, data files, device), NaN never in
JSON, random weights stated, growth as growth, the sentence-transformers export and a card with metrics."""

import json
import math

import pytest
import torch
import yaml
from conftest import DATA, make_tiny_gpt2
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tensorlm import cli, pipeline
from tensorlm.errors import TensorLMError
from tensorlm.io import model_card
from tensorlm.models import expected_kind, minilm_folder
from tensorlm.params import GROUPS
from tensorlm.pipeline import RunResults
from tensorlm.preflight import check_device, check_work_folder
from tensorlm.report import null_non_finite, ratio_phrase, render, results_dict, results_json

STAGE = {"name": "mlp", "method": "lowrank", "targets": ["re:transformer\\.h\\.\\d+\\.mlp\\.c_fc"],
         "options": {"rank": 2}}


@pytest.fixture
def work(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    make_tiny_gpt2(vocab_size=50257).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(DATA / "gpt2-tokenizer").save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "stages": [STAGE]}))
    monkeypatch.chdir(tmp_path)
    return tmp_path, model_dir, recipe


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")
    monkeypatch.setattr(pipeline, "load_model", refuse)
    monkeypatch.setattr(cli, "load_model", refuse)


def one_line(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return code, err


def results_with(**changes) -> RunResults:
    results = RunResults("tiny", "causal-lm", {"name": "r", "description": "d", "stages": []}, "quick")
    groups = dict.fromkeys(GROUPS, 0)
    results.params = {"before": {"total": 10, "groups": groups, "tied_head": None},
                      "after": {"total": 15, "groups": groups, "tied_head": None}}
    results.compression = {"model_ratio": 10 / 15}
    results.seconds = {"compress": 1.0}
    for key, value in changes.items():
        setattr(results, key, value)
    return results


def test_a_stale_partial_is_refused_before_loading_and_restart_discards_it(work, capsys, no_loading):
    tmp_path, model_dir, recipe = work
    stale = tmp_path / "out.partial" / "distill-mlp"
    stale.mkdir(parents=True)
    (stale / "checkpoint.json").write_text("{}")
    code, err = one_line(capsys, "run", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "out",
                         "--eval", "none")
    assert code == 2 and "--resume" in err and "--restart" in err and "resume=True" not in err
    assert stale.exists()
    code, err = one_line(capsys, "run", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "out",
                         "--eval", "none", "--resume", "--restart")
    assert code == 2 and "one of them" in err
    with pytest.raises(AssertionError, match="loaded before"):  # the checks pass: loading is next
        cli.main(["run", "--recipe", str(recipe), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                  "--eval", "none", "--restart"])
    assert not (tmp_path / "out.partial").exists()


def test_restart_never_deletes_a_folder_tensorlm_did_not_write(tmp_path):
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(TensorLMError, match="did not write"):
        check_work_folder(work, resume=False, restart=True)
    assert (work / "notes.txt").read_text() == "mine"
    check_work_folder(tmp_path / "absent.partial", resume=False, restart=False)  # nothing in the way


def test_missing_benchmark_files_are_refused_before_loading(work, capsys, no_loading, tmp_path):
    _, model_dir, recipe = work
    empty = tmp_path / "data"
    empty.mkdir()
    code, err = one_line(capsys, "run", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "o",
                         "--eval", "quick", "--data-dir", empty)
    assert code == 2 and "wiki.test.raw" in err and "--eval none" in err
    assert expected_kind(model_dir) == "causal-lm" and expected_kind("all-MiniLM-L6-v2") == "encoder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_in_one_line_before_loading(work, capsys, no_loading, tmp_path):
    _, model_dir, recipe = work
    for command in (["run", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "o", "--eval", "none"],
                    ["compress", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "o"],
                    ["evaluate", "--model", model_dir]):
        code, err = one_line(capsys, *command, "--device", "cuda:1")
        assert code == 2 and "cuda:1" in err and "--device cpu" in err
    with pytest.raises(TensorLMError, match="cpu, cuda or cuda:N"):
        check_device("gpu")
    assert check_device("cpu") == torch.device("cpu") and check_device(None) is None


def test_compress_on_cpu_with_a_seed_is_reproducible(work, capsys, tmp_path):
    _, model_dir, recipe = work
    for out in ("a", "b"):
        assert cli.main(["compress", "--recipe", str(recipe), "--model", str(model_dir), "--out", str(tmp_path / out),
                         "--device", "cpu", "--seed", "3"]) == 0
    a, b = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_metrics_are_null_with_a_reason_and_json_refuses_nan():
    results = results_with(metrics={"before": {"wikitext2_ppl": 30.0}, "after": {"wikitext2_ppl": math.nan},
                                    "agreement": {"teacher_kl": math.inf}})
    text = results_json(results)
    assert "NaN" not in text and "Infinity" not in text
    saved = json.loads(text)
    assert saved["metrics"]["after"]["wikitext2_ppl"] is None and saved["metrics"]["agreement"]["teacher_kl"] is None
    assert set(saved["metrics_notes"]) == {"metrics.after.wikitext2_ppl", "metrics.agreement.teacher_kl"}
    assert "non-finite" in saved["metrics_notes"]["metrics.after.wikitext2_ppl"]
    report = render(results)
    assert "| wikitext2_ppl | 30.0000 | - | - |" in report  # the table shows no nan
    assert "`metrics.after.wikitext2_ppl` is missing" in report
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)  # what the writers use
    clean, notes = null_non_finite([1.0, {"a": -math.inf}])
    assert clean == [1.0, {"a": None}] and list(notes) == ["[1].a"]


def test_random_weights_are_stated_in_results_and_near_the_top_of_the_report():
    results = results_with(random_weights=True, notes=["offline: GPT-2 small architecture with random weights"])
    assert results_dict(results)["random_weights"] is True
    lines = render(results).splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith("**Notes:**")]
    assert notes and notes[0] <= 3 and "RANDOM" in lines[notes[0]]
    assert results_dict(results_with())["random_weights"] is False
    assert not any(line.startswith("**Notes:**") for line in render(results_with()).splitlines())


def test_growth_is_reported_as_growth():
    assert ratio_phrase(1 / 1.49) == "1.490x larger" and ratio_phrase(2.0) == "2.000x smaller"
    assert "1.500x larger" in render(results_with()) and "smaller" not in render(results_with())


def test_the_model_card_gives_recipe_parameters_and_metrics_with_protocols():
    manifest = {"architecture": "GPT2LMHeadModel", "modules": [{}], "params": {"total": 100, "stored": 100},
                "recipe": {"name": "r", "description": "a recipe", "stages": [{"name": "s", "method": "lowrank",
                                                                                 "targets": ["x"]}]}, "notes": []}
    results = {"eval_mode": "quick", "metrics": {"before": {"wikitext2_ppl": 30.0}, "after": {"wikitext2_ppl": None},
                                                  "agreement": {"teacher_kl": 0.25}},
               "protocols": {"wikitext2_ppl": "wt2-4k sliding", "teacher_kl": "KL held-out"},
               "metrics_notes": {"metrics.after.wikitext2_ppl": "could not be computed"}, "random_weights": True}
    card = model_card(manifest, results)
    assert "Recipe: `r`" in card and "Parameters: 100" in card
    assert "| wikitext2_ppl | 30.0000 | - | wt2-4k sliding |" in card
    assert "| teacher_kl | - | 0.2500 | KL held-out |" in card
    assert "could not be computed" in card and "partly random" in card
    assert "results.json" in model_card(manifest)  # without results it points to them


@pytest.mark.skipif(minilm_folder() is None, reason="the packaged all-MiniLM-L6-v2 is not installed")
def test_dense_export_of_an_encoder_is_a_sentence_transformers_folder(tmp_path, capsys):
    out = tmp_path / "minilm-dense"
    assert cli.main(["export", "all-MiniLM-L6-v2", "--dense", str(out)]) == 0
    modules = json.loads((out / "modules.json").read_text())
    assert [(m["path"], m["type"]) for m in modules] == [("", "sentence_transformers.models.Transformer"),
                                                         ("1_Pooling", "sentence_transformers.models.Pooling")]
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 384 and pooling["pooling_mode_mean_tokens"] is True
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
