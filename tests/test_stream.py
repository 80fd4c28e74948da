"""Streaming compression (tensorlm.stream) from a sharded safetensors checkpoint, and its bad input."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from tensorlm.cli import main
from tensorlm.errors import TensorLMError
from tensorlm.io import load_compressed
from tensorlm.recipe import Recipe
from tensorlm.shards import INDEX
from tensorlm.stream import compress_streaming
from tensorlm.surgery import compress
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


def test_calibrated_and_budget_recipes_are_refused_by_the_stream(tmp_path, capsys):
    _, folder = sharded(tmp_path)
    with pytest.raises(TensorLMError, match="calibrat"):
        compress_streaming(folder, "smollm2-svd-llm-10", tmp_path / "out", progress=False)
    assert main(["compress", "--model", str(folder), "--recipe", "smollm2-svd-llm-10", "--out",
                 str(tmp_path / "out"), "--stream", "on"]) == 2
    assert "calibrated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
