"""Saving and loading compressed models without decomposing again.

A folder holds ``model.safetensors`` (every tensor once, shared tensors deduplicated by
``safetensors.torch.save_model``), ``tensorlm.json`` (format version, base architecture, kind, the
replaced modules with their layer class and constructor config, the recipe, the parameter table
and the SHA-256 of the weights file), ``config.json``, the tokenizer files and a model card
(``README.md``). Loading builds the base architecture from the base config, rebuilds the replaced
modules from ``tensorlm.json`` and fills everything from the weights file with ``strict=True``.

``config.json`` keeps the base model's config under :data:`BASE_CONFIG_KEY` and declares the model type
:data:`COMPRESSED_MODEL_TYPE`, which transformers does not know: ``AutoModel.from_pretrained`` on a
compressed folder fails with a message naming ``tensorlm.load_compressed`` instead of building the dense
architecture with random factored layers. Folders saved before this (the base config at the top level)
still load. :func:`export_dense` writes an ordinary Hugging Face folder with the decompressed weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import get_balanced_memory
from safetensors.torch import save_model
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from tensorlm.errors import TensorLMError
from tensorlm.files import MANIFEST, atomic_folder, file_sha256
from tensorlm.layers.base import LAYERS, prepare_reconstructed
from tensorlm.loaded import LoadedModel, says_random
from tensorlm.params import count_parameters
from tensorlm.shards import Checkpoint, aliases, mapped_device, materialise
from tensorlm.surgery import decompress
from tensorlm.version import __version__

__all__ = ["BASE_CONFIG_KEY", "COMPRESSED_MODEL_TYPE", "DEVICE_MAP_STRATEGIES", "FORMAT_VERSION", "MANIFEST",
           "WEIGHTS", "atomic_folder", "empty_model", "export_dense", "file_sha256", "load_compressed",
           "replaced_modules", "save_compressed", "write_compressed"]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
COMPRESSED_MODEL_TYPE = "tensorlm-compressed (load it with tensorlm.load_compressed, or tensorlm export --dense)"
"""The ``model_type`` of a compressed folder's ``config.json``; transformers refuses it, naming it in its error."""
BASE_CONFIG_KEY = "tensorlm_base_config"
"""The key of ``config.json`` that holds the base (dense) model's config."""
REQUIRED_KEYS = ("architecture", "modules", "sha256")


def replaced_modules(model: nn.Module) -> list[dict]:
    """``[{name, class, config}]`` of the factorized layers in ``model``, in module order."""
    return [{"name": name, "class": type(m).__name__, "config": m.tensorlm_config()}
            for name, m in model.named_modules() if type(m).__name__ in LAYERS]


def write_compressed(model: nn.Module, folder: Path, *, tokenizer=None, kind: str | None = None,
                     recipe=None, notes: list[str] | None = None) -> None:
    """Write a model into an existing (empty) ``folder``; use :func:`save_compressed` for the atomic version."""
    folder = Path(folder)
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if config is not None:
        _write_guarded_config(config, folder)
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "kind": kind,
        "children": [name for name, _ in model.named_children()],
        "modules": replaced_modules(model),
        "recipe": None if recipe is None else recipe.to_dict(),
        "params": count_parameters(model),
        "notes": notes or [],
        "random_weights": says_random(notes or []),
        "sha256": file_sha256(folder / WEIGHTS),
    }
    (folder / "README.md").write_text(model_card(manifest))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))


def _write_guarded_config(config, folder: Path) -> None:
    """``config.json`` that plain transformers refuses: the base config under :data:`BASE_CONFIG_KEY`."""
    base = config.to_dict()
    guarded = {"model_type": COMPRESSED_MODEL_TYPE, "architectures": ["TensorLMCompressed"],
               "tensorlm_note": "compressed by tensorlm: load with tensorlm.load_compressed(folder), or write a "
                                "plain Hugging Face folder with `tensorlm export FOLDER --dense OUT`",
               BASE_CONFIG_KEY: base}
    (folder / "config.json").write_text(json.dumps(guarded, indent=2, sort_keys=True, allow_nan=False))


