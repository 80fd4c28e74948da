"""Writing output folders safely: one atomic-folder helper, one "already exists" rule, one file digest.

Every command that writes a folder (``tensorlm run``, ``compress``, ``distill``) and the distillation
checkpoints use these, so the refusal reads the same everywhere and no half-written folder is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tensorlm.errors import TensorLMError


def refuse_existing(folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise :class:`TensorLMError` when ``folder`` exists and ``overwrite`` is False."""
    if Path(folder).exists() and not overwrite:
        raise TensorLMError(f"output folder {folder} already exists; choose another or pass --overwrite")


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder beside ``folder`` and rename it to ``folder`` on success.

    On an exception the temporary folder is removed and ``folder`` is untouched.

    Raises:
        TensorLMError: ``folder`` exists and ``overwrite`` is False.
    """
    folder = Path(folder)
    refuse_existing(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash leaves either the old file or the new one, never a partial file under ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
