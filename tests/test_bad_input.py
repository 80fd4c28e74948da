"""Bad input, as a new user would give it: one line, a non-zero exit, and nothing changed on disk.

Each family of issue 13 (recipe, model folder, compressed folder, output path, distill config, signals)
is a parametrized test asserting the exit code, a single-line message naming the cause, and that the
input model and any existing output are byte-identical afterwards (and no temporary folder is left).
"""

import json
import os
import signal
import stat

import pytest
import torch
import yaml
from conftest import DATA, make_tiny_gpt2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import tensorlm
from tensorlm import cli
from tensorlm.errors import TensorLMError
from tensorlm.io import load_compressed
from tensorlm.recipe import Recipe, builtin_recipes

STAGE = {"name": "mlp", "method": "lowrank", "targets": ["re:transformer\\.h\\.\\d+\\.mlp\\.c_fc"],
         "options": {"rank": 2}}


def snapshot(folder):
    """``{relative path: bytes}`` of every file under ``folder`` (and the folder names)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A tiny GPT-2 Hugging Face folder with its tokenizer, a recipe file, and the cwd inside tmp_path."""
    model_dir = tmp_path / "models" / "tiny"
    make_tiny_gpt2(vocab_size=50257).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(DATA / "gpt2-tokenizer").save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "stages": [STAGE]}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path, model_dir, recipe


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code, err, expected_code, *words):
    assert code == expected_code, err
    lines = err.replace("\r", "\n").splitlines()
    ours = [line for line in lines if line.startswith("tensorlm:")]
    assert len(ours) == 1 and lines[-1] == ours[0], err
    assert not any("%|" in line or "it/s]" in line for line in lines), err  # no progress bar off a terminal
    assert "Traceback" not in err
    for word in words:
        assert word in ours[0], (word, err)


def recipe_with(**stage_changes):
    stage = {**STAGE, **stage_changes}
    return {"name": "bad", "stages": [{k: v for k, v in stage.items() if v is not None}]}


