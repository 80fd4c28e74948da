"""Streaming compression (tensorlm.stream) from a sharded safetensors checkpoint, and its bad input."""

import contextlib
import io
import json

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tensorlm import stream, surgery
from tensorlm.cli import main
from tensorlm.errors import TensorLMError
from tensorlm.io import load_compressed
from tensorlm.recipe import Recipe
from tensorlm.shards import INDEX, Checkpoint
from tensorlm.stream import compress_streaming
from tensorlm.surgery import compress, plan_recipe
from tests.conftest import DATA, make_tiny_llama

MLP = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj"
RECIPE = {"name": "stream-test", "stages": [
    {"name": "mlp", "method": "lowrank", "targets": [MLP], "options": {"ratio": 0.5}},
    {"name": "q", "method": "kronecker", "targets": ["re:model\\.layers\\.\\d+\\.self_attn\\.q_proj"],
     "options": {"a_shape": [16, 16], "b_shape": [4, 4], "rank": 2}},
    {"name": "embedding", "method": "kronecker_embedding", "targets": ["model.embed_tokens"],
     "options": {"factor": 2, "head": "tie"}},
]}


def sharded(tmp_path, dtype=torch.float32):
    """The tiny tied Llama saved as safetensors shards of at most 40 kB (6 shards), with a tokenizer."""
    model = make_tiny_llama().to(dtype)
    folder = tmp_path / "llama"
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
        model.save_pretrained(folder, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(DATA / "gpt2-tokenizer").save_pretrained(folder)  # any tokenizer will do
    return model, folder


def test_streamed_equals_in_memory_and_reloads_bit_identically(tmp_path):
    dense, folder = sharded(tmp_path)
    shards = set(json.loads((folder / INDEX).read_text())["weight_map"].values())
    assert len(shards) >= 2
    recipe = Recipe.from_dict(RECIPE)
    result = compress_streaming(folder, recipe, tmp_path / "out", progress=False)
    expected = compress(dense, recipe, progress=False)
    assert len(result.module_seconds) == 2 * 3 + 2 + 1  # 6 MLP matrices, 2 q_proj, the table
    streamed = load_compressed(tmp_path / "out").model
    want = expected.state_dict()
    got = streamed.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert type(streamed.lm_head).__name__ == "TiedHead"
    assert streamed.lm_head.embedding is streamed.model.embed_tokens
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        logits = streamed(input_ids=ids).logits  # (2, 9, 256)
        torch.testing.assert_close(logits, expected(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        again = load_compressed(tmp_path / "out").model
        assert torch.equal(again(input_ids=ids).logits, logits)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, got[name]), name


def test_a_bfloat16_checkpoint_stays_bfloat16_and_loads_without_any_initialiser(tmp_path, monkeypatch):
    _, folder = sharded(tmp_path, torch.bfloat16)
    compress_streaming(folder, Recipe.from_dict(RECIPE), tmp_path / "out", progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a weight initialiser ran")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_",
                 "constant_"):
        monkeypatch.setattr(torch.nn.init, name, refuse)
    model = load_compressed(tmp_path / "out").model
    floats = {n: t.dtype for n, t in model.state_dict().items() if t.is_floating_point()}
    assert set(floats.values()) == {torch.bfloat16}
    assert model.model.layers[0].mlp.up_proj.u.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.a.dtype == torch.bfloat16


def test_load_compressed_casts_and_refuses_a_bad_device_before_reading(tmp_path):
    _, folder = sharded(tmp_path, torch.bfloat16)
    compress_streaming(folder, Recipe.from_dict(RECIPE), tmp_path / "out", progress=False)
    model = load_compressed(tmp_path / "out", dtype=torch.float32).model
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.float32}
    with pytest.raises(TensorLMError, match="device"):
        load_compressed(tmp_path / "out", device="tpu:3")


def cli(folder, out, *extra):
    return main(["compress", "--model", str(folder), "--recipe", "smollm2-lowrank-mlp-80", "--out", str(out),
                 *extra])


def test_cli_streams_a_folder_in_its_dtype(tmp_path, capsys):
    _, folder = sharded(tmp_path, torch.bfloat16)
    assert cli(folder, tmp_path / "out") == 0
    assert "modules streamed" in capsys.readouterr().out
    model = load_compressed(tmp_path / "out").model
    assert model.model.layers[1].mlp.down_proj.rank == int(0.8 * 128 * 64 // (128 + 64))
    assert model.model.layers[1].mlp.down_proj.u.dtype == torch.bfloat16


def test_a_shard_missing_from_the_index_is_one_line_and_writes_nothing(tmp_path, capsys):
    _, folder = sharded(tmp_path)
    shard = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))[1]
    (folder / shard).unlink()
    assert cli(folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and shard in err and "do not exist" in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]  # no temporary folder left


