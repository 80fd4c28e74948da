"""The calibration pass: input second moments of linear modules and token counts, on training text.

Data-aware methods (DESIGN.md, "Data-aware objective") minimise ``||(W - W~) G^{1/2}||_F`` with
``G = sum_t x_t x_t^T`` over the inputs ``x_t (n,)`` that a linear module sees on calibration text
(SVD-LLM, Wang et al., arXiv 2403.07378, Sec. 3.1). :func:`collect_second_moments` runs the text through
the model once with forward hooks on the named ``nn.Linear`` / GPT-2 ``Conv1D`` modules and accumulates
``G`` in float64 batch by batch (one ``x^T x`` per batch, computed in float32 and added in float64;
never all activations), skipping padded
positions. Embeddings use token frequencies instead (:func:`token_counts`, :func:`embedding_token_counts`;
smoothed by :func:`frequency_weights`).

Calibration text is never a test split: causal LMs take packed blocks of ``lm_text``
(:func:`lm_calibration_batches`, default 128 x 512 tokens), encoders the distillation training sentences
(``lm_text`` sentences plus STS-B/SICK **train** pairs, :func:`sentence_calibration_batches`).

Results are cached as ``<key>.safetensors`` (the ``G`` matrices, float64, one tensor per module name) plus
``<key>.json`` (token counts, seconds, memory, fingerprints) under ``$TENSORLM_CACHE/calibration`` (default
``~/.cache/tensorlm/calibration``). The key is a sha256 of the model fingerprint (class, config and the
bytes of every tensor of the state dict), the sorted module names and the data fingerprint (the bytes of
every batch tensor, so any change of text, tokenizer, sample count, length or seed changes it). Both files
are written to temporary names and renamed, the JSON last, so a partial write is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tensorlm.data import resolve_data_dir
from tensorlm.distill.data import LMBlocks, SentencePool, default_cache_dir
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import is_conv1d

CACHE_VERSION = 1

Batch = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class Calibration:
    """Inputs of one module on the calibration text.

    Attributes:
        second_moment: ``(n, n)`` float64 on the CPU, ``G = sum_t x_t x_t^T`` over every unpadded position.
        tokens: number of positions ``t`` summed.
        output_fisher: ``(out,)`` float64 mean squared loss gradient at each output unit
            (:func:`tensorlm.fisher.collect_output_fisher`), when a budget asks for ``sensitivity: fisher``.
    """

    second_moment: torch.Tensor
    tokens: int
    output_fisher: torch.Tensor | None = None


class CalibrationResult(dict):
    """``dict[module name, Calibration]`` with the cost of the pass.

    Attributes:
        key: the cache key (hex).
        seconds: wall time of the pass (of the original pass on a cache hit).
        peak_rss_mb: peak resident memory of the process after the pass, MiB (``getrusage``; includes the
            model and everything the process held before).
        accumulator_mb: memory of the float64 ``G`` accumulators, MiB.
        tokens: positions per module in the pass (unpadded tokens).
        cached: True when read from the cache.
    """

    key: str = ""
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    accumulator_mb: float = 0.0
    tokens: int = 0
    cached: bool = False


def calibration_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$TENSORLM_CACHE/calibration`` or ``~/.cache/tensorlm/calibration``."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "calibration"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (any dtype, bf16 included), C order, on the CPU."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) of the model's class, config (when it has one) and every state-dict tensor's name, dtype,
    shape and bytes. Hashes each tensor once; about 1 s per 500 MB of weights."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def batch_kwargs(batch: Batch) -> dict[str, torch.Tensor]:
    """A batch as model keyword arguments: a tensor is ``input_ids``; a mapping is passed as is."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if "input_ids" not in batch:
        raise TensorLMError(f"calibration batch has keys {sorted(batch)}; expected at least 'input_ids'")
    return dict(batch)


def cache_key(version: int, model_fp: str, names: Sequence[str], data_fp: str) -> str:
    """The cache key (32 hex digits) of statistics of the modules ``names`` of the model ``model_fp`` on the
    data ``data_fp`` (from :func:`model_fingerprint` and :func:`data_fingerprint`), for a cache format
    ``version``; the module order does not matter."""
    return hashlib.sha256(json.dumps({"version": version, "model": model_fp, "modules": sorted(names),
                                      "data": data_fp}).encode()).hexdigest()[:32]


