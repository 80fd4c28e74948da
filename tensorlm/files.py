"""Writing output folders safely: one atomic-folder helper, one "already exists" rule, one file digest.

Every command that writes a folder (``tensorlm run``, ``compress``, ``distill``, ``export``) and the
distillation checkpoints use these, so the refusal reads the same everywhere and no half-written folder
is left.

The rules of an output folder (:func:`refuse_existing`): it is written to a temporary folder beside it and
renamed into place at the end; an existing folder is replaced only when asked (``--overwrite``) and only
when tensorlm wrote it (it holds :data:`MANIFEST`) or it is empty; never the current directory, one of its
parents, an input model folder or one of an input's parents. Temporary folders are removed on any exit
(an exception, Ctrl-C, SIGTERM through :func:`raise_on_sigterm`, or at interpreter exit), and what is
written follows the umask, as ``save_pretrained``'s folders do.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tensorlm.errors import TensorLMError

MANIFEST = "tensorlm.json"
"""The manifest every folder tensorlm writes holds; only such a folder may be overwritten."""

_PENDING: set[Path] = set()  # temporary folders of atomic_folder calls still running


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks remove temporary folders."""


def _remove_pending() -> None:
    for tmp in list(_PENDING):
        shutil.rmtree(tmp, ignore_errors=True)
        _PENDING.discard(tmp)


atexit.register(_remove_pending)


@contextlib.contextmanager
def raise_on_sigterm():
    """While active, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) instead of killing at once.

    Only in the main thread (signal handlers can be set nowhere else); elsewhere a no-op.
    """
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """Folders ``0o777 & ~umask``, files ``0o666 & ~umask`` (``mkdtemp`` creates its folder 0700)."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _contains(outer: Path, inner: Path) -> bool:
    """True when ``inner`` is ``outer`` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def refuse_existing(folder: str | os.PathLike, overwrite: bool = False, *,
                    inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Check that ``folder`` may be written (or, with ``overwrite``, replaced); before any heavy work.

    Args:
        folder: the output folder.
        overwrite: an existing folder may be replaced (if tensorlm wrote it, or it is empty).
        inputs: paths read by the command (model folders); ``folder`` may be neither one of them nor one
            of their parents. Names that are not local paths (hub ids) are ignored.

    Raises:
        TensorLMError: ``folder`` exists and ``overwrite`` is False; it is a file; it is the current
            directory or one of its parents, an input or an input's parent; it holds files but no
            :data:`MANIFEST` (tensorlm did not write it); its nearest existing parent is not writable.
    """
    folder = Path(folder)
    resolved = folder.resolve()
    if folder.exists() and not folder.is_dir():
        raise TensorLMError(f"output folder {folder} is a file; choose a folder name")
    if _contains(resolved, Path.cwd().resolve()):
        raise TensorLMError(f"output folder {folder} is the current directory or one of its parents; refusing to "
                            "replace it: choose a new folder")
    for source in inputs:
        source_path = Path(source).expanduser()
        if source_path.exists() and _contains(resolved, source_path.resolve()):
            raise TensorLMError(f"output folder {folder} is the input {source} or one of its parents; refusing to "
                                "replace it: choose a new folder")
    if folder.exists():
        if not overwrite:
            raise TensorLMError(f"output folder {folder} already exists; choose another or pass --overwrite")
        if any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            raise TensorLMError(f"output folder {folder} was not written by tensorlm (it has no {MANIFEST}); "
                                "--overwrite replaces only tensorlm's folders: choose a new folder")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TensorLMError(f"output folder {folder} cannot be created: {parent} is not a writable folder")


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, *, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()):
    """Yield a temporary folder beside ``folder`` and swap it in for ``folder`` on success.

    An existing ``folder`` (allowed by :func:`refuse_existing`) is renamed aside, the new one renamed into
    place, then the old one removed: ``folder`` always names a complete folder. On an exception,
    Ctrl-C or SIGTERM (under :func:`raise_on_sigterm`) the temporary folder is removed and ``folder`` is
    untouched; permissions follow the umask.

    Raises:
        TensorLMError: what :func:`refuse_existing` raises.
    """
    folder = Path(folder)
    inputs = list(inputs)
    refuse_existing(folder, overwrite, inputs=inputs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    _PENDING.add(tmp)
    try:
        yield tmp
        _follow_umask(tmp)
        refuse_existing(folder, overwrite, inputs=inputs)  # nothing appeared in the way meanwhile
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        _PENDING.discard(tmp)


def _swap_in(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``; an existing ``folder`` is moved aside first and removed after."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    _PENDING.add(old)
    try:
        os.replace(folder, old)  # an empty folder is replaced by a rename
        try:
            os.replace(new, folder)
        except BaseException:
            os.replace(old, folder)  # put the old folder back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
        _PENDING.discard(old)


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