def model_card(manifest: dict, results: dict | None = None) -> str:
    """A short ``README.md`` for a compressed folder: what it is, its recipe, parameters, how to load it, and
    with ``results`` (a run's ``results.json``, non-finite values already ``null``) its metrics and protocols."""
    recipe = manifest.get("recipe") or {}
    params = manifest.get("params") or {}
    lines = ["---", "library_name: tensorlm", "tags: [tensorlm, compressed]", "---", "",
             f"# {manifest['architecture']} compressed by tensorlm", ""]
    if recipe:
        lines += [f"Recipe: `{recipe.get('name')}`: {' '.join(str(recipe.get('description', '')).split())}", "",
                  "Stages: " + "; ".join(f"{s['name']} ({s['method']}, {len(s['targets'])} target pattern(s))"
                                         for s in recipe.get("stages", [])), ""]
    lines += [f"Parameters: {params.get('total', 0):,} unique ({params.get('stored', 0):,} stored); "
              f"{len(manifest['modules'])} factored modules.", ""]
    lines += [f"- {note}" for note in manifest.get("notes", [])]
    lines += ["", *(_card_metrics(results) if results else [
        "Metrics, with their protocols, are in `results.json` and `report.md` when the folder was written "
        "by `tensorlm run`."]), "", "## Loading", "",
              "This folder is not a plain transformers folder: `AutoModel.from_pretrained` refuses it (its "
              "`config.json` names tensorlm). Load it with", "", "```python", "import tensorlm",
              "loaded = tensorlm.load_compressed(\"FOLDER\")  # .model, .tokenizer", "```", "",
              "or write an ordinary Hugging Face folder with the decompressed (dense) weights:", "", "```",
              "tensorlm export FOLDER --dense OUT", "```", ""]
    return "\n".join(lines)


def _card_metrics(results: dict) -> list[str]:
    """The metrics section of a model card: one row per metric with both models' values and its protocol."""
    metrics, protocols = results.get("metrics") or {}, results.get("protocols") or {}
    before, after, agree = metrics.get("before") or {}, metrics.get("after") or {}, metrics.get("agreement") or {}
    if not (before or agree):
        return ["Not evaluated (`--eval none`)."]
    lines = [f"## Metrics (eval mode `{results.get('eval_mode')}`)", "",
             "| metric | uncompressed | compressed | protocol |", "|---|---:|---:|---|"]
    rows = [(k, before.get(k), after.get(k)) for k in before] + [(k, None, v) for k, v in agree.items()]
    for key, b, a in rows:
        lines.append(f"| {key} | {'-' if b is None else f'{b:.4f}'} | {'-' if a is None else f'{a:.4f}'} | "
                     f"{protocols.get(key, '')} |")
    lines += [f"- `{k}` is missing: {v}" for k, v in (results.get("metrics_notes") or {}).items()]
    if results.get("random_weights"):
        lines += ["", "The weights were partly random (no real checkpoint): the metrics describe the method, "
                      "not the real model."]
    return lines


def add_results_to_card(folder: Path, results: dict) -> None:
    """Rewrite ``folder``'s model card with a run's ``results`` (:func:`tensorlm.report.results_dict`)."""
    folder = Path(folder)
    (folder / "README.md").write_text(model_card(read_json(folder / MANIFEST), results))


