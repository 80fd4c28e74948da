"""Reading a safetensors checkpoint one tensor at a time, into a model built on the meta device.

A checkpoint is a Hugging Face folder with ``model.safetensors.index.json`` (its ``weight_map`` names the
shard of every tensor) or a single ``model.safetensors``, or one ``.safetensors`` file. Only the shard
headers are read up front (names, shapes, dtypes), so a missing shard or a tensor whose shape disagrees with
the model is refused before any weight is read.

Each tensor is then read by its own short-lived ``safetensors.safe_open`` handle: a handle maps its whole
shard, and the pages it touches count in the process's resident memory until the handle is dropped, so
one handle kept open over a walk would make the peak the whole checkpoint (measured here: 512 MiB read by
one handle raised the peak RSS by 516 MiB, by a handle per tensor by 36 MiB, one tensor).

A tensor is materialised once, straight in its final dtype and on its final device, and assigned to the
module that holds it; parameters that a model shares (a tied LM head) stay one ``nn.Parameter``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tensorlm.errors import TensorLMError

__all__ = ["INDEX", "SINGLE", "Checkpoint", "aliases", "is_checkpoint", "mapped_device", "materialise"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding :data:`INDEX` or :data:`SINGLE`, or a ``.safetensors`` file."""
    path = Path(path)
    return (path / INDEX).is_file() or (path / SINGLE).is_file() or (path.is_file() and path.suffix == ".safetensors")


class Checkpoint:
    """The tensors of a safetensors checkpoint: where each lies, its shape and dtype; read one at a time.

    Args:
        path: a folder with :data:`INDEX` (sharded) or :data:`SINGLE`, or a ``.safetensors`` file.

    Attributes:
        files: ``tensor name -> shard path``.
        shapes: ``tensor name -> shape`` (from the shard headers).
        dtypes: ``tensor name -> torch.dtype``.
        nbytes: the size of every shard on disk, summed (bytes).

    Raises:
        TensorLMError: no safetensors weights at ``path``, an index that is not JSON or lacks ``weight_map``,
            a shard the index names that does not exist or cannot be read, a tensor the index places in a
            shard that does not hold it.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            weight_map = None
            shards = [path]
        elif (path / INDEX).is_file():
            weight_map = _weight_map(path / INDEX)
            shards = sorted({path / shard for shard in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise TensorLMError(f"{path / INDEX} names shard(s) that do not exist: {', '.join(missing)}")
        elif (path / SINGLE).is_file():
            weight_map = None
            shards = [path / SINGLE]
        else:
            raise TensorLMError(f"{path}: no safetensors weights ({INDEX} or {SINGLE}); streaming needs them")
        self.path = path
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for shard in shards:
            self._read_header(shard)
        if weight_map is not None:
            wrong = [name for name, shard in weight_map.items() if self.files.get(name) != path / shard]
            if wrong:
                raise TensorLMError(f"{path / INDEX} places {len(wrong)} tensor(s) in shards that do not hold them, "
                                    f"e.g. {wrong[0]!r} in {weight_map[wrong[0]]}")
        self.nbytes = sum(s.stat().st_size for s in shards)

    def _read_header(self, shard: Path) -> None:
        """Names, shapes and dtypes of ``shard`` (its header only)."""
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    self.files[name] = shard
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = _DTYPES.get(piece.get_dtype(), torch.float32)
        except (SafetensorError, OSError) as err:
            raise TensorLMError(f"shard {shard} cannot be read as safetensors (truncated or damaged?): "
                                f"{str(err).splitlines()[0]}") from err

    def read(self, name: str, device=None, dtype: torch.dtype | None = None, finite: bool = False) -> torch.Tensor:
        """Tensor ``name`` on ``device`` (default CPU), floating-point values cast to ``dtype`` (default as stored).

        The result owns its memory: safetensors maps the shard and its tensor shares the file's pages, which
        would stay mapped (and, once touched, resident) as long as the tensor lives, and ``save_model`` would
        copy such a tensor; a copy is made instead and the mapping dropped. ``finite`` checks it for NaN and
        Inf, in blocks of rows so that the check's temporaries stay small.

        Raises:
            TensorLMError: the checkpoint lacks ``name``, its shard became unreadable, or (``finite``) it holds
                NaN or Inf.
        """
        if name not in self.files:
            raise TensorLMError(f"{self.path}: no tensor {name!r} in the checkpoint")
        try:
            with safe_open(str(self.files[name]), framework="pt") as f:
                tensor = f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise TensorLMError(f"{self.files[name]}: cannot read {name!r}: {str(err).splitlines()[0]}") from err
        if finite and tensor.is_floating_point() and tensor.numel():
            rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() else tensor.reshape(1, 1)
            if not all(bool(torch.isfinite(block).all()) for block in rows.split(FINITE_BLOCK_ROWS)):
                raise TensorLMError(f"{self.files[name]}: tensor {name} {tuple(tensor.shape)} holds NaN or Inf; "
                                    "refused")
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        out = tensor.to(device=device, dtype=cast) if device is not None or cast is not None else tensor
        return out.clone() if out.data_ptr() == tensor.data_ptr() else out  # own memory, not the shard's pages

    def check(self, model: nn.Module) -> None:
        """Refuse a checkpoint whose tensors do not fit ``model`` (a skeleton on the meta device).

        Every persistent parameter and buffer must be in the checkpoint (a shared tensor under any one of
        its names) with the model's shape; tensors the model does not have are ignored.

        Raises:
            TensorLMError: a missing tensor or a shape that differs (the first few are named, with the shard).
        """
        state = model.state_dict(keep_vars=True)
        wrong = [f"{name} is {self.shapes[name]} in {self.files[name].name}, the config says {tuple(t.shape)}"
                 for name, t in state.items() if name in self.shapes and self.shapes[name] != tuple(t.shape)]
        if wrong:
            raise TensorLMError(f"{self.path}: {len(wrong)} tensor(s) disagree with the model: {'; '.join(wrong[:3])}")
        missing = [names[0] for names in aliases(model).values() if not any(n in self.files for n in names)]
        if missing:
            raise TensorLMError(f"{self.path}: the checkpoint lacks {len(missing)} tensor(s) of the model, e.g. "
                                f"{', '.join(missing[:3])}")


FINITE_BLOCK_ROWS = 1024
"""Rows checked at a time by :meth:`Checkpoint.read` with ``finite``."""

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name.

    Raises:
        TensorLMError: not JSON, no ``weight_map`` object, or a shard name that leaves the folder.
    """
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TensorLMError(f"{index} is not valid JSON (truncated or damaged?): {err}") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TensorLMError(f"{index} has no weight_map of tensor name -> shard file")
    outside = [v for v in weight_map.values() if Path(v).name != v]
    if outside:
        raise TensorLMError(f"{index} names shard {outside[0]!r} outside its folder; refused")
    return weight_map


