"""The resumable iterative schedule: which stage's heal phases finished, and the student after each.

A recipe whose stages heal (``heal: {reconstruct: ...}``, then ``distill: {...}``) before the next stage
compresses is TQCompressor's multi-step scheme. :class:`PhaseLog` makes it resumable at the phase level, in
the run's work folder (``<out>.partial``):

* after a phase (``reconstruct`` or ``distill``) of a stage finishes, the student's whole state dict and the
  random number generators' states (Python, NumPy, torch CPU and CUDA) go to
  ``checkpoint-phase-<n>.pt`` (written under a temporary name and renamed), then
  ``checkpoint-schedule.json`` (the recipe's fingerprint and, per finished phase: stage, phase, file,
  sha256 and the phase's report) is replaced atomically, then the file of the stage's previous phase is
  removed (no compression happens between two phases of one stage, so the later one supersedes it);
* a resumed run compresses its stages again (the decompositions are deterministic in the weights they read),
  and each phase the log lists is not run: the student's state and the generators are restored from its
  file instead. So the next stage compresses exactly the weights it compressed in the first run, with the
  same random state, and a run killed anywhere, resumed, ends with the same weights bit for bit as one that
  was never interrupted. A phase cut short (a distillation killed mid-way) continues from the trainer's own
  checkpoint (:mod:`tensorlm.distill.trainer`).

Disk: one whole student per healed stage (SmolLM2-135M in float32: 0.54 GB a stage), until the run ends
and its work folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.files import atomic_file, file_sha256

SCHEDULE_FILE = "checkpoint-schedule.json"
SCHEDULE_FORMAT = 1


def recipe_fingerprint(recipe: dict) -> str:
    """sha256 (hex) of a recipe's dict form (:meth:`tensorlm.recipe.Recipe.to_dict`), keys sorted."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU, every CUDA device) generators, as torch.load-able
    plain values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PhaseLog:
    """The finished phases of one run's schedule, in ``work``; see the module docstring.

    Args:
        work: the run's work folder (created when the first phase finishes).
        recipe: the recipe's dict form; a log of another recipe is refused.
        resume: use the phases a previous run of this folder finished (otherwise the folder must hold none).

    Raises:
        TensorLMError: ``resume`` with a log of another recipe, or a log that is not valid JSON.
    """

    def __init__(self, work: str | os.PathLike, recipe: dict, *, resume: bool) -> None:
        self.work = Path(work)
        self.fingerprint = recipe_fingerprint(recipe)
        self.done: list[dict[str, Any]] = []
        path = self.work / SCHEDULE_FILE
        if resume and path.exists():
            try:
                saved = json.loads(path.read_text())
                fingerprint, done = saved["recipe"], list(saved["done"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TensorLMError(f"schedule: {path} is corrupted ({exc}); pass --restart to start over") from None
            if fingerprint != self.fingerprint:
                raise TensorLMError(f"schedule: {self.work} holds phases of another recipe; --resume continues only "
                                    "the same recipe: restore it, or pass --restart to start over")
            self.done = done

    def run(self, stage: str, phase: str, student: nn.Module, work: Callable[[], dict]) -> dict:
        """``work()`` (which trains ``student`` in place and returns the phase's report), or, when this phase
        finished before, the student and generators restored from its file and the recorded report.

        Raises:
            TensorLMError: the recorded phase's file is missing or does not match its sha256.
        """
        for entry in self.done:
            if (entry["stage"], entry["phase"]) == (stage, phase):
                self._restore(entry, student)
                return entry["report"]
        report = work()
        self._record(stage, phase, student, report)
        return report

    def _restore(self, entry: dict[str, Any], student: nn.Module) -> None:
        if any(e["stage"] == entry["stage"] for e in self.done[self.done.index(entry) + 1:]):
            return  # a later phase of the same stage, also recorded, supersedes this one
        path = self.work / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise TensorLMError(f"schedule: {path} is missing or corrupted (sha256 does not match "
                                f"{SCHEDULE_FILE}); pass --restart to start over")
        state = torch.load(path, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"], strict=True)
        set_rng_state(state["rng"])

    def _record(self, stage: str, phase: str, student: nn.Module, report: dict) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint-phase-{len(self.done):03d}.pt"
        with atomic_file(self.work / name) as tmp:
            torch.save({"student": student.state_dict(), "rng": rng_state()}, tmp)
        self.done.append({"stage": stage, "phase": phase, "file": name, "sha256": file_sha256(self.work / name),
                          "report": json.loads(json.dumps(report, default=str))})
        index = json.dumps({"format": SCHEDULE_FORMAT, "recipe": self.fingerprint, "done": self.done}, indent=1)
        with atomic_file(self.work / SCHEDULE_FILE) as tmp:
            Path(tmp).write_text(index)
        for old in self.done[:-1]:
            if old["stage"] == stage:
                (self.work / old["file"]).unlink(missing_ok=True)