def data_fingerprint(batches: Sequence[Batch]) -> str:
    """sha256 (hex) of every batch's keys, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for batch in batches:
        for key, tensor in sorted(batch_kwargs(batch).items()):
            h.update(f"|{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _linear_modules(model: nn.Module, module_names: Sequence[str]) -> dict[str, nn.Module]:
    """The named modules, checked to exist and to be ``nn.Linear`` or ``Conv1D``."""
    named = dict(model.named_modules())
    out = {}
    for name in module_names:
        if name not in named:
            near = [n for n in named if n.endswith(name.rsplit(".", 1)[-1])][:3]
            raise TensorLMError(f"calibration: model has no module {name!r}" + (f"; e.g. {near}" if near else ""))
        module = named[name]
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TensorLMError(f"calibration: module {name!r} is a {type(module).__name__}; "
                                "expected nn.Linear or transformers Conv1D")
        out[name] = module
    return out


def _load_cached(folder: Path, key: str, names: Sequence[str]) -> CalibrationResult | None:
    sidecar, tensors = folder / f"{key}.json", folder / f"{key}.safetensors"
    if not (sidecar.exists() and tensors.exists()):
        return None
    meta = json.loads(sidecar.read_text())
    moments = load_file(tensors)
    if meta.get("version") != CACHE_VERSION or set(moments) != set(names):
        return None
    result = CalibrationResult({n: Calibration(moments[n], int(meta["modules"][n]["tokens"])) for n in names})
    result.key, result.cached = key, True
    result.seconds, result.peak_rss_mb = meta["seconds"], meta["peak_rss_mb"]
    result.accumulator_mb, result.tokens = meta["accumulator_mb"], meta["tokens"]
    return result


def _store(folder: Path, result: CalibrationResult, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f".tmp{os.getpid()}"
    tensors = folder / f"{result.key}.safetensors"
    sidecar = folder / f"{result.key}.json"
    save_file({n: c.second_moment.contiguous() for n, c in result.items()}, str(tensors) + tmp)
    os.replace(str(tensors) + tmp, tensors)
    Path(str(sidecar) + tmp).write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(str(sidecar) + tmp, sidecar)


def collect_second_moments(
    model: nn.Module, module_names: Sequence[str], batches: Iterable[Batch], progress: bool = True, *,
    cache: bool = True, cache_dir: str | os.PathLike | None = None, description: Mapping | None = None,
) -> CalibrationResult:
    """One pass over ``batches`` accumulating ``G = sum x x^T`` (float64) of each named module's input.

    A batch is an ``input_ids`` tensor ``(B, L)`` or a mapping of model keyword arguments holding
    ``input_ids`` and optionally ``attention_mask`` ``(B, L)``; positions where the mask is 0 are skipped
    (the hooks need the module input to be ``(B, L, n)``). Modules that receive the same input tensor in
    one forward (e.g. ``gate_proj`` and ``up_proj``) share one ``x^T x``. The model runs in eval mode
    under ``torch.no_grad`` and its training flag is restored.

    Args:
        model: a Hugging Face model (or any module called as ``model(**batch)``).
        module_names: names from ``model.named_modules()`` of ``nn.Linear`` or ``Conv1D`` modules.
        batches: the calibration batches (materialised once, for the data fingerprint).
        progress: show a tqdm bar.
        cache: read and write the on-disk cache (module docstring).
        cache_dir: cache folder (default :func:`calibration_cache_dir`).
        description: JSON-able notes for the cache sidecar (e.g. text folder, sample count, length, seed).

    Returns:
        a :class:`CalibrationResult` mapping each name to its :class:`Calibration`.

    Raises:
        TensorLMError: an unknown or non-linear module, no batches, a batch without ``input_ids``, an
            attention mask whose shape does not match a module's input, or a non-finite ``G`` (NaN/Inf in
            the activations).
    """
    names = list(dict.fromkeys(module_names))
    _linear_modules(model, names)  # checked before the cache and the pass
    batches = list(batches)
    if not batches:
        raise TensorLMError("calibration: no batches given")
    folder = calibration_cache_dir(cache_dir)
    model_fp, data_fp = model_fingerprint(model), data_fingerprint(batches)
    key = cache_key(CACHE_VERSION, model_fp, names, data_fp)
    if cache:
        hit = _load_cached(folder, key, names)
        if hit is not None:
            return hit
    start = time.perf_counter()
    result = _run_hooked(model, names, batches, progress).result(key, time.perf_counter() - start)
    if cache:
        meta = {"version": CACHE_VERSION, "key": key, "model_fingerprint": model_fp, "data_fingerprint": data_fp,
                "modules": {n: {"tokens": c.tokens, "features": c.second_moment.shape[0]} for n, c in result.items()},
                "seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb,
                "accumulator_mb": result.accumulator_mb, "tokens": result.tokens,
                "description": dict(description or {})}
        _store(folder, result, meta)
    return result


class MomentHooks:
    """The forward hooks' state: running ``x^T x`` sums (float64) and position counts per module name.

    ``memo`` holds the last input tensor seen and its ``x^T x``, shared by modules fed the same tensor in
    one forward; ``mask`` is the current batch's boolean attention mask (or None). Use it through
    :func:`moment_hooks`, calling :meth:`next_batch` before each batch's forward.
    """

    def __init__(self, names: Sequence[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(names, 0)
        self.mask: torch.Tensor | None = None
        self.memo: dict[str, object] = {}

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The unpadded input rows ``(tokens, n)`` in float32.

        Raises:
            TensorLMError: the attention mask's shape does not match the input's leading dimensions.
        """
        if self.mask is None:
            rows = x.detach().reshape(-1, x.shape[-1])
        elif tuple(x.shape[:-1]) == tuple(self.mask.shape):
            rows = x.detach()[self.mask.to(x.device)]
        else:
            raise TensorLMError(f"calibration: input of {name!r} has shape {tuple(x.shape)}, which does "
                                f"not match the attention mask {tuple(self.mask.shape)}")
        return rows.float()

    def next_batch(self, batch: Batch) -> None:
        """Take ``batch``'s attention mask (padded positions are not counted) and forget the last input."""
        mask = batch_kwargs(batch).get("attention_mask")
        self.mask = None if mask is None else mask.bool()
        self.memo.clear()

    def hook_for(self, name: str):
        """A ``register_forward_hook(..., with_kwargs=True)`` hook adding the module input's ``x^T x``."""
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            if self.memo.get("x") is not x:
                rows = self._rows(name, x)
                # one batch's x^T x in float32 (its own sum of a few thousand terms), accumulated in float64
                self.memo.update(x=x, xtx=(rows.T @ rows).to(torch.float64), count=rows.shape[0])
            if name in self.sums:
                self.sums[name] += self.memo["xtx"]
            else:
                self.sums[name] = self.memo["xtx"].clone()
            self.counts[name] += self.memo["count"]
        return hook

    def result(self, key: str, seconds: float) -> CalibrationResult:
        """The :class:`CalibrationResult` of a finished pass, with its cache key, time and memory figures.

        Raises:
            TensorLMError: a module that never ran, or a non-finite ``G``.
        """
        missing = [n for n in self.counts if n not in self.sums]
        if missing:
            raise TensorLMError(f"calibration: modules {missing[:3]} never ran in the forward pass")
        result = CalibrationResult()
        for name in self.counts:
            g = self.sums[name].cpu()
            if not torch.isfinite(g).all():
                raise TensorLMError(f"calibration: input second moment of {name!r} holds NaN/Inf "
                                    "(the activations overflowed)")
            result[name] = Calibration(g, self.counts[name])
        result.key, result.seconds = key, seconds
        result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        result.accumulator_mb = sum(g.numel() * 8 for g in self.sums.values()) / 2**20
        result.tokens = max(self.counts.values())
        return result