def aliases(model: nn.Module) -> dict[int, list[str]]:
    """The persistent tensors of ``model``: ``id(tensor) -> every state-dict name it has``.

    A tied head's weight is one entry with two names. Non-persistent buffers are left out (they are not saved).
    """
    names: dict[int, list[str]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        dot = f"{module_name}." if module_name else ""
        for attr, value in module._parameters.items():
            if value is not None:
                names[id(value)].append(f"{dot}{attr}")
        for attr, value in module._buffers.items():
            if value is not None and attr not in module._non_persistent_buffers_set:
                names[id(value)].append(f"{dot}{attr}")
    return {key: list(dict.fromkeys(value)) for key, value in names.items()}


def materialise(model: nn.Module, checkpoint: Checkpoint, prefix: str = "", *, device=None,
                dtype: torch.dtype | None = None, only_meta: bool = True, finite: bool = False,
                skip: str | None = None, device_map: Mapping[str, torch.device] | None = None) -> int:
    """Fill the tensors of ``model`` under module ``prefix`` from ``checkpoint``, each read once.

    Every name of a shared tensor gets the same new ``nn.Parameter``, also names outside ``prefix`` (a tied
    head follows its table); floating-point values
    are cast to ``dtype`` (default: the checkpoint's), integer ones keep theirs. ``load_state_dict(...,
    assign=True)`` places them, so layers that check what they load still do.

    Args:
        model: the model, modified in place.
        checkpoint: where the values are.
        prefix: the module whose tensors are filled (``""``: the whole model).
        device: where they are put (default CPU).
        dtype: floating-point dtype (default as stored).
        only_meta: fill only tensors still on the meta device.
        finite: refuse NaN and Inf (:meth:`Checkpoint.read`).
        skip: a module whose tensors are left as they are (e.g. the block list, filled block by block).
        device_map: ``module name -> device``; a tensor goes to the device of the longest name it lies under
            (``""``: every tensor), in place of ``device``; a tensor under no name stays on ``device``.

    Returns:
        The number of bytes materialised.

    Raises:
        TensorLMError: a tensor the checkpoint lacks (under every one of its names); (``finite``) NaN or Inf.
    """
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    state, size = {}, 0
    for key, names in aliases(model).items():
        current = tensors[key]
        wanted = any(_under(n, prefix) and not (skip is not None and _under(n, skip)) for n in names)
        if (only_meta and not current.is_meta) or not wanted:
            continue
        found = next((n for n in names if n in checkpoint.files), None)
        if found is None:
            raise TensorLMError(f"{checkpoint.path}: the checkpoint lacks {names[0]!r}")
        value = checkpoint.read(found, device if device_map is None else mapped_device(names[0], device_map, device),
                                dtype, finite)
        if isinstance(current, nn.Parameter):
            value = nn.Parameter(value, requires_grad=current.requires_grad and value.is_floating_point())
        size += value.numel() * value.element_size()
        state.update(dict.fromkeys(names, value))
    if state:
        model.load_state_dict(state, strict=False, assign=True)
    return size


def mapped_device(name: str, device_map: Mapping[str, torch.device], default=None):
    """The device ``device_map`` gives state-dict ``name``: that of the longest module name it lies under
    (``""`` covers every name), or ``default`` when none does."""
    keys = [key for key in device_map if _under(name, key)]
    return device_map[max(keys, key=len)] if keys else default


def _under(name: str, prefix: str) -> bool:
    """True when state-dict ``name`` belongs to module ``prefix`` (``""``: the whole model)."""
    return not prefix or name.startswith(prefix + ".")
