"""Benchmark loaders against the real files in the shared data folder (they must be there: no skips)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
from pathlib import Path

import pytest

from tensorlm import data
from tensorlm.errors import TensorLMError

DATA = Path(os.environ.get("TENSORLM_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.mark.parametrize(
    ("name", "counts"),
    [("stsb", {"train": 5749, "dev": 1500, "test": 1379}), ("sick", {"train": 4500, "dev": 500, "test": 4927})],
)
def test_sts_counts_are_canonical(name, counts):
    for split, count in counts.items():
        pairs = data.load_sts(name, split, DATA)
        assert len(pairs) == count
        assert all(isinstance(a, str) and isinstance(b, str) and isinstance(s, float) for a, b, s in pairs)


def test_stsb_rows_split_on_tabs_only():
    pairs = data.load_sts("stsb", "test", DATA)
    assert pairs[0] == ("A girl is styling her hair.", "A girl is brushing her hair.", 2.5)
    # line 408 quotes a phrase; a quote-aware reader would eat the quotes
    assert pairs[407] == (
        'A young boy jumping into a pool that says "no diving".',
        "A boy jumps into a pool while lifeguards watch.",
        3.2,
    )
    # line 643 carries two extra trailing fields (source URLs), which must not leak into the sentences
    assert pairs[642] == (
        "Unfortunately the answer to your question is we simply do not know.",
        'My answer to your question is "Probably Not".',
        1.0,
    )
    assert all(0.0 <= s <= 5.0 for _, _, s in pairs)


def test_sick_columns_by_header():
    test = data.load_sts("sick", "test", DATA)
    assert test[-1] == (
        "A man is in a parking lot and is playing tennis against a large wall",
        "The snowboarder is leaping fearlessly over white snow",
        1.0,
    )
    assert all(1.0 <= s <= 5.0 for _, _, s in test)


@pytest.mark.parametrize(
    ("task", "counts"),
    [
        ("cola", {"train": 8551, "dev": 527 + 516}),
        ("sst2", {"train": 67349, "dev": 872, "test": 1821}),
        ("mrpc", {"train": 3668, "dev": 408, "test": 1725}),
        ("rte", {"train": 2490, "dev": 277}),
    ],
)
def test_glue_counts_and_binary_labels(task, counts):
    for split, count in counts.items():
        examples = data.load_glue(task, split, DATA)
        assert len(examples) == count
        assert {label for _, _, label in examples} == {0, 1}
        assert all((b is None) == (task in ("cola", "sst2")) for _, b, _ in examples)


def test_glue_rows():
    assert data.load_glue("rte", "dev", DATA)[0][1:] == ("Christopher Reeve had an accident.", 1)
    # the MSR test file starts with a byte-order mark before its header
    assert data.load_glue("mrpc", "test", DATA)[0][0].startswith("PCCW 's chief operating officer")
    assert data.load_glue("cola", "dev", DATA)[-1][2] in (0, 1)
    with pytest.raises(TensorLMError, match="choose one of"):
        data.load_glue("rte", "test", DATA)
    with pytest.raises(TensorLMError, match="choose one of"):
        data.load_glue("qqp", "dev", DATA)


def test_wikitext2_test_is_the_file_byte_for_byte():
    text = data.load_wikitext2_test(DATA)
    raw = text.encode("utf-8")
    assert len(raw) == 1_290_590
    assert hashlib.sha256(raw).hexdigest().startswith("173c87a5")
    assert text.startswith(" \n = Robert Boulter = \n \n")


def test_lambada_passages():
    passages = data.load_lambada(DATA)
    assert len(passages) == 5153
    assert passages[0].startswith("In my palm is a clear stone")
    assert all(" " in p and p == p.strip() for p in passages)


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(DATA))
    assert data.resolve_data_dir() == DATA
    assert len(data.load_sts("stsb", "dev")) == 1500


def test_missing_folder_and_file_name_the_path(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(TensorLMError, match="TENSORLM_DATA"):
        data.resolve_data_dir()
    with pytest.raises(TensorLMError, match="does not exist"):
        data.resolve_data_dir(tmp_path / "nowhere")
    with pytest.raises(TensorLMError, match=r"stsb/sts-test\.csv"):
        data.load_sts("stsb", "test", tmp_path)
    with pytest.raises(TensorLMError, match=r"lambada_test\.jsonl"):
        data.load_lambada(tmp_path)


def test_bad_name_split_and_rows(tmp_path):
    with pytest.raises(TensorLMError, match="choose one of"):
        data.load_sts("sts12", "test", DATA)
    with pytest.raises(TensorLMError, match="choose one of"):
        data.load_sts("sick", "validation", DATA)
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "sts-test.csv").write_text("a\tb\tc\td\t2.0\tonly one sentence\n")
    with pytest.raises(TensorLMError, match=":1 has 6"):
        data.load_sts("stsb", "test", tmp_path)
    (tmp_path / "sick").mkdir()
    (tmp_path / "sick" / "SICK_trial.txt").write_text("id\ta\tb\n1\tx\ty\n")
    with pytest.raises(TensorLMError, match="lacks the SICK columns"):
        data.load_sts("sick", "dev", tmp_path)
    (tmp_path / "lambada").mkdir()
    (tmp_path / "lambada" / "lambada_test.jsonl").write_text(json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(TensorLMError, match=":1 is not a JSON object"):
        data.load_lambada(tmp_path)


def test_hub_route_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(TensorLMError, match="'datasets' is not installed"):
        data.load_wikitext2_test()


def test_hub_route_rebuilds_the_files(monkeypatch):
    """The hub's wikitext rows are the file's lines with blank lines emptied; STS-B rows map by column name."""
    lines = data.load_wikitext2_test(DATA).splitlines(keepends=True)
    stsb = data.load_sts("stsb", "dev", DATA)
    tables = {
        data.HUB_WIKITEXT2: {"text": [line if line.strip() else "" for line in lines]},
        ("mteb/stsbenchmark-sts", None, "validation"): {
            "sentence1": [a for a, _, _ in stsb],
            "sentence2": [b for _, b, _ in stsb],
            "score": [s for _, _, s in stsb],
        },
    }
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda repo, config, split: tables[(repo, config, split)]
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.load_wikitext2_test() == "".join(lines)
    assert data.load_sts("stsb", "dev") == stsb
