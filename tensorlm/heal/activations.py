"""Cached block activations: one float32 tensor ``(B_j, L_j, d)`` per calibration batch ``j``.

Block-wise reconstruction holds three such sets at a time (the teacher block's input, its output and the
student block's input). :func:`storage_for` keeps them in memory when the three fit under a limit, else
writes each batch to a ``.npy`` file in a temporary folder (read back batch by batch). Memory in use is then
one batch per set, not the whole calibration set.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SETS = 3
"""Activation sets held at once: teacher input, teacher output (the targets) and student input."""


class ActivationStore:
    """Per-batch float32 CPU tensors in memory (``folder`` None) or as ``<folder>/<name>-<j>.npy`` files."""

    def __init__(self, name: str, n_batches: int, folder: Path | None = None):
        self.name, self.folder = name, folder
        self._memory: list[torch.Tensor | None] = [None] * n_batches

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, j: int) -> Path:
        return self.folder / f"{self.name}-{j}.npy"

    def __setitem__(self, j: int, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float32)
        if self.folder is None:
            self._memory[j] = value.clone()
        else:
            np.save(self._path(j), value.numpy())

    def __getitem__(self, j: int) -> torch.Tensor:
        """Batch ``j`` as a float32 tensor ``(B_j, L_j, d)`` (a fresh tensor read from disk, or the cached one)."""
        if self.folder is None:
            value = self._memory[j]
            if value is None:
                raise KeyError(f"{self.name}: batch {j} was never stored")
            return value
        return torch.from_numpy(np.load(self._path(j)))


class Storage:
    """Where the activation sets live; :meth:`close` removes the temporary folder, if any."""

    def __init__(self, where: str, megabytes: float, folder: tempfile.TemporaryDirectory | None):
        self.where, self.megabytes, self._folder = where, megabytes, folder

    def store(self, name: str, n_batches: int) -> ActivationStore:
        return ActivationStore(name, n_batches, None if self._folder is None else Path(self._folder.name))

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def describe(self) -> str:
        folder = "" if self._folder is None else f" under {self._folder.name}"
        return f"{SETS} activation sets of {self.megabytes / SETS:.1f} MiB each in {self.where}{folder}"


def activation_megabytes(shapes: Sequence[tuple[int, ...]]) -> float:
    """MiB of :data:`SETS` float32 sets of tensors of ``shapes``."""
    return SETS * sum(int(np.prod(s)) for s in shapes) * 4 / 2**20


def storage_for(shapes: Sequence[tuple[int, ...]], max_memory_mb: float) -> Storage:
    """In memory when :func:`activation_megabytes` of ``shapes`` is at most ``max_memory_mb``, else on disk."""
    megabytes = activation_megabytes(shapes)
    if megabytes <= max_memory_mb:
        return Storage("memory", megabytes, None)
    return Storage("disk", megabytes, tempfile.TemporaryDirectory(prefix="tensorlm-heal-"))
