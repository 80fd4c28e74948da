"""The tokenizer of a GGUF file is converted once and then read from a cache keyed by the file.

A tiny GGUF file (a BPE vocabulary of 30-odd tokens, no tensors) stands in for Gemma 3's 262,144-token one:
the first load converts and writes the cache, the second reads it without converting, and a rewritten
file is converted again rather than served the old vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
from transformers import AutoTokenizer

from tensorlm import models
from tensorlm.models import gguf_tokenizer, gguf_tokenizer_folder

TEXT = "hello world, hello"


def write_gguf(path: Path, words: list[str]) -> Path:
    """A Llama-architecture GGUF file holding only a byte-level BPE tokenizer: single letters, the space
    (``Ġ``), and each word in ``words`` built by merging its first two letters and then one letter at a time."""
    letters = list("abcdefghijklmnopqrstuvwxyz,") + ["Ġ"]
    merges, pieces = [], []
    for word in words:
        piece = word[0]
        for letter in word[1:]:
            merges.append(f"{piece} {letter}")
            piece += letter
            pieces.append(piece)
    tokens = list(dict.fromkeys(["<unk>", "<s>", "</s>", *letters, *pieces]))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # control tokens, then normal ones
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """The GGUF files transformers converts a tokenizer from, in order (every other load passes through)."""
    seen: list[str] = []

    def from_pretrained(source, *args, **kwargs):
        if "gguf_file" in kwargs:
            seen.append(kwargs["gguf_file"])
        return AutoTokenizer.from_pretrained(source, *args, **kwargs)

    monkeypatch.setattr(models, "AutoTokenizer", SimpleNamespace(from_pretrained=from_pretrained))
    return seen


def test_converted_once_then_read_from_the_cache(tmp_path, conversions):
    path = write_gguf(tmp_path / "tiny.gguf", ["hello"])
    cache = tmp_path / "cache"
    first = gguf_tokenizer(path, cache)
    folder = gguf_tokenizer_folder(path, cache)
    assert conversions == ["tiny.gguf"]
    assert folder.parent == cache and folder.name.startswith("tiny-")
    assert (folder / "tokenizer.json").is_file()
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folder left beside it

    again = gguf_tokenizer(path, cache)
    assert conversions == ["tiny.gguf"]  # read, not converted
    assert type(again) is type(first) and again.get_vocab() == first.get_vocab()
    assert again(TEXT).input_ids == first(TEXT).input_ids
    assert first.tokenize("hello") == ["hello"]
    assert (again.bos_token, again.eos_token, again.unk_token) == (first.bos_token, first.eos_token, first.unk_token)


def test_a_rewritten_file_is_converted_again(tmp_path, conversions):
    path = write_gguf(tmp_path / "tiny.gguf", ["hello"])
    cache = tmp_path / "cache"
    old = gguf_tokenizer(path, cache)
    old_folder = gguf_tokenizer_folder(path, cache)
    assert "world" not in old.get_vocab()

    write_gguf(path, ["hello", "world"])  # same name, new vocabulary
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a distinct time on coarse clocks
    new = gguf_tokenizer(path, cache)
    assert conversions == ["tiny.gguf", "tiny.gguf"]
    assert gguf_tokenizer_folder(path, cache) != old_folder
    assert new.tokenize(" world") == ["Ġ", "world"] and old.tokenize(" world") != new.tokenize(" world")
    assert gguf_tokenizer(path, cache).get_vocab() == new.get_vocab() and len(conversions) == 2


def test_a_damaged_entry_is_rebuilt(tmp_path, conversions):
    path = write_gguf(tmp_path / "tiny.gguf", ["hello"])
    cache = tmp_path / "cache"
    first = gguf_tokenizer(path, cache)
    folder = gguf_tokenizer_folder(path, cache)
    (folder / "tokenizer.json").write_text('{"version": ')  # cut short
    rebuilt = gguf_tokenizer(path, cache)
    assert conversions == ["tiny.gguf", "tiny.gguf"]
    assert rebuilt.get_vocab() == first.get_vocab()
    assert gguf_tokenizer(path, cache)(TEXT).input_ids == first(TEXT).input_ids and len(conversions) == 2


def test_an_unwritable_cache_warns_and_still_loads(tmp_path, conversions):
    path = write_gguf(tmp_path / "tiny.gguf", ["hello"])
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match="not cached"):
        tokenizer = gguf_tokenizer(path, blocked / "cache")
    assert tokenizer.tokenize("hello") == ["hello"]


def test_the_default_cache_follows_tensorlm_cache(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", ["hello"])
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "elsewhere"))
    assert gguf_tokenizer_folder(path).parent == tmp_path / "elsewhere" / "tokenizers"
