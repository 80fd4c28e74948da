"""Benchmark data: STS-B, SICK-R, WikiText-2 (raw test) and LAMBADA, from a local folder or from the hub.

The local folder is laid out like ``/work/shared/data`` (see its README)::

    stsb/sts-{train,dev,test}.csv          tab-separated, fields 4, 5, 6 = score (0-5), sentence1, sentence2
    sick/SICK_{train,trial,test_annotated}.txt   header: pair_ID sentence_A sentence_B relatedness_score ...
    wikitext-2/wiki.test.raw               raw WikiText-2 test, read as it is in the file
    lambada/lambada_test.jsonl             OpenAI's LAMBADA test, one {"text": ...} per line
    lm_text/*.txt                          plain English text shards (training, calibration; their ends held out)

It is found from the explicit ``data_dir`` argument, else from the environment variable ``TENSORLM_DATA``.
With neither, the loaders fetch the same sets from the Hugging Face hub through the optional
``datasets`` package (``pip install tensorlm[hub]``), imported only then.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from tensorlm.errors import TensorLMError

DATA_ENV = "TENSORLM_DATA"

STS_FILES = {
    "stsb": {"train": "stsb/sts-train.csv", "dev": "stsb/sts-dev.csv", "test": "stsb/sts-test.csv"},
    "sick": {
        "train": "sick/SICK_train.txt",
        "dev": "sick/SICK_trial.txt",
        "test": "sick/SICK_test_annotated.txt",
    },
}
# GLUE tasks: files per split, and which columns (by header name, or by position when the file has no
# header) hold the first text, the second text (None for single-sentence tasks) and the integer label.
GLUE_FILES = {
    "cola": {"train": ["glue/CoLA/in_domain_train.tsv"],
             "dev": ["glue/CoLA/in_domain_dev.tsv", "glue/CoLA/out_of_domain_dev.tsv"]},
    "sst2": {"train": ["glue/SST-2/sentiment-train"], "dev": ["glue/SST-2/sentiment-dev"],
             "test": ["glue/SST-2/sentiment-test"]},
    "mrpc": {"train": ["glue/MRPC/train.tsv"], "dev": ["glue/MRPC/dev.tsv"],
             "test": ["glue/MRPC/test_labeled_msr.txt"]},
    "rte": {"train": ["glue/RTE/train.tsv"], "dev": ["glue/RTE/dev.tsv"]},
}
GLUE_COLUMNS = {
    "cola": (3, None, 1),
    "sst2": (0, None, 1),
    "mrpc": ("#1 String", "#2 String", "Quality"),
    "rte": ("sentence1", "sentence2", "label"),
}
HUB_GLUE = ("nyu-mll/glue", {"train": "train", "dev": "validation"})
HUB_GLUE_COLUMNS = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
                    "rte": ("sentence1", "sentence2")}
WIKITEXT2_TEST = "wikitext-2/wiki.test.raw"
LAMBADA_TEST = "lambada/lambada_test.jsonl"
SICK_HEADER = ("pair_ID", "sentence_A", "sentence_B", "relatedness_score")

# Hub routes: (dataset id, config, split name per tensorlm split).
HUB_STSB = ("mteb/stsbenchmark-sts", None, {"train": "train", "dev": "validation", "test": "test"})
HUB_SICK = ("RobZamp/sick", None, {"train": "train", "dev": "validation", "test": "test"})
HUB_WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
HUB_LAMBADA = ("EleutherAI/lambada_openai", "default", "test")


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The benchmark data folder: ``explicit`` if given, else ``$TENSORLM_DATA``.

    Raises:
        TensorLMError: neither is set, or the folder does not exist.
    """
    if explicit is None:
        explicit = os.environ.get(DATA_ENV) or None
    if explicit is None:
        raise TensorLMError(
            f"no benchmark data folder: pass data_dir (CLI --data-dir) or set {DATA_ENV} to a folder "
            "laid out like shared/data (stsb/, sick/, wikitext-2/, lambada/)"
        )
    folder = Path(explicit).expanduser()
    if not folder.is_dir():
        raise TensorLMError(
            f"benchmark data folder {str(folder)!r} does not exist; pass data_dir (CLI --data-dir) "
            f"or set {DATA_ENV} to an existing folder"
        )
    return folder


