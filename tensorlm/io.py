"""Saving and loading compressed models without decomposing again.

A folder holds ``model.safetensors`` (every tensor once, shared tensors deduplicated by
``safetensors.torch.save_model``), ``tensorlm.json`` (format version, base architecture, kind, the
replaced modules with their layer class and constructor config, the recipe, the parameter table
and the SHA-256 of the weights file), the base ``config.json`` and the tokenizer files. Loading
builds the base architecture from ``config.json``, rebuilds the replaced modules from
``tensorlm.json`` and fills everything from the weights file with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import transformers
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto import modeling_auto

from tensorlm.errors import TensorLMError
from tensorlm.files import atomic_folder, file_sha256
from tensorlm.layers.base import LAYERS
from tensorlm.models import LoadedModel
from tensorlm.params import count_parameters

__all__ = ["FORMAT_VERSION", "MANIFEST", "WEIGHTS", "atomic_folder", "file_sha256", "load_compressed",
           "replaced_modules", "save_compressed", "write_compressed"]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "tensorlm.json"


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
    if config is not None:
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "kind": kind,
        "children": [name for name, _ in model.named_children()],
        "modules": replaced_modules(model),
        "recipe": None if recipe is None else recipe.to_dict(),
        "params": count_parameters(model),
        "notes": notes or [],
        "sha256": file_sha256(folder / WEIGHTS),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def save_compressed(model: nn.Module, folder: str | os.PathLike, *, tokenizer=None, kind: str | None = None,
                    recipe=None, notes: list[str] | None = None, overwrite: bool = False) -> Path:
    """Save a (compressed) Hugging Face model so that :func:`load_compressed` restores it bit for bit.

    Written to a temporary folder and renamed at the end; never overwrites unless asked.

    Raises:
        TensorLMError: ``folder`` exists and ``overwrite`` is False.
    """
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_compressed(model, tmp, tokenizer=tokenizer, kind=kind, recipe=recipe, notes=notes)
    return Path(folder)


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
    """Replace, in ``model``, every module the manifest lists by an uninitialised layer of its class.

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
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TensorLMError(f"{folder}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    if file_sha256(folder / WEIGHTS) != manifest["sha256"]:
        raise TensorLMError(f"{folder / WEIGHTS} is corrupted: its SHA-256 differs from the one in {MANIFEST}")
    return manifest


def load_compressed(folder: str | os.PathLike) -> LoadedModel:
    """Load a folder written by :func:`save_compressed`; no decomposition is run, no pickle is read.

    Raises:
        TensorLMError: a missing file, a weights file whose SHA-256 differs from the manifest
            (corrupted), an architecture transformers does not register for the config's model_type,
            tensors that do not fit the rebuilt modules (mismatched), or an unknown layer class or
            format version.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    model = architecture(manifest["architecture"], config.model_type)(config)
    for name, _ in list(model.named_children()):
        if name not in manifest.get("children", [name]):
            setattr(model, name, None)  # built by default but absent when saved (e.g. a BERT pooler)
    _rebuild_layers(model, manifest, folder)
    try:
        missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
    except (SafetensorError, RuntimeError, TensorLMError) as err:
        raise TensorLMError(f"{folder}: weights do not fit the model described by {MANIFEST}: "
                            f"{str(err).splitlines()[0]}") from err
    if missing or unexpected:
        raise TensorLMError(f"{folder}: weights do not match {MANIFEST}: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")
    tokenizer = None
    with contextlib.suppress(OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    kind = manifest.get("kind") or "encoder"
    return LoadedModel(model.eval(), tokenizer, kind, str(folder), list(manifest.get("notes", [])))