RECIPES = {
    "unknown top-level key": ({**recipe_with(), "stagez": []}, ["stagez", "valid"]),
    "targets as a string": (recipe_with(targets="re:transformer.*"), ["targets", "list"]),
    "options as a list": (recipe_with(options=[2]), ["options", "mapping"]),
    "negative rank": (recipe_with(options={"rank": -2}), ["rank", ">= 1"]),
    "rank as a string": (recipe_with(options={"rank": "4"}), ["rank", "int"]),
    "invalid regex": (recipe_with(targets=["re:transformer.(h"]), ["regex"]),
    "unknown method": (recipe_with(method="svd"), ["svd", "lowrank"]),
    "kronecker shape as a string": (recipe_with(method="kronecker", options={"a_shape": "2x3", "b_shape": [2, 2]}),
                                    ["a_shape"]),
    "kronecker shape with three sides": (recipe_with(method="kronecker", options={"a_shape": [2, 2, 2],
                                                                                  "b_shape": [2, 2]}),
                                         ["a_shape", "two sides"]),
    "kronecker negative rank": (recipe_with(method="kronecker", options={"a_shape": [64, 16], "b_shape": [2, 2],
                                                                         "rank": -1}), ["rank", ">= 1"]),
    "typo in a distill block": (recipe_with(distill={"stepz": 10}), ["distill", "stepz"]),
    "distill block not a mapping": (recipe_with(distill=[1, 2]), ["distill", "mapping"]),
    "stage not a mapping": ({"stages": ["lowrank"]}, ["stage 0", "mapping"]),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipes_are_refused_in_one_line_before_any_work(work, capsys, case):
    tmp_path, model_dir, recipe = work
    data, words = RECIPES[case]
    recipe.write_text(yaml.safe_dump(data))
    before = snapshot(model_dir)
    code, err = run_cli(capsys, "compress", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "out")
    assert_one_line(code, err, 2, *words)
    assert snapshot(model_dir) == before
    assert not (tmp_path / "out").exists()
    with pytest.raises(TensorLMError):
        Recipe.from_dict(data)


def _not_json(folder):
    (folder / "config.json").write_text("{not json")


def _no_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _nan_outside_targets(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.ln_f.weight"][3] = float("nan")  # a norm: never a compression target
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


MODEL_FOLDERS = {
    "config.json not JSON": (_not_json, ["config.json", "JSON"]),
    "no tokenizer files": (_no_tokenizer, ["tokenizer"]),
    "NaN in a weight that is not targeted": (_nan_outside_targets, ["transformer.ln_f.weight", "NaN"]),
    "config without weights": (_no_weights, ["no weights"]),
}


@pytest.mark.parametrize("case", sorted(MODEL_FOLDERS))
def test_bad_model_folders_are_refused(work, capsys, case):
    tmp_path, model_dir, recipe = work
    damage, words = MODEL_FOLDERS[case]
    damage(model_dir)
    before = snapshot(model_dir)
    for argv in (["evaluate", "--model", model_dir, "--eval", "quick"],
                 ["compress", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "out"]):
        code, err = run_cli(capsys, *argv)
        assert_one_line(code, err, 2, *words)
    assert snapshot(model_dir) == before and not (tmp_path / "out").exists()


@pytest.fixture
def compressed(work, capsys):
    tmp_path, model_dir, recipe = work
    out = tmp_path / "small"
    assert run_cli(capsys, "compress", "--recipe", recipe, "--model", model_dir, "--out", out)[0] == 0
    return out


def _truncate_manifest(folder):
    text = (folder / "tensorlm.json").read_text()
    (folder / "tensorlm.json").write_text(text[: len(text) // 2])


def _manifest_missing_key(folder):
    manifest = json.loads((folder / "tensorlm.json").read_text())
    del manifest["modules"]
    (folder / "tensorlm.json").write_text(json.dumps(manifest))


COMPRESSED_FOLDERS = {
    "truncated tensorlm.json": (_truncate_manifest, ["tensorlm.json", "JSON"]),
    "tensorlm.json missing a key": (_manifest_missing_key, ["tensorlm.json", "modules"]),
    "config.json not JSON": (_not_json, ["config.json", "JSON"]),
}


@pytest.mark.parametrize("case", sorted(COMPRESSED_FOLDERS))
def test_damaged_compressed_folders_are_refused(compressed, capsys, case):
    damage, words = COMPRESSED_FOLDERS[case]
    damage(compressed)
    before = snapshot(compressed)
    code, err = run_cli(capsys, "inspect", compressed)
    assert_one_line(code, err, 2, *words)
    assert snapshot(compressed) == before


OUTPUTS = {
    "the input model folder": (lambda t, m: m, ["input"]),
    "a parent of the input": (lambda t, m: m.parent, ["input"]),
    "the current directory": (lambda t, m: t / "cwd", ["current directory"]),
    "a folder tensorlm did not write": (lambda t, m: t / "mine", ["not written by tensorlm"]),
    "a file": (lambda t, m: t / "notes.txt", ["is a file"]),
}


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_overwrite_never_replaces_what_tensorlm_did_not_write(work, capsys, case):
    tmp_path, model_dir, recipe = work
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "cwd" / "keep.txt").write_text("keep")
    out_of, words = OUTPUTS[case]
    out = out_of(tmp_path, model_dir)
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "compress", "--recipe", recipe, "--model", model_dir, "--out", out, "--overwrite")
    assert_one_line(code, err, 2, *words)
    assert snapshot(tmp_path) == before


def test_existing_output_refused_before_compressing(work, capsys, monkeypatch):
    tmp_path, model_dir, recipe = work
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before the refusal"))
    code, err = run_cli(capsys, "compress", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "out")
    assert_one_line(code, err, 2, "already exists", "--overwrite")


def test_overwrite_replaces_a_tensorlm_folder_atomically_and_follows_the_umask(compressed, capsys, work):
    tmp_path, model_dir, recipe = work
    (compressed / "stale.txt").write_text("from the previous run")
    old_mask = os.umask(0o027)
    try:
        code, err = run_cli(capsys, "compress", "--recipe", recipe, "--model", model_dir, "--out", compressed,
                            "--overwrite")
    finally:
        os.umask(old_mask)
    assert code == 0, err
    assert not (compressed / "stale.txt").exists()
    assert stat.S_IMODE(compressed.stat().st_mode) == 0o750
    assert stat.S_IMODE((compressed / "model.safetensors").stat().st_mode) == 0o640
    assert leftovers(tmp_path) == []
    load_compressed(compressed)


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGTERM"])
def test_interrupts_leave_no_temporary_folder_and_one_line(work, capsys, monkeypatch, how):
    tmp_path, model_dir, recipe = work
    real = cli.save_compressed.__globals__["write_compressed"]

    def interrupted(model, folder, **kwargs):
        real(model, folder, **kwargs)  # the temporary folder is full when the signal comes
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.save_compressed.__globals__, "write_compressed", interrupted)
    code, err = run_cli(capsys, "compress", "--recipe", recipe, "--model", model_dir, "--out", tmp_path / "out")
    assert_one_line(code, err, 143 if how == "SIGTERM" else 130, "tensorlm: interrupted")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


DISTILL = {
    "--steps 0": (None, ["--steps", "0"], ["--steps 0"]),
    "config not a mapping": ("[1, 2]", [], ["mapping"]),
    "config with a typo": ("stepz: 3\n", [], ["stepz"]),
    "config not YAML": ("a: [1,\n", [], ["YAML"]),
    "config missing": ("MISSING", [], ["distill config"]),
}


@pytest.mark.parametrize("case", sorted(DISTILL))
def test_bad_distill_settings_are_refused(compressed, work, capsys, case):
    tmp_path, model_dir, recipe = work
    text, extra, words = DISTILL[case]
    config = tmp_path / "distill.yaml"
    if text is not None and text != "MISSING":
        config.write_text(text)
    args = ["--config", config] if text is not None else []
    before = snapshot(compressed)
    code, err = run_cli(capsys, "distill", "--student", compressed, "--teacher", model_dir, "--out",
                        tmp_path / "distilled", *args, *extra)
    assert_one_line(code, err, 2, *words)
    assert snapshot(compressed) == before and not (tmp_path / "distilled").exists()


def test_plain_transformers_refuses_a_compressed_folder_and_loads_its_dense_export(compressed, work, capsys):
    tmp_path, model_dir, recipe = work
    with pytest.raises(ValueError, match="tensorlm.load_compressed"):
        AutoModel.from_pretrained(compressed)
    assert "tensorlm.load_compressed" in (compressed / "README.md").read_text()
    code, err = run_cli(capsys, "export", compressed, "--dense", tmp_path / "dense")
    assert code == 0, err
    small = load_compressed(compressed).model
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, small(ids).logits, atol=1e-5, rtol=0)