@contextmanager
def moment_hooks(model: nn.Module, names: Sequence[str]) -> Iterator[MomentHooks]:
    """Forward hooks on the modules ``names`` of ``model`` adding ``x^T x`` of their inputs (float64) while the
    ``with`` block runs; removed whatever happens. Call ``next_batch(batch)`` before each batch's forward and
    ``result(...)`` after the last.

    Raises:
        TensorLMError: a name that is not an ``nn.Linear`` or ``Conv1D`` module of ``model``.
    """
    hooks = MomentHooks(names)
    handles = [m.register_forward_hook(hooks.hook_for(n), with_kwargs=True)
               for n, m in _linear_modules(model, names).items()]
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


def _run_hooked(model: nn.Module, names: Sequence[str], batches: Sequence[Batch], progress: bool) -> MomentHooks:
    """Run every batch through ``model`` (eval mode, no grad) with :func:`moment_hooks` on ``names``.

    The model's training flag is restored whatever happens.

    Raises:
        TensorLMError: a batch without ``input_ids`` or a mask that does not match a module's input.
    """
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), moment_hooks(model, names) as hooks:
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=None if progress else True):
                hooks.next_batch(batch)
                model(**{k: v.to(device) for k, v in batch_kwargs(batch).items()})  # the batches stay on the CPU
    finally:
        model.train(was_training)
    return hooks


