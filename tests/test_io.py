import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, configuration_utils

from tensorlm import Recipe, compress, count_parameters, load_compressed, save_compressed
from tensorlm.errors import TensorLMError

DATA = Path(os.environ.get("TENSORLM_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))

RECIPE = Recipe.from_dict({"name": "tiny", "stages": [
    {"name": "emb", "method": "kronecker_embedding", "targets": ["transformer.wte"], "options": {"head": "tie"}},
    {"name": "emb2", "method": "kronecker_embedding", "targets": ["transformer.wte.table"], "options": {}},
    {"name": "mlp", "method": "kronecker", "targets": [{"match": "re:.*mlp\\.c_fc", "layers": "odd"}],
     "options": {"a_shape": [64, 16], "b_shape": [2, 2], "rank": 2}},
    {"name": "attn", "method": "lowrank", "targets": ["re:.*attn\\.c_proj"], "options": {"rank": 5}},
]})


@pytest.fixture
def compressed():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()
    tokenizer = AutoTokenizer.from_pretrained(DATA / "gpt2-tokenizer")
    small = compress(model, RECIPE, progress=False)
    # permutations travel with the layer: give one a random pair
    layer = small.transformer.h[1].mlp.c_fc
    layer.row_perm, layer.col_perm = torch.randperm(128), torch.randperm(32)
    return small, tokenizer


def test_save_load_gives_bit_identical_outputs(compressed, tmp_path):
    small, tokenizer = compressed
    folder = save_compressed(small, tmp_path / "out", tokenizer=tokenizer, kind="causal-lm", recipe=RECIPE)
    assert {"model.safetensors", "tensorlm.json", "config.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}
    loaded = load_compressed(folder)
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        assert torch.equal(small(ids).logits, loaded.model(ids).logits)
    assert count_parameters(loaded.model) == count_parameters(small)
    assert loaded.kind == "causal-lm" and loaded.tokenizer("Hello world").input_ids == [15496, 995]
    assert torch.equal(loaded.model.transformer.h[1].mlp.c_fc.row_perm, small.transformer.h[1].mlp.c_fc.row_perm)


def test_a_generic_tokenizer_loads_without_reading_the_guarded_config(tmp_path, monkeypatch):
    """A tokenizer saved as transformers' generic ``TokenizersBackend`` (as GGUF models' are) makes
    ``AutoTokenizer`` look for a config: it gets the base one, not the guarded ``config.json`` (whose unknown
    model type made transformers warn on every load)."""
    table = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2}, unk_token="<unk>"))
    table.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=table, unk_token="<unk>")
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=3))
    folder = save_compressed(model, tmp_path / "out", tokenizer=tokenizer, kind="causal-lm")
    warned = []
    monkeypatch.setattr(configuration_utils.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    loaded = load_compressed(folder)
    assert loaded.tokenizer("hello world").input_ids == [0, 1]
    assert not [m for m in warned if "model of type" in m]


def test_existing_output_folder_is_refused(compressed, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(TensorLMError, match="already exists"):
        save_compressed(compressed[0], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_corrupted_missing_and_mismatched_folders_are_refused(compressed, tmp_path):
    folder = save_compressed(compressed[0], tmp_path / "out")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TensorLMError, match="corrupted"):
        load_compressed(folder)
    weights.unlink()
    with pytest.raises(TensorLMError, match="model.safetensors is missing"):
        load_compressed(folder)

    folder = save_compressed(compressed[0], tmp_path / "out2")
    manifest = json.loads((folder / "tensorlm.json").read_text())
    entry = next(m for m in manifest["modules"] if m["class"] == "KroneckerLinear")
    entry["config"]["rank"] = 1
    (folder / "tensorlm.json").write_text(json.dumps(manifest))
    with pytest.raises(TensorLMError, match="do not fit|do not match"):
        load_compressed(folder)


def test_bad_permutation_in_a_saved_folder_is_refused(compressed, tmp_path):
    from safetensors.torch import load_file, save_file

    from tensorlm.io import file_sha256

    folder = save_compressed(compressed[0], tmp_path / "out")
    tensors = load_file(folder / "model.safetensors")
    key = "transformer.h.1.mlp.c_fc.row_perm"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((folder / "tensorlm.json").read_text())
    manifest["sha256"] = file_sha256(folder / "model.safetensors")
    (folder / "tensorlm.json").write_text(json.dumps(manifest))
    with pytest.raises(TensorLMError, match="not a bijection"):
        load_compressed(folder)