def load_sts(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> list[tuple[str, str, float]]:
    """Sentence pairs with gold similarity scores.

    Args:
        name: ``"stsb"`` (STS Benchmark, Cer et al. 2017; 5,749 / 1,500 / 1,379 pairs) or ``"sick"``
            (SICK relatedness, SemEval-2014 Task 1; train / trial / test = 4,500 / 500 / 4,927 pairs).
        split: ``"train"``, ``"dev"`` (SICK's "trial") or ``"test"``.
        data_dir: the data folder; ``None`` reads ``$TENSORLM_DATA``, and without it the hub.

    Returns:
        ``[(sentence1, sentence2, score)]`` in file order; scores on the sets' own scales
        (STS-B 0-5, SICK 1-5).

    Raises:
        TensorLMError: unknown name or split, a missing file, a malformed row.
    """
    if name not in STS_FILES:
        raise TensorLMError(f"STS dataset {name!r} is unknown; choose one of {sorted(STS_FILES)}")
    if split not in STS_FILES[name]:
        raise TensorLMError(f"STS split {split!r} is unknown; choose one of {list(STS_FILES[name])}")
    folder = _local_folder(data_dir)
    if folder is None:
        return _hub_sts(name, split)
    path = _data_file(folder, STS_FILES[name][split])
    return _read_stsb(path) if name == "stsb" else _read_sick(path)


def load_glue(
    task: str, split: str, data_dir: str | os.PathLike | None = None
) -> list[tuple[str, str | None, int]]:
    """Labelled examples of a GLUE task (Wang et al. 2019), from the original releases in ``glue/``.

    ``cola`` (acceptability; train 8,551, dev = in-domain + out-of-domain 527 + 516), ``sst2`` (sentiment;
    67,349 / 872 / 1,821 with a labelled test), ``mrpc`` (paraphrase; 3,668 / 408 / 1,725 labelled MSR
    test), ``rte`` (entailment, 0 = entailment; 2,490 / 277). Rows are split on tabs only.

    Returns:
        ``[(text_a, text_b or None, label)]`` in file order.

    Raises:
        TensorLMError: unknown task or split (the hub has no labelled test split), a missing file,
            a malformed row.
    """
    if task not in GLUE_FILES:
        raise TensorLMError(f"GLUE task {task!r} is unknown; choose one of {sorted(GLUE_FILES)}")
    folder = _local_folder(data_dir)
    splits = list(GLUE_FILES[task]) if folder is not None else list(HUB_GLUE[1])
    if split not in splits:
        raise TensorLMError(f"GLUE {task} split {split!r} is not available here; choose one of {splits}")
    if folder is None:
        rows = _hub_load(HUB_GLUE[0], task, HUB_GLUE[1][split])
        first, second = HUB_GLUE_COLUMNS[task]
        seconds = rows[second] if second else [None] * len(rows[first])
        return list(zip(rows[first], seconds, map(int, rows["label"]), strict=True))
    examples = []
    for relative in GLUE_FILES[task][split]:
        examples += _read_glue(_data_file(folder, relative), *GLUE_COLUMNS[task])
    return examples


def load_wikitext2_test(data_dir: str | os.PathLike | None = None) -> str:
    """The raw WikiText-2 test set (Merity et al. 2016) as one string, exactly as in ``wiki.test.raw``.

    1,290,590 bytes; 286,221 GPT-2 tokens. From the hub, the rows are joined back into the file: every
    blank row was a line holding one space.

    Raises:
        TensorLMError: the file is missing.
    """
    folder = _local_folder(data_dir)
    if folder is None:
        repo, config, split = HUB_WIKITEXT2
        rows = _hub_load(repo, config, split)["text"]
        return "".join(row if row else " \n" for row in rows)
    with open(_data_file(folder, WIKITEXT2_TEST), encoding="utf-8", newline="") as f:
        return f.read()


def load_lambada(data_dir: str | os.PathLike | None = None) -> list[str]:
    """OpenAI's detokenized LAMBADA test (Paperno et al. 2016): 5,153 passages; the target is the last word.

    Raises:
        TensorLMError: the file is missing or a line is not ``{"text": ...}``.
    """
    folder = _local_folder(data_dir)
    if folder is None:
        repo, config, split = HUB_LAMBADA
        return list(_hub_load(repo, config, split)["text"])
    path = _data_file(folder, LAMBADA_TEST)
    passages = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                passages.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TensorLMError(f"{path}:{number} is not a JSON object with a 'text' field") from exc
    return passages


def load_lm_text_tail(data_dir: str | os.PathLike | None = None, *, shards: int = 16, chars: int = 2_000) -> str:
    """Held-out causal-LM text: the last ``chars`` characters of each of the first ``shards`` ``lm_text`` shards.

    The ends of the shards are what :class:`tensorlm.distill.data.LMBlocks` holds out for validation
    (and a shard's final partial block is never used at all), so neither distillation nor calibration
    reads this text. Each tail starts at a line boundary; the tails are joined by a blank line.

    Raises:
        TensorLMError: no data folder, or fewer than ``shards`` shards.
    """
    folder = resolve_data_dir(data_dir) / "lm_text"
    paths = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if len(paths) < shards:
        raise TensorLMError(f"held-out text needs {shards} shards in {folder}; found {len(paths)}")
    tails = []
    for path in paths[:shards]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tail = text[-chars:]
        tails.append(tail[tail.find("\n") + 1:].strip() if "\n" in tail else tail.strip())
    return "\n\n".join(tails)


def _local_folder(data_dir: str | os.PathLike | None) -> Path | None:
    """The data folder; ``None`` (use the hub) when neither ``data_dir`` nor ``$TENSORLM_DATA`` is set."""
    if data_dir is None and not os.environ.get(DATA_ENV):
        return None
    return resolve_data_dir(data_dir)


def _data_file(folder: Path, relative: str) -> Path:
    path = folder / relative
    if not path.is_file():
        raise TensorLMError(
            f"benchmark file {str(path)!r} is missing; the data folder (data_dir / --data-dir / {DATA_ENV}) "
            f"must hold {relative}"
        )
    return path


def _read_stsb(path: Path) -> list[tuple[str, str, float]]:
    """STS-B rows: split on tab only (quotes are text), fields 4, 5, 6; some rows have extra fields."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 7:
                raise TensorLMError(f"{path}:{number} has {len(fields)} tab-separated fields; expected >= 7")
            pairs.append((fields[5], fields[6], _score(fields[4], path, number)))
    return pairs


def _read_sick(path: Path) -> list[tuple[str, str, float]]:
    """SICK rows, columns found by the header names ``sentence_A``, ``sentence_B``, ``relatedness_score``."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if not set(SICK_HEADER) <= set(header):
            raise TensorLMError(f"{path} header {header} lacks the SICK columns {list(SICK_HEADER)}")
        a, b, s = (header.index(column) for column in SICK_HEADER[1:])
        pairs = []
        for number, line in enumerate(f, 2):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < len(header):
                raise TensorLMError(f"{path}:{number} has {len(fields)} fields; the header has {len(header)}")
            pairs.append((fields[a], fields[b], _score(fields[s], path, number)))
    return pairs


def _read_glue(path: Path, first: str | int, second: str | int | None, label: str | int):
    """A tab-separated GLUE file; named columns mean the file has a header line (a BOM is dropped)."""
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.rstrip("\r\n") for line in f]
    start = 0
    if isinstance(first, str):
        header = lines[0].split("\t")
        missing = [c for c in (first, second, label) if c is not None and c not in header]
        if missing:
            raise TensorLMError(f"{path} header {header} lacks the columns {missing}")
        first, label = header.index(first), header.index(label)
        second = None if second is None else header.index(second)
        start = 1
    examples = []
    for number, line in enumerate(lines[start:], start + 1):
        fields = line.split("\t")
        try:
            examples.append((fields[first], None if second is None else fields[second], int(fields[label])))
        except (IndexError, ValueError) as exc:
            raise TensorLMError(f"{path}:{number} is not a row of text fields and an integer label") from exc
    return examples