def token_counts(ids_batches: Iterable[Batch], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs: ``(vocab_size,)`` int64, padded positions (mask 0) skipped.

    Args:
        ids_batches: ``input_ids`` tensors, or mappings with ``input_ids`` and optionally ``attention_mask``.
        vocab_size: number of ids.

    Raises:
        TensorLMError: an id outside ``0..vocab_size-1``.
    """
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for batch in ids_batches:
        kwargs = batch_kwargs(batch)
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        ids = (ids[mask.bool()] if mask is not None else ids.reshape(-1)).cpu().long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise TensorLMError(f"token counts: ids range {ids.min().item()}..{ids.max().item()} "
                                f"outside a vocabulary of {vocab_size}")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def embedding_token_counts(model: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> CalibrationResult:
    """Token counts ``(V,)`` float64 of the input embedding tables ``names`` on ``batches`` (no forward pass).

    A name below the input embedding (``model.embed_tokens.table``, a table an earlier stage builds inside
    it) counts the same tokens: its rows are the token ids. The result maps each name to its counts; it is
    not cached (counting is instant), and its ``key`` is the sha256 of the names and the data fingerprint.

    Raises:
        TensorLMError: no batches, a name that is not (under) the model's input token embedding (e.g. a
            position table), ids outside the vocabulary.
    """
    if not batches:
        raise TensorLMError("calibration: no batches given")
    get_inputs = getattr(model, "get_input_embeddings", None)
    table = get_inputs() if get_inputs is not None else None
    modules = dict(model.named_modules())
    start = time.perf_counter()
    result = CalibrationResult()
    for name in names:
        parts = name.split(".")
        found = next((modules[p] for p in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if p in modules),
                     None)
        if table is None or found is not table:
            raise TensorLMError(f"calibration: frequency weights count input tokens, but {name!r} is not the "
                                "model's input token embedding (nor inside it)")
        result[name] = token_counts(batches, table.num_embeddings).to(torch.float64)  # (V,)
    data_fp = data_fingerprint(batches)
    result.key = hashlib.sha256(json.dumps({"counts": sorted(names), "data": data_fp}).encode()).hexdigest()[:32]
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result.tokens = int(max((c.sum().item() for c in result.values()), default=0))
    return result


def head_moment_key(table: str) -> str:
    """Where calibration statistics keep the :class:`Calibration` of the inputs of the LM head tied to token table
    ``table`` (``calibration: frequency-whitened``): the head's own entry, under the table's name."""
    return f"{table}#tied-head"


def frequency_weights(stats, name: str, vocab: int) -> torch.Tensor:
    """Smoothed token frequency ``f_t = (c_t + 1) / (sum_s c_s + V)`` (add-one, Laplace) of table ``name``:
    ``(V,)`` float64, every entry > 0, summing to 1; ``c`` are its token counts in calibration ``stats``.

    Raises:
        TensorLMError: no counts for ``name`` (the recipe asks for calibration but none ran), or counts that
            are not ``(vocab,)``, finite and >= 0.
    """
    counts = None if stats is None else stats.get(name)
    if counts is None:
        raise TensorLMError(f"{name}: calibration 'frequency' needs token counts, but no calibration statistics "
                            "were given; pass tokenizer= and data_dir= to tensorlm.compress, or use tensorlm run")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.shape != (vocab,) or not (torch.isfinite(counts).all() and (counts >= 0).all()):
        raise TensorLMError(f"{name}: token counts {tuple(counts.shape)} must be ({vocab},), finite and >= 0")
    return (counts + 1) / (counts.sum() + vocab)


def lm_calibration_batches(
    tokenizer, text_dir: str | os.PathLike, *, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
    batch_size: int = 8, held_out: int = 64, cache_dir: str | os.PathLike | None = None,
) -> list[torch.Tensor]:
    """``n_samples`` packed blocks of ``seq_len`` tokens of ``text_dir`` (``lm_text``), for causal LMs.

    The blocks are :class:`tensorlm.distill.data.LMBlocks` training blocks (the ``held_out`` validation
    blocks of distillation stay out), drawn without replacement by a permutation seeded by ``seed``.
    Tokenized shards are cached under ``cache_dir`` (default :func:`tensorlm.distill.data.default_cache_dir`).

    Returns:
        batches of ``(<= batch_size, seq_len)`` int64 token ids, in a fixed order.

    Raises:
        TensorLMError: no ``.txt`` shards, or fewer than ``n_samples`` training blocks.
    """
    if n_samples < 1 or seq_len < 1:
        raise TensorLMError(f"calibration: sample count and length must be >= 1, got {n_samples} x {seq_len}")
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    try:
        blocks = LMBlocks(tokenizer, text_dir, seq_len, val_blocks=held_out, cache_dir=cache_dir)
    except TensorLMError as exc:
        if "blocks of" not in str(exc):
            raise
        raise TensorLMError(f"calibration text {text_dir} is too short for {n_samples} blocks of {seq_len} tokens "
                            f"besides {held_out} held out ({exc})") from None
    available = len(blocks.train_index)
    if available < n_samples:
        raise TensorLMError(f"calibration text {text_dir} is too short: {available} blocks of {seq_len} tokens "
                            f"(besides {held_out} held out), asked for {n_samples}")
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    chosen = [blocks._block(blocks.train_index[i]) for i in pick]
    return [torch.stack(chosen[i:i + batch_size]) for i in range(0, n_samples, batch_size)]


def sentence_calibration_batches(
    tokenizer, text_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None, *, n_samples: int = 1024,
    max_length: int = 128, seed: int = 0, batch_size: int = 32,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` training sentences of :class:`tensorlm.distill.data.SentencePool` (``lm_text`` sentences
    plus STS-B/SICK train pairs, evaluation sentences excluded), for encoders.

    Returns:
        padded tokenizer batches (``input_ids``, ``attention_mask``, ...), at most ``batch_size`` each.

    Raises:
        TensorLMError: missing data, or fewer than ``n_samples`` training sentences.
    """
    pool = SentencePool(text_dir, data_dir)
    if len(pool.train) < n_samples:
        raise TensorLMError(f"calibration text is too short: {len(pool.train)} training sentences, "
                            f"asked for {n_samples}")
    pick = torch.randperm(len(pool.train), generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    sentences = [pool.train[i] for i in pick]
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, n_samples, batch_size)]


