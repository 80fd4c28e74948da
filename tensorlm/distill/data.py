"""Training data for distillation: packed token blocks (causal LMs) and sentences (encoders).

Both come from a folder of plain-text shards (``<data_dir>/lm_text``: documents separated by blank
lines). Each gives a fixed held-out validation slice and a training order that is a pure function of
``(seed, step)``: the global batch of optimizer step ``s`` holds samples ``s*B .. (s+1)*B - 1`` of an
endless stream that visits every training sample once per epoch, in a fresh permutation per epoch.
A resumed run therefore needs nothing but its step to continue the same stream.

Nothing from an evaluation split is trained on: encoders add the STS-B and SICK **train** sentences only,
and any sentence that also occurs in STS-B dev/test or SICK trial/test is dropped from training.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from tensorlm.data import load_sts
from tensorlm.errors import TensorLMError

VAL_SEED = 1234  # the validation split does not move with the training seed


def default_cache_dir() -> Path:
    """``$TENSORLM_CACHE`` or ``~/.cache/tensorlm``: where tokenized shards are kept."""
    return Path(os.environ.get("TENSORLM_CACHE", Path.home() / ".cache" / "tensorlm"))


def text_shards(text_dir: str | os.PathLike) -> list[Path]:
    """The ``*.txt`` files of ``text_dir``, sorted by name.

    Raises:
        TensorLMError: the folder is missing or holds no ``.txt`` file.
    """
    folder = Path(text_dir)
    shards = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not shards:
        raise TensorLMError(f"distill data: {folder} holds no .txt shards; expected a folder like <data>/lm_text")
    return shards


def documents(text: str) -> list[str]:
    """Documents of a shard: blocks separated by one or more blank lines, stripped, empty ones dropped."""
    return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch`` (deterministic in ``seed`` and ``epoch``)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sample indices of optimizer step ``step``'s global batch (0-based step) over ``n`` samples."""
    if n < 1:
        raise TensorLMError("distill data: the training split is empty")
    first = step * batch_size
    out: list[int] = []
    orders: dict[int, torch.Tensor] = {}
    for k in range(first, first + batch_size):
        epoch, pos = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(int(orders[epoch][pos]))
    return out


def _tokenizer_digest(tokenizer) -> str:
    """A digest that changes whenever the tokenizer would tokenize differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((type(tokenizer).__name__ + text).encode()).hexdigest()[:16]


def _separator(tokenizer) -> list[int]:
    """The token placed after every document: EOS, else SEP, else nothing."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def tokenize_shard(tokenizer, path: Path, cache_dir: Path | None) -> np.ndarray:
    """All tokens of one shard: each document's ids followed by the separator, as a 1-D array.

    The array is cached as ``.npy`` under ``cache_dir`` keyed by the tokenizer and the file's path, size
    and modification time, and memory-mapped on later calls (so a second start costs milliseconds).
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / "tokens" / _tokenizer_digest(tokenizer) / f"{path.stem}-{key}.npy"
        if cache.exists():
            return np.load(cache, mmap_mode="r")
    docs = documents(path.read_text(encoding="utf-8", errors="replace"))
    separator = _separator(tokenizer)
    ids: list[int] = []
    for start in range(0, len(docs), 512):
        encoded = tokenizer(docs[start:start + 512], add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in encoded:
            ids.extend(doc_ids)
            ids.extend(separator)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    tokens = np.asarray(ids, dtype=dtype)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, tokens)
        os.replace(tmp, cache)
    return tokens


class LMBlocks:
    """Packed ``seq_len``-token blocks of a folder of text shards, for causal-LM distillation.

    Each shard is tokenized once (documents joined by the EOS token) and cut into consecutive blocks
    that never straddle two shards. The validation split takes blocks from the end of the shards in
    turn (the last block of every shard, then the one before, ...), so it is spread over all sources and
    shares no token with training.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text_dir: folder of ``*.txt`` shards.
        seq_len: tokens per block.
        val_blocks: blocks held out for validation.
        cache_dir: where tokenized shards are cached (``None``: no cache).

    Raises:
        TensorLMError: no shards, or too little text for ``val_blocks`` plus one training block.
    """

    def __init__(self, tokenizer, text_dir: str | os.PathLike, seq_len: int, *, val_blocks: int = 64,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.seq_len = seq_len
        self.shards = [tokenize_shard(tokenizer, p, None if cache_dir is None else Path(cache_dir))
                       for p in text_shards(text_dir)]
        counts = [len(tokens) // seq_len for tokens in self.shards]
        if sum(counts) < val_blocks + 1:
            raise TensorLMError(f"distill data: {text_dir} gives {sum(counts)} blocks of {seq_len} tokens; "
                                f"need more than val_blocks={val_blocks}")
        held: set[tuple[int, int]] = set()
        depth = 1
        while len(held) < val_blocks:
            for shard, count in enumerate(counts):
                if count - depth >= 0 and len(held) < val_blocks:
                    held.add((shard, count - depth))
            depth += 1
        every = [(shard, b) for shard, count in enumerate(counts) for b in range(count)]
        self.val_index = [pair for pair in every if pair in held]  # (shard, block) pairs
        self.train_index = [pair for pair in every if pair not in held]

    def _block(self, pair: tuple[int, int]) -> torch.Tensor:
        shard, b = pair
        return torch.from_numpy(np.asarray(self.shards[shard][b * self.seq_len:(b + 1) * self.seq_len],
                                           dtype=np.int64))  # (seq_len,)

    def train_batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The global batch of optimizer step ``step``: ``(batch_size, seq_len)`` int64 token ids."""
        idx = batch_indices(step, batch_size, len(self.train_index), seed)
        return torch.stack([self._block(self.train_index[i]) for i in idx])

    def train_blocks(self, indices: list[int]) -> torch.Tensor:
        """Training blocks by their index in the training split: ``(len(indices), seq_len)`` int64 token ids."""
        return torch.stack([self._block(self.train_index[i]) for i in indices])

    def val_batches(self, batch_size: int) -> list[torch.Tensor]:
        """The validation blocks in fixed order, in batches of ``(<= batch_size, seq_len)``."""
        blocks = [self._block(pair) for pair in self.val_index]
        return [torch.stack(blocks[i:i + batch_size]) for i in range(0, len(blocks), batch_size)]