def test_old_folders_still_load():
    for name in ("gpt2-kron", "gpt2-tt"):
        assert load_compressed(os.path.join(os.path.dirname(__file__), "fixtures", name)).model is not None


def test_version_recipes_show_and_inspect_json(compressed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("tensorlm ")
    name = builtin_recipes()[0]
    assert cli.main(["recipes", "--show", name]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == Recipe.load(name).name
    code, err = run_cli(capsys, "recipes", "--show", "nope")
    assert_one_line(code, err, 2, "nope", "built-ins")
    assert cli.main(["inspect", str(compressed), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["params"]["total"] > 0 and table["modules"]


# ---------------------------------------------------------------- property: the validator never crashes

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["lowrank", "kronecker", "tt_linear", "tucker_bank",
                                                          "re:h\\.\\d+", "re:(", "odd", "1-3", "2x3"]))
KEYS = st.sampled_from(["name", "method", "targets", "options", "distill", "budget", "stages", "rank", "ratio",
                        "a_shape", "b_shape", "shapes", "ranks", "eps", "shape", "head", "factor", "permute",
                        "match", "layers", "steps", "lr", "stagez", "model", "description", "calibration"])
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=5)), max_leaves=20)
STAGES = st.fixed_dictionaries({"method": st.sampled_from(["lowrank", "kronecker", "kronecker_embedding",
                                                           "tt_embedding", "tt_linear", "tucker_bank"]),
                                "targets": VALUES}, optional={"options": st.dictionaries(KEYS, VALUES, max_size=4),
                                                              "name": VALUES, "distill": VALUES, "bogus": VALUES})
RECIPE_DATA = st.one_of(VALUES, st.fixed_dictionaries({"stages": st.one_of(st.lists(STAGES, max_size=3), VALUES)},
                                                      optional={"name": VALUES, "model": VALUES, "stagez": VALUES}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECIPE_DATA)
def test_random_recipes_give_a_recipe_or_a_tensorlm_error(data):
    try:
        recipe = Recipe.from_dict(data)
    except TensorLMError as err:
        message = str(err)
        assert message.strip() and "\n" not in message, repr(message)  # one non-empty line
        return
    assert recipe.stages and all(s.targets for s in recipe.stages)
    Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))  # what it saves loads again


SIDES = st.one_of(st.integers(-3, 130), st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128]))
SHAPES = st.one_of(st.tuples(SIDES, SIDES).map(list), st.lists(SIDES, max_size=3), st.text(max_size=4), st.none())
FACTORS = st.fixed_dictionaries({"a_shape": SHAPES, "b_shape": SHAPES},
                                optional={"rank": st.one_of(st.integers(-2, 5000), st.text(max_size=2), st.floats())})
TINY_GPT2 = make_tiny_gpt2()  # c_fc: (out, in) = (128, 32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FACTORS)
def test_random_kronecker_factor_shapes_plan_or_give_a_tensorlm_error(options):
    data = {"name": "k", "stages": [{"name": "s", "method": "kronecker", "options": options,
                                     "targets": ["re:transformer\\.h\\.\\d+\\.mlp\\.c_fc"]}]}
    try:
        plan = tensorlm.plan(TINY_GPT2, Recipe.from_dict(data))
    except TensorLMError as err:
        message = str(err)
        assert message.strip() and "\n" not in message, repr(message)
        return
    (a1, a2), (b1, b2) = options["a_shape"], options["b_shape"]
    assert a1 * b1 == 128 and a2 * b2 == 32  # only shapes that divide the weight are planned
    assert plan.to_dict()  # and the plan serialises