def calibration_batches(settings, tokenizer, kind: str = "causal-lm", data_dir=None, *,
                        batch_size: int | None = None) -> tuple[list, dict]:
    """A recipe's calibration text in batches, and a JSON-able description of it (text folder, sample count,
    length, seed, kind): what calibration, streaming calibration and block-wise reconstruction all read.

    ``settings`` is the recipe's :class:`~tensorlm.recipe.CalibrationSettings`. Causal LMs: ``samples``
    (default 128) packed ``lm_text`` training blocks of ``length`` (default 512) tokens, ``(<= batch_size,
    length)`` int64 per batch (:func:`lm_calibration_batches`, default batch 8); encoders: ``samples``
    (default 1,024) training sentences of at most ``length`` (default 128) tokens, padded tokenizer batches
    (:func:`sentence_calibration_batches`, default batch 32); ``seed`` picks them. Never a test split.

    Raises:
        TensorLMError: no data folder, calibration text too short for the asked sample count.
    """
    text_dir = resolve_data_dir(data_dir) / "lm_text"
    sizes = {} if batch_size is None else {"batch_size": batch_size}
    if kind == "causal-lm":
        samples, length = settings.samples or 128, settings.length or 512
        batches = lm_calibration_batches(tokenizer, text_dir, n_samples=samples, seq_len=length, seed=settings.seed,
                                         **sizes)
    else:
        samples, length = settings.samples or 1024, settings.length or 128
        batches = sentence_calibration_batches(tokenizer, text_dir, data_dir, n_samples=samples, max_length=length,
                                               seed=settings.seed, **sizes)
    return batches, {"text": str(text_dir), "samples": samples, "length": length, "seed": settings.seed, "kind": kind}