def save_compressed(model: nn.Module, folder: str | os.PathLike, *, tokenizer=None, kind: str | None = None,
                    recipe=None, notes: list[str] | None = None, overwrite: bool = False,
                    inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Save a (compressed) Hugging Face model so that :func:`load_compressed` restores it bit for bit.

    Written to a temporary folder and swapped in at the end (:func:`tensorlm.files.atomic_folder`).

    Args:
        inputs: the paths the model was read from; ``folder`` may be none of them nor their parents.

    Raises:
        TensorLMError: what :func:`tensorlm.files.refuse_existing` raises (an existing folder without
            ``overwrite``, a folder tensorlm did not write, the input or the current directory).
    """
    with atomic_folder(folder, overwrite=overwrite, inputs=inputs) as tmp:
        write_compressed(model, tmp, tokenizer=tokenizer, kind=kind, recipe=recipe, notes=notes)
    return Path(folder)


def _restore_conv1d(dense: nn.Module) -> None:
    """Turn back into GPT-2 ``Conv1D`` (weight ``(in, out)``) every decompressed ``nn.Linear`` that the
    architecture builds as a ``Conv1D``, so that transformers loads the saved weights in their own layout."""
    with torch.device("meta"):
        reference = type(dense)(dense.config)
    for name, module in list(dense.named_modules()):
        if type(module) is not nn.Linear:
            continue
        try:
            original = reference.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(original, Conv1D):
            conv = Conv1D(module.out_features, module.in_features)
            with torch.no_grad():
                conv.weight.copy_(module.weight.T)
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
                else:
                    conv.bias.zero_()
            dense.set_submodule(name, conv)


def export_dense(loaded: LoadedModel, folder: str | os.PathLike, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``loaded`` as an ordinary Hugging Face folder: every factored layer replaced by its dense form.

    ``transformers``' ``from_pretrained`` loads the result and computes what the compressed model computes
    (up to float rounding). A head that no longer equals the input embedding is saved untied. An encoder
    also gets sentence-transformers' ``modules.json``, ``sentence_bert_config.json`` and
    ``1_Pooling/config.json`` (mean pooling, tensorlm's sentence embedding; :func:`sentence_transformers_files`).

    Raises:
        TensorLMError: what :func:`tensorlm.files.refuse_existing` raises; a model without a config.
    """
    dense = decompress(loaded.model)
    config = getattr(dense, "config", None)
    if config is None:
        raise TensorLMError("export --dense needs a transformers model (it has no config)")
    _restore_conv1d(dense)
    head = dense.get_output_embeddings() if hasattr(dense, "get_output_embeddings") else None
    table = dense.get_input_embeddings() if hasattr(dense, "get_input_embeddings") else None
    if head is not None and table is not None and getattr(config, "tie_word_embeddings", False):
        if head.weight is not table.weight and not torch.equal(head.weight, table.weight):
            config.tie_word_embeddings = False
    config.architectures = [type(dense).__name__]
    with atomic_folder(folder, overwrite=overwrite, inputs=inputs) as tmp:
        dense.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if loaded.kind == "encoder":
            for relative, content in sentence_transformers_files(config).items():
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                (tmp / relative).write_text(json.dumps(content, indent=2, allow_nan=False))
        (tmp / "README.md").write_text(f"# {type(dense).__name__} (dense export of {loaded.name})\n\n"
                                       f"Decompressed by tensorlm {__version__} from a compressed folder; loads "
                                       "with `transformers.AutoModel.from_pretrained`.\n\n"
                                       + "".join(f"- {note}\n" for note in loaded.notes))
        (tmp / MANIFEST).write_text(json.dumps({"exported_dense_from": loaded.name, "kind": loaded.kind,
                                                "tensorlm_version": __version__}, indent=2, allow_nan=False))
    return Path(folder)


SENTENCE_MAX_LENGTH = 128
"""The token limit of tensorlm's sentence embeddings (``tensorlm.evaluate.sts``), kept in an export."""


def sentence_transformers_files(config) -> dict[str, object]:
    """The files that make an encoder folder a sentence-transformers model: relative path -> JSON content.

    A Transformer module at the folder's root followed by mean pooling over the attention mask, which is
    how tensorlm embeds sentences (``tensorlm.pooling.mean_pool``; cosine similarity needs no normalisation).
    """
    pooling = {"word_embedding_dimension": int(config.hidden_size), "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    return {"modules.json": modules, "1_Pooling/config.json": pooling,
            "sentence_bert_config.json": {"max_seq_length": SENTENCE_MAX_LENGTH, "do_lower_case": False}}


def architecture(name: str, model_type: str) -> type[nn.Module]:
    """The transformers model class ``name``, only if transformers' auto registries list it for ``model_type``.

    A saved manifest names a class; resolving any name found in a JSON file with ``getattr(transformers,
    ...)`` would let a folder pick any callable. Only the classes ``AutoModel*`` would build for the
    config's ``model_type`` are accepted.

    Raises:
        TensorLMError: ``name`` is not one of those (they are listed).
    """
    allowed = set()
    for key in dir(modeling_auto):
        mapping = getattr(modeling_auto, key)
        if key.endswith("_MAPPING_NAMES") and isinstance(mapping, dict) and model_type in mapping:
            value = mapping[model_type]
            allowed.update([value] if isinstance(value, str) else value)
    cls = getattr(transformers, name, None) if name in allowed else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        models = sorted(n for n in allowed if not n.endswith("Config"))
        raise TensorLMError(f"architecture {name!r} is not a transformers model registered for model_type "
                            f"{model_type!r}; refused (allowed: {', '.join(models) or 'none'})")
    return cls


def _rebuild_layers(model: nn.Module, manifest: dict, folder: Path) -> None:
    """Replace, in ``model``, every module the manifest lists by an uninitialised layer of its class (on the
    meta device when called under ``init_empty_weights``, as :func:`load_compressed` does).

    Raises:
        TensorLMError: an unknown layer class.
    """
    shared: dict = {}
    for entry in manifest["modules"]:
        cls = LAYERS.get(entry["class"])
        if cls is None:
            raise TensorLMError(f"{folder}: module {entry['name']!r} has unknown layer class {entry['class']!r}")
        try:
            current = model.get_submodule(entry["name"])
        except AttributeError:
            current = None
        if type(current) is cls:
            continue  # already rebuilt inside its parent (e.g. a shared bank)
        module = cls.from_tensorlm_config(entry["config"], shared)
        model.set_submodule(entry["name"], module)
        shared[entry["name"]] = module


def _read_manifest(folder: Path) -> dict:
    """The checked manifest of a saved folder.

    Raises:
        TensorLMError: a missing file, another format version, or weights whose SHA-256 differs.
    """
    for required in (MANIFEST, WEIGHTS, "config.json"):
        if not (folder / required).is_file():
            raise TensorLMError(f"{folder} is not a tensorlm folder: {required} is missing")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict):
        raise TensorLMError(f"{folder / MANIFEST} is not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise TensorLMError(f"{folder / MANIFEST} lacks key(s) {missing}; it is damaged or not tensorlm's")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TensorLMError(f"{folder}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    if file_sha256(folder / WEIGHTS) != manifest["sha256"]:
        raise TensorLMError(f"{folder / WEIGHTS} is corrupted: its SHA-256 differs from the one in {MANIFEST}")
    return manifest


def read_json(path: Path):
    """The JSON content of ``path``.

    Raises:
        TensorLMError: the file is not valid JSON (truncated or not JSON), or cannot be read as text.
    """
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TensorLMError(f"{path} is not valid JSON (truncated or damaged?): {err}") from err


def base_config(folder: Path):
    """The base model's config of a compressed folder (:data:`BASE_CONFIG_KEY`, or the top level of an
    older folder's ``config.json``).

    Raises:
        TensorLMError: ``config.json`` is not JSON, or names a model type transformers does not know.
    """
    data = read_json(folder / "config.json")
    if not isinstance(data, dict):
        raise TensorLMError(f"{folder / 'config.json'} is not a JSON object")
    if BASE_CONFIG_KEY not in data:
        return AutoConfig.from_pretrained(folder)  # saved before the guarded config
    base = data[BASE_CONFIG_KEY]
    model_type = base.get("model_type") if isinstance(base, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise TensorLMError(f"{folder / 'config.json'}: base model_type {model_type!r} is unknown to transformers")
    return CONFIG_MAPPING[model_type].from_dict(base)


def place(model: nn.Module, device=None, dtype: torch.dtype | None = None, name: str = "model") -> nn.Module:
    """Move ``model`` to ``device`` and cast its floating-point parameters and buffers to ``dtype``, in place.

    Integer buffers (Kronecker permutations, ragged TT indices) keep their dtype. For inference: bfloat16 on
    CPU, float16 or bfloat16 on a GPU (float16 matmuls on CPU are slow or unsupported in older torch).

    Raises:
        TensorLMError: ``dtype`` is not a floating-point ``torch.dtype``, or ``device`` is not a device torch
            knows (or one this machine lacks).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TensorLMError(f"{name}: dtype {dtype!r} is not a floating-point torch.dtype "
                            "(e.g. torch.bfloat16, torch.float16, torch.float32)")
    try:
        target = None if device is None else torch.device(device)
        return model.to(device=target, dtype=dtype)
    except (RuntimeError, AssertionError) as err:  # unknown device string; CUDA missing (AssertionError)
        raise TensorLMError(f"{name}: cannot place the model on device {device!r}: {str(err).splitlines()[0]}"
                            ) from err


def empty_model(cls: type[nn.Module], config) -> nn.Module:
    """``cls(config)`` with its parameters on the meta device and no weight initialiser run, tied as
    ``config`` says (buffers its constructor computes, such as rotary frequencies, are real, on the CPU).

    accelerate's ``init_empty_weights`` puts parameters on meta; transformers' ``no_init_weights`` skips the
    initialisers, and with them the tying, which is done after (inside the first context, tying would make
    a new meta parameter instead of sharing one).
    """
    with init_empty_weights(), no_init_weights():
        model = cls(config)
    if hasattr(model, "tie_weights") and hasattr(model, "all_tied_weights_keys"):
        model.tie_weights(recompute_mapping=False)
    return model


def _checked_place(device, dtype: torch.dtype | None, name: str) -> torch.device | None:
    """``device`` as a ``torch.device`` after checking it and ``dtype`` (before anything is read).

    Raises:
        TensorLMError: what :func:`place` raises for a bad ``device`` or ``dtype``.
    """
    place(nn.Module(), device, dtype, name)  # an empty module: checks both without moving anything
    return None if device is None else torch.device(device)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The ``device_map`` strings :func:`load_compressed` accepts (as in transformers: ``auto`` is ``balanced``)."""


def _device_choices() -> str:
    """The devices a ``device_map`` may name on this machine, for error messages."""
    gpus = [f"'cuda:{i}'" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ", ".join(["'cpu'", *gpus]) + ("" if gpus else " (no CUDA device here)")


def _checked_device_map(device_map, name: str) -> str | dict[str, str] | None:
    """``device_map`` with every device written ``"cpu"`` or ``"cuda:N"`` (a bare ``"cuda"`` or an integer is
    that GPU), checked against this machine before anything is read.

    Raises:
        TensorLMError: not a strategy of :data:`DEVICE_MAP_STRATEGIES` nor a mapping of module names to
            devices, an empty mapping, or a device that is not the CPU or a CUDA device this machine has
            (``"disk"`` included: nothing is offloaded); the line names it and the valid choices.
    """
    if device_map is None:
        return None
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise TensorLMError(f"{name}: device_map {device_map!r} is neither one of {list(DEVICE_MAP_STRATEGIES)} "
                                "nor a mapping of module names to devices")
        return device_map
    if not isinstance(device_map, Mapping) or not device_map:
        raise TensorLMError(f"{name}: device_map must be one of {list(DEVICE_MAP_STRATEGIES)} or a non-empty mapping "
                            f"of module names to devices, got {device_map!r}")
    checked = {}
    for key, value in device_map.items():
        try:
            dev = torch.device("cuda", value) if isinstance(value, int) and not isinstance(value, bool) \
                else torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            dev = None
        known = dev is not None and (dev.type == "cpu" or (
            dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()))
        if not known:
            raise TensorLMError(f"{name}: device_map {key!r}: {value!r} is not a device of this machine; choose "
                                f"{_device_choices()}")
        checked[str(key)] = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
    return checked


def _resolved_device_map(model: nn.Module, device_map: str | dict[str, str], dtype: torch.dtype,
                         name: str) -> dict[str, str]:
    """``module name -> device`` for ``model`` (meta tensors): a strategy is resolved by accelerate
    (``infer_auto_device_map``, keeping the model's ``_no_split_modules`` whole and tied tensors together, sizes
    counted in ``dtype``); a given mapping is checked to name modules of ``model`` and to cover every tensor.

    Raises:
        TensorLMError: a name that is no module of the model, a tensor no name covers, or a strategy that
            would offload modules to the disk (the model does not fit the CPU's and GPUs' memory).
    """
    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        memory = None if device_map == "sequential" else get_balanced_memory(
            model, dtype=dtype, low_zero=device_map == "balanced_low_0", no_split_module_classes=no_split)
        resolved = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
        disk = [key for key, value in resolved.items() if value == "disk"]
        if disk:
            raise TensorLMError(f"{name}: device_map {device_map!r} would offload {disk[:3]} to the disk, which "
                                "load_compressed does not do; free memory or pass a device_map")
        return {key: f"cuda:{value}" if isinstance(value, int) else str(value) for key, value in resolved.items()}
    modules = {n for n, _ in model.named_modules()}
    unknown = [key for key in device_map if key not in modules]
    if unknown:
        raise TensorLMError(f"{name}: device_map names {unknown[:3]}, which are not modules of the "
                            f"{type(model).__name__}")
    uncovered = [names[0] for names in aliases(model).values()
                 if all(mapped_device(n, device_map) is None for n in names)]
    if uncovered:
        raise TensorLMError(f"{name}: device_map places no module holding {uncovered[:3]}; add them (or \"\")")
    return device_map


def _fill(model: nn.Module, folder: Path, device: torch.device | None, dtype: torch.dtype | None,
          device_map: dict[str, str] | None = None) -> None:
    """Read every tensor of ``folder``'s weights file into ``model`` (built on the meta device), each on
    ``device`` or on the device ``device_map`` gives it (:func:`tensorlm.shards.mapped_device`).

    Raises:
        TensorLMError: the file cannot be read, holds a tensor the model lacks or of another shape, or lacks
            one the model has (mismatched).
    """
    checkpoint = Checkpoint(folder / WEIGHTS)
    known = {name for names in aliases(model).values() for name in names}
    unexpected = sorted(set(checkpoint.files) - known)
    try:
        if unexpected:
            raise TensorLMError(f"unexpected {unexpected[:5]}")
        checkpoint.check(model)
        materialise(model, checkpoint, device=device, dtype=dtype, only_meta=False,  # buffers are real (CPU)
                    device_map=device_map)
    except (RuntimeError, TensorLMError) as err:
        raise TensorLMError(f"{folder}: weights do not fit the model described by {MANIFEST}: "
                            f"{_one_line(err)}") from err
    left = sorted(n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta)
    if left:
        raise TensorLMError(f"{folder}: weights do not match {MANIFEST}: missing {left[:5]}")


def _one_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def load_compressed(folder: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                    device_map: str | Mapping | None = None) -> LoadedModel:
    """Load a folder written by :func:`save_compressed`; no decomposition is run, no pickle is read.

    Args:
        folder: the saved folder.
        device: where to place the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``); default
            the CPU, where the weights are read.
        dtype: cast the floating-point tensors (:func:`place`), e.g. ``torch.bfloat16``; default as saved.
        device_map: spread the model over devices through accelerate instead of ``device``: a strategy of
            :data:`DEVICE_MAP_STRATEGIES` (``"auto"``: balanced over the GPUs, then the CPU; resolved by
            ``accelerate.infer_auto_device_map`` with the architecture's blocks kept whole, sizes in ``dtype``
            or the saved dtype) or a mapping ``module name -> device`` (``""`` is the whole model; a tensor
            goes to the longest name it lies under; devices ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``N`` or
            ``torch.device``). Each tensor is read straight onto its device; then ``accelerate.dispatch_model``
            places the model (on several devices: hooks that move activations between them) and the
            resolved map is ``model.hf_device_map``. Nothing is offloaded to the disk.

    The architecture and the factorized layers are built on the meta device without running any weight
    initialiser; each saved tensor is then read once (a short-lived handle per tensor, so the file's pages do
    not stay mapped), straight on ``device`` and in its saved dtype (or ``dtype``), and assigned
    (:func:`tensorlm.shards.materialise`): peak memory is about the model itself. Tied tensors stay one
    parameter; integer buffers keep their dtype.

    Every layer keeps the forward choice saved with it (``"factorized"`` for folders saved before the
    choice existed); layers that use the reconstructed path build their dense weight here, after the
    cast, in the target dtype and on the target device.

    Raises:
        TensorLMError: a missing file, a weights file whose SHA-256 differs from the manifest
            (corrupted), an architecture transformers does not register for the config's model_type,
            tensors that do not fit the rebuilt modules (mismatched), or an unknown layer class or
            format version; a bad ``device`` or ``dtype``; ``device`` and ``device_map`` together; a
            ``device_map`` that is no strategy nor mapping, names a device this machine lacks (refused before
            any file is read; the line lists the valid devices) or a module the model lacks, leaves a tensor
            without a device, or would offload to the disk (refused before any weight is read).
    """
    folder = Path(folder)
    if device is not None and device_map is not None:
        raise TensorLMError(f"{folder}: pass device= or device_map=, not both (device_map={{'': {device!r}}} is "
                            "device=)")
    target = _checked_place(device, dtype, str(folder))
    device_map = _checked_device_map(device_map, str(folder))
    manifest = _read_manifest(folder)
    config = base_config(folder)
    cls = architecture(manifest["architecture"], config.model_type)
    model = empty_model(cls, config)
    for name, _ in list(model.named_children()):
        if name not in manifest.get("children", [name]):
            setattr(model, name, None)  # built by default but absent when saved (e.g. a BERT pooler)
    with init_empty_weights(), no_init_weights():  # a factored table may hold an nn.Embedding
        _rebuild_layers(model, manifest, folder)
    if device_map is not None:
        sizes = dtype or max((t for t in Checkpoint(folder / WEIGHTS).dtypes.values() if t.is_floating_point),
                             key=lambda t: t.itemsize, default=torch.float32)
        device_map = _resolved_device_map(model, device_map, sizes, str(folder))
    _fill(model, folder, target, dtype, device_map)
    tokenizer = None
    with contextlib.suppress(OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config)  # not the guarded config.json
    kind = manifest.get("kind") or "encoder"
    notes = list(manifest.get("notes", []))
    model = place(model, device, dtype, str(folder))
    prepare_reconstructed(model)
    if device_map is not None:
        model = dispatch_model(model, device_map)
    return LoadedModel(model.eval(), tokenizer, kind, str(folder), notes,
                       random_weights=bool(manifest.get("random_weights", says_random(notes))))