def _score(text: str, path: Path, number: int) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise TensorLMError(f"{path}:{number} score {text!r} is not a number") from exc


def _hub_sts(name: str, split: str) -> list[tuple[str, str, float]]:
    if name == "stsb":
        repo, config, splits = HUB_STSB
        rows = _hub_load(repo, config, splits[split])
        return list(zip(rows["sentence1"], rows["sentence2"], map(float, rows["score"]), strict=True))
    repo, config, splits = HUB_SICK
    warnings.warn(
        f"SICK from the hub ({repo}) has 4,439 / 495 / 4,906 pairs, not the SemEval-2014 release's "
        "4,500 / 500 / 4,927; figures differ slightly from those on the release files",
        stacklevel=3,
    )
    rows = _hub_load(repo, config, splits[split])
    scores = map(float, rows["relatedness_score"])
    return list(zip(rows["sentence_A"], rows["sentence_B"], scores, strict=True))


def _hub_load(repo: str, config: str | None, split: str):
    """One split of a hub dataset through the optional ``datasets`` package (columns by name)."""
    try:
        import datasets
    except ImportError as exc:
        raise TensorLMError(
            f"no benchmark data folder given (data_dir / --data-dir / {DATA_ENV}) and the optional package "
            f"'datasets' is not installed to fetch {repo} from the hub; pip install 'tensorlm[hub]' "
            "or give a folder"
        ) from exc
    return datasets.load_dataset(repo, config, split=split)
