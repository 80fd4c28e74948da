"""What a command checks before it loads a model, and the seeding of its random choices.

Each check is cheap (a few file system calls) and fails in one line naming the option to pass:
the device (:func:`check_device`), a stale ``<out>.partial`` work folder (:func:`check_work_folder`) and the
benchmark files an evaluation mode reads (:func:`check_eval_data`). :func:`seed_everything` seeds Python's,
NumPy's and torch's generators (the permutation search, distillation set-up).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from tensorlm.data import DATA_ENV, LAMBADA_TEST, STS_FILES, WIKITEXT2_TEST, resolve_data_dir
from tensorlm.errors import TensorLMError
from tensorlm.evaluate import CAUSAL_PROTOCOLS
from tensorlm.models import expected_kind

DEVICES = "cpu, cuda or cuda:N"
WORK_NAMES = ("distill-", "checkpoint", "best-", "metrics.jsonl")
"""How the names in a work folder start: ``run``'s per-stage ``distill-*`` folders, the trainer's files."""


def check_device(device: str | None) -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``: the model stays where it is loaded).

    Raises:
        TensorLMError: not ``cpu``, ``cuda`` or ``cuda:N``, or a CUDA device this machine does not have.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TensorLMError(f"--device {device!r} is not a device; choose {DEVICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise TensorLMError(f"--device {device!r}: tensorlm runs on {DEVICES}")
    if not torch.cuda.is_available():
        raise TensorLMError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TensorLMError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def check_work_folder(work: str | os.PathLike, resume: bool, restart: bool) -> None:
    """Refuse a stale work folder (``<out>.partial``) unless ``resume``; ``restart`` deletes it.

    An empty folder is no obstacle. Only a folder holding nothing but tensorlm's names (:data:`WORK_NAMES`:
    ``run``'s ``distill-*`` folders, the trainer's checkpoints and log) is deleted.

    Raises:
        TensorLMError: both ``resume`` and ``restart``; the folder exists without either; ``restart`` on a
            path that is not such a folder.
    """
    work = Path(work)
    if resume and restart:
        raise TensorLMError("--resume continues the interrupted run and --restart discards it; pass one of them")
    if not work.is_symlink() and (not work.exists() or (work.is_dir() and not any(work.iterdir()))):
        return
    if restart:
        foreign = [p.name for p in work.iterdir() if not p.name.startswith(WORK_NAMES)] if work.is_dir() else [""]
        if work.is_symlink() or foreign:
            raise TensorLMError(f"--restart: {work} holds files tensorlm did not write ({', '.join(foreign[:3])}); "
                                "remove it by hand")
        shutil.rmtree(work)
        return
    if not resume:
        raise TensorLMError(f"{work} holds an interrupted run's checkpoints: pass --resume to continue it or "
                            "--restart to discard it")


def eval_files(kind: str, mode: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The benchmark files ``tensorlm run`` reads for a model ``kind`` in eval ``mode`` (empty: from the hub).

    Encoders: STS-B test and dev (agreement), SICK test. Causal LMs: WikiText-2 test, LAMBADA and the
    held-out ``lm_text`` shards of the agreement (always local).

    Raises:
        TensorLMError: ``data_dir`` (or ``$TENSORLM_DATA``) names a folder that does not exist; a causal
            LM with neither set (the held-out text has no hub route).
    """
    local = data_dir is not None or bool(os.environ.get(DATA_ENV))
    if mode == "none" or (not local and kind == "encoder"):
        return []
    folder = resolve_data_dir(data_dir)
    if kind == "encoder":
        sets = (("stsb", "test"), ("stsb", "dev"), ("sick", "test"))
        return [folder / STS_FILES[name][split] for name, split in sets]
    shards = CAUSAL_PROTOCOLS[mode].kl_shards
    texts = sorted((folder / "lm_text").glob("*.txt"))[:shards] if (folder / "lm_text").is_dir() else []
    texts += [folder / "lm_text" / f"(shard {i + 1} of {shards})" for i in range(len(texts), shards)]
    return ([folder / WIKITEXT2_TEST, folder / LAMBADA_TEST] if local else []) + texts


def check_eval_data(model: str, mode: str, data_dir: str | os.PathLike | None) -> None:
    """The files the evaluation of ``model`` in ``mode`` reads exist (skipped when the kind is unknown before
    loading, e.g. a hub id).

    Raises:
        TensorLMError: a missing file or data folder, naming the first one missing.
    """
    kind = expected_kind(model)
    if kind is None:
        return
    missing = [p for p in eval_files(kind, mode, data_dir) if not p.is_file()]
    if missing:
        raise TensorLMError(f"--eval {mode} of a {kind} reads {missing[0]}, which is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                            + f"; pass --data-dir (or set {DATA_ENV}) to a folder laid out like shared/data, "
                            "or --eval none")


def check_run(work: str | os.PathLike, model: str, eval_mode: str, data_dir: str | os.PathLike | None, *,
              resume: bool, restart: bool, device: str | None, seed: int | None) -> torch.device | None:
    """Every check ``tensorlm run`` makes before loading, then :func:`seed_everything`; returns the device.

    Raises:
        TensorLMError: what :func:`check_device`, :func:`check_work_folder` and :func:`check_eval_data` raise.
    """
    target = check_device(device)
    check_work_folder(work, resume, restart)
    check_eval_data(model, eval_mode, data_dir)
    seed_everything(seed)
    return target


@contextlib.contextmanager
def accelerate_on(device: torch.device | None):
    """Make accelerate (the distillation trainer) pick ``device``: ``cpu`` through ``ACCELERATE_USE_CPU``,
    ``cuda:N`` through ``torch.cuda.set_device``; the environment is restored afterwards."""
    before = os.environ.get("ACCELERATE_USE_CPU")
    if device is not None and device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif device is not None and device.index is not None:
        torch.cuda.set_device(device)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = before


def seed_everything(seed: int | None) -> None:
    """Seed ``random``, NumPy and torch (CPU and CUDA) with ``seed``; ``None`` leaves them as they are."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