def split_sentences(doc: str, *, min_words: int = 4, max_words: int = 64) -> list[str]:
    """Sentences of a document, split after ``.``, ``!`` or ``?`` before an upper-case letter or a quote.

    Whitespace is collapsed; sentences of fewer than ``min_words`` or more than ``max_words`` words are
    dropped (headlines, tables, run-ons).
    """
    text = " ".join(doc.split())
    pieces = re.split(r"(?<=[.!?])\s+(?=[\"'`(\[]?[A-Z])", text)
    return [p for p in pieces if min_words <= len(p.split()) <= max_words]


TRAIN_SPLITS = (("stsb", "train"), ("sick", "train"))
EVAL_SPLITS = (("stsb", "dev"), ("stsb", "test"), ("sick", "dev"), ("sick", "test"))


def _pair_sentences(name: str, split: str, data_dir: str | os.PathLike) -> list[str]:
    """Both sentences of every pair of an STS split (:func:`tensorlm.data.load_sts`)."""
    return [s for a, b, _ in load_sts(name, split, data_dir) for s in (a, b)]


class SentencePool:
    """Sentences for encoder distillation: text shards split into sentences, plus STS-B/SICK train pairs.

    Validation holds ``val_size`` shard sentences drawn with a fixed seed; training holds every other
    sentence (shards in name order, then STS-B train, then SICK train), deduplicated, without the
    validation sentences and without any sentence of STS-B dev/test or SICK trial/test.

    Args:
        text_dir: folder of ``*.txt`` shards, or ``None`` for none.
        data_dir: data root with ``stsb/`` and ``sick/`` (``None``: no STS/SICK sentences); its train
            pairs are added and its dev/test sentences kept out of training.
        val_size: held-out sentences.

    Raises:
        TensorLMError: fewer than ``val_size + 1`` shard sentences, or an STS/SICK file missing.
    """

    def __init__(self, text_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None, *,
                 val_size: int = 1000) -> None:
        shard_sentences: list[str] = []
        if text_dir is not None:
            for path in text_shards(text_dir):
                for doc in documents(path.read_text(encoding="utf-8", errors="replace")):
                    shard_sentences.extend(split_sentences(doc))
        shard_sentences = list(dict.fromkeys(shard_sentences))
        extra: list[str] = []
        excluded: set[str] = set()
        if data_dir is not None:
            for name, split in TRAIN_SPLITS:
                extra.extend(_pair_sentences(name, split, data_dir))
            for name, split in EVAL_SPLITS:
                excluded.update(_pair_sentences(name, split, data_dir))
        shard_sentences = [s for s in shard_sentences if s not in excluded]
        if len(shard_sentences) <= val_size:
            raise TensorLMError(f"distill data: {text_dir} gives {len(shard_sentences)} sentences; "
                                f"need more than val_size={val_size} for validation")
        pick = torch.randperm(len(shard_sentences), generator=torch.Generator().manual_seed(VAL_SEED))
        val_ids = set(pick[:val_size].tolist())
        self.val = [shard_sentences[i] for i in sorted(val_ids)]
        held = set(self.val) | excluded
        self.train = [s for s in dict.fromkeys(shard_sentences + extra) if s not in held]

    def train_batch(self, step: int, batch_size: int, seed: int) -> list[str]:
        """The ``batch_size`` sentences of optimizer step ``step``'s global batch."""
        return [self.train[i] for i in batch_indices(step, batch_size, len(self.train), seed)]

    def val_batches(self, batch_size: int) -> list[list[str]]:
        """The validation sentences in fixed order, in batches of at most ``batch_size``."""
        return [self.val[i:i + batch_size] for i in range(0, len(self.val), batch_size)]