def test_a_shard_whose_shapes_disagree_with_the_config_is_one_line(tmp_path, capsys):
    _, folder = sharded(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    assert cli(folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlp" in err and "(128, 64)" in err and "(96, 64)" in err
    assert not (tmp_path / "out").exists()


def test_a_device_that_does_not_exist_is_refused_before_reading(tmp_path, capsys):
    _, folder = sharded(tmp_path)
    for device in ("tpu", "cuda:7"):
        assert cli(folder, tmp_path / "out", "--device", device) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and device in err
    with pytest.raises(TensorLMError, match="cuda"):
        compress_streaming(folder, Recipe.from_dict(RECIPE), tmp_path / "out", device="cuda:7", progress=False)
    assert not (tmp_path / "out").exists()


def test_budget_and_weight_reading_recipes_are_refused_by_the_stream_in_one_line(tmp_path, capsys):
    _, folder = sharded(tmp_path)
    with pytest.raises(TensorLMError, match="allocate a budget"):
        compress_streaming(folder, "smollm2-svd-llm-10", tmp_path / "out", progress=False)
    assert main(["compress", "--model", str(folder), "--recipe", "smollm2-svd-llm-10", "--out",
                 str(tmp_path / "out"), "--stream", "on"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['linear'] allocate a budget" in err
    ratio = {"name": "r", "stages": [{"name": "k", "method": "kronecker", "targets": [MLP], "options": {"ratio": 0.5}}]}
    assert main(["compress", "--model", str(folder), "--recipe", str(recipe_file(tmp_path, ratio)), "--out",
                 str(tmp_path / "out"), "--stream", "on"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compares factor shapes on the weights" in err
    assert not (tmp_path / "out").exists()
    head = {"name": "h", "stages": [{"name": "e", "method": "lowrank_embedding", "targets": ["model.embed_tokens"],
                                     "options": {"rank": 4, "calibration": "frequency-whitened"}}]}
    with pytest.raises(TensorLMError, match="tied head lies outside the transformer blocks"):
        compress_streaming(folder, Recipe.from_dict(head), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def recipe_file(tmp_path, recipe: dict):
    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


WORDS = [f"w{i}" for i in range(250)]


def calibration_folder(tmp_path, monkeypatch):
    """The sharded tiny Llama with a 252-word tokenizer (ids below its vocabulary of 256) and a data folder
    whose ``lm_text`` is random text in those words; the caches go to ``tmp_path``."""
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "cache"))
    dense, folder = sharded(tmp_path)
    vocab = {w: i for i, w in enumerate([*WORDS, "[UNK]", "[EOS]"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="[EOS]")
    tokenizer.save_pretrained(folder)
    gen = torch.Generator().manual_seed(3)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, 250, (90,), generator=gen).tolist()) for _ in range(20)]
    (tmp_path / "data" / "lm_text").mkdir(parents=True)
    (tmp_path / "data" / "lm_text" / "a.txt").write_text("\n\n".join(docs))
    return dense, folder, tokenizer, tmp_path / "data"


LAYER0_MLP = "re:model\\.layers\\.0\\.mlp\\.(gate|up|down)_proj"
CALIBRATED = [
    {"name": "mlp", "method": "lowrank", "targets": [MLP], "options": {"ratio": 0.5, "calibration": "whitened"}},
    {"name": "q", "method": "kronecker", "targets": ["model.layers.0.self_attn.q_proj"],
     "options": {"a_shape": [16, 16], "b_shape": [4, 4], "rank": 2, "calibration": "whitened"}},
    {"name": "o", "method": "lowrank", "targets": ["re:model\\.layers\\.\\d+\\.self_attn\\.o_proj"],
     "options": {"rank": 8}},
    {"name": "embedding", "method": "kronecker_embedding", "targets": ["model.embed_tokens"],
     "options": {"factor": 2, "head": "tie", "calibration": "frequency"}},
]
LAST_BLOCK_PLAIN = [  # calibrated targets in block 0 only: block 1 streams module by module
    {"name": "mlp0", "method": "lowrank", "targets": [LAYER0_MLP], "options": {"rank": 6, "calibration": "whitened"}},
    {"name": "mlp1", "method": "lowrank", "targets": ["re:model\\.layers\\.1\\.mlp\\.(gate|up|down)_proj"],
     "options": {"rank": 6}},
]

BANK = [  # a joint stage: its targets stay dense after their block ran, the bank is built from every G at the end
    {"name": "bank", "method": "tucker_bank", "targets": [MLP],
     "options": {"ranks": [24, 12], "block_size": 32, "calibration": "whitened"}},
]


@pytest.mark.parametrize("stages, blocks", [(CALIBRATED, 2), (LAST_BLOCK_PLAIN, 1), (BANK, 2)])
def test_streamed_calibration_equals_the_in_memory_pass_and_reloads_bit_identically(tmp_path, monkeypatch,
                                                                                     stages, blocks):
    dense, folder, tokenizer, data = calibration_folder(tmp_path, monkeypatch)
    recipe = Recipe.from_dict({"name": "calibrated-stream", "calibration": {"samples": 6, "length": 16, "seed": 0},
                               "stages": stages})
    plan = plan_recipe(dense, recipe)
    want_g = surgery.calibrate(dense, recipe, plan, tokenizer, data_dir=data, progress=False)
    seen_g = {}
    apply = stream.apply_stage

    def spy(model, stage, *, stats=None, stage_plan=None, **kwargs):
        for entry in stage_plan.entries:
            found = (stats or {}).get(entry.name)
            if found is not None:
                seen_g[entry.name] = found if isinstance(found, torch.Tensor) else found.second_moment
        return apply(model, stage, stats=stats, stage_plan=stage_plan, **kwargs)

    monkeypatch.setattr(stream, "apply_stage", spy)
    result = compress_streaming(folder, recipe, tmp_path / "out", progress=False, data_dir=data)
    expected = compress(dense, recipe, progress=False, tokenizer=tokenizer, data_dir=data)
    assert len(result.block_seconds) == blocks
    assert sorted(seen_g) == sorted(want_g) and len(seen_g) >= 3
    for name, g in seen_g.items():
        want = want_g[name] if isinstance(want_g[name], torch.Tensor) else want_g[name].second_moment
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0, msg=name)  # (in, in); (V,) token counts
    streamed = load_compressed(tmp_path / "out").model
    assert sorted(streamed.state_dict()) == sorted(expected.state_dict())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        logits = streamed(input_ids=ids).logits  # (2, 9, 256)
        torch.testing.assert_close(logits, expected(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        plain = compress(dense, Recipe.from_dict({"name": "plain", "stages": [
            {**s, "options": {k: v for k, v in s["options"].items() if k != "calibration"}} for s in stages]}),
            progress=False)
        assert not torch.allclose(plain(input_ids=ids).logits, logits, rtol=1e-3, atol=1e-3)  # calibration mattered
        again = load_compressed(tmp_path / "out").model
        assert torch.equal(again(input_ids=ids).logits, logits)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, streamed.state_dict()[name]), name


def test_a_calibrated_target_outside_the_blocks_is_refused_in_one_line_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "cache"))
    _, folder = sharded(tmp_path)
    head = {"name": "head", "stages": [{"name": "h", "method": "lowrank", "targets": ["lm_head"],
                                        "options": {"rank": 4, "calibration": "whitened"}}]}
    assert main(["compress", "--model", str(folder), "--recipe", str(recipe_file(tmp_path, head)), "--out",
                 str(tmp_path / "out"), "--stream", "on"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['lm_head'] lie outside the transformer blocks (model.layers)" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def compressed_folder(tmp_path, dtype=torch.bfloat16):
    _, folder = sharded(tmp_path, dtype)
    compress_streaming(folder, Recipe.from_dict(RECIPE), tmp_path / "out", progress=False)
    return tmp_path / "out"


@pytest.mark.parametrize("device_map", ["auto", "sequential", {"": "cpu"},
                                        {"model": "cpu", "lm_head": torch.device("cpu")}])
def test_a_device_map_places_every_tensor_once_in_its_saved_dtype_and_computes_the_plain_load(
        tmp_path, monkeypatch, device_map):
    out = compressed_folder(tmp_path)
    ids = torch.randint(0, 256, (2, 7))
    plain = load_compressed(out).model
    reads = []
    read = Checkpoint.read

    def counted(self, name, *args, **kwargs):
        reads.append(name)
        return read(self, name, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", counted)
    mapped = load_compressed(out, device_map=device_map).model
    assert sorted(reads) == sorted(Checkpoint(out / "model.safetensors").files)  # each saved tensor read once
    assert set(mapped.hf_device_map.values()) == {"cpu"}
    floats = {t.dtype for t in mapped.state_dict().values() if t.is_floating_point()}
    assert floats == {torch.bfloat16}
    assert mapped.lm_head.embedding is mapped.model.embed_tokens  # the tied head stays tied
    with torch.no_grad():
        assert torch.equal(mapped(input_ids=ids).logits, plain(input_ids=ids).logits)  # (2, 7, 256)


def test_bad_device_maps_are_one_line_and_an_unknown_device_is_refused_before_reading(tmp_path, monkeypatch):
    out = compressed_folder(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = [
        (dict(device="cpu", device_map="auto"), "not both"),
        (dict(device_map={"": "tpu"}), "'': 'tpu' is not a device of this machine; choose 'cpu'"),
        (dict(device_map={"model.layers": f"cuda:{gpus}", "": "cpu"}), f"'cuda:{gpus}' is not a device"),
        (dict(device_map={"": "disk"}), "'disk' is not a device"),
        (dict(device_map="fastest"), "neither one of ['auto', 'balanced', 'balanced_low_0', 'sequential']"),
        (dict(device_map={}), "non-empty mapping"),
        (dict(device_map={"model.nothing": "cpu", "": "cpu"}), "['model.nothing'], which are not modules"),
        (dict(device_map={"lm_head": "cpu"}), "places no module holding ['model.layers.0.self_attn.q_proj.a'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TensorLMError) as info:
            load_compressed(out, **kwargs)
        assert "\n" not in str(info.value) and message in str(info.value), str(info.value)
