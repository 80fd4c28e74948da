"""Recipes: which modules to compress, by which method, with which options, in which stages.

A recipe is YAML::

    name: minilm-kronecker-ffn
    description: ...
    model: all-MiniLM-L6-v2          # the model it was written for (the CLI default)
    stages:
      - name: ffn
        method: kronecker
        targets:
          - "re:encoder\\.layer\\.\\d+\\.intermediate\\.dense"
          - {match: "re:encoder\\.layer\\.\\d+\\.output\\.dense", layers: odd}
        options: {shapes: {"1536x384": {a_shape: [768, 192], b_shape: [2, 2], rank: 2}}}
        distill: {...}                # optional; run after this stage by the distillation step

Stages run in order on the already-compressed model. ``method`` names a method of the registry
(:mod:`tensorlm.methods`); ``options`` are the keyword arguments of that method's options dataclass,
unknown keys refused with the valid ones listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tensorlm.errors import TensorLMError
from tensorlm.methods import METHODS, options_from_dict

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class Target:
    """A target pattern: an exact module name, or ``re:`` + a regex (full match), with an optional
    layer filter: ``odd``, ``even``, a list of indices, or ``"a-b"`` (inclusive); the layer index is the
    number after ``h.``/``layer.``/``layers.``/``blocks.`` in the module path."""

    match: str
    layers: str | list[int] | None = None

    def layer_ok(self, index: int | None) -> bool:
        if self.layers is None:
            return True
        if index is None:
            return False
        if self.layers == "odd":
            return index % 2 == 1
        if self.layers == "even":
            return index % 2 == 0
        if isinstance(self.layers, str) and re.fullmatch(r"\d+-\d+", self.layers):
            lo, hi = map(int, self.layers.split("-"))
            return lo <= index <= hi
        if isinstance(self.layers, list):
            return index in self.layers
        raise TensorLMError(f"layer filter {self.layers!r}: use odd, even, a list of indices or 'a-b'")

    def to_json(self):
        return self.match if self.layers is None else {"match": self.match, "layers": self.layers}


@dataclass
class Stage:
    """One compression stage: ``method`` applied to every module the ``targets`` match."""

    name: str
    method: str
    targets: list[Target]
    options: object
    distill: dict | None = None

    @classmethod
    def from_dict(cls, data: dict, index: int) -> Stage:
        where = f"stage {index} ({data.get('name', 'unnamed')})"
        data = dict(data)
        method = data.pop("method", None)
        if method not in METHODS:
            raise TensorLMError(f"{where}: method {method!r} is not one of {sorted(METHODS)}")
        raw_targets = data.pop("targets", None)
        if not raw_targets:
            raise TensorLMError(f"{where}: 'targets' must list at least one module name or 're:' pattern")
        targets = [Target(t) if isinstance(t, str) else options_from_dict(Target, t, f"{where} target")
                   for t in raw_targets]
        options = options_from_dict(METHODS[method].options, data.pop("options", None), f"{where} {method} options")
        stage = cls(data.pop("name", f"stage{index}"), method, targets, options, data.pop("distill", None))
        if data:
            raise TensorLMError(
                f"{where}: unknown key(s) {sorted(data)}; valid: name, method, targets, options, distill"
            )
        return stage

    def to_dict(self) -> dict:
        out = {"name": self.name, "method": self.method, "targets": [t.to_json() for t in self.targets],
               "options": _drop_none(dataclasses.asdict(self.options))}
        if self.distill is not None:
            out["distill"] = self.distill
        return out


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class Recipe:
    """A named list of stages, loaded from YAML (a path or a built-in name) or a dict."""

    name: str
    stages: list[Stage]
    description: str = ""
    model: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict) or not data.get("stages"):
            raise TensorLMError("a recipe is a mapping with a non-empty 'stages' list")
        data = dict(data)
        stages = [Stage.from_dict(s, i) for i, s in enumerate(data.pop("stages"))]
        return cls(data.pop("name", "custom"), stages, data.pop("description", ""), data.pop("model", None), data)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "model": self.model, **self.extra,
                "stages": [s.to_dict() for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> Recipe:
        """Load a recipe from a YAML/JSON file, or a built-in by name (see :func:`builtin_recipes`).

        Raises:
            TensorLMError: no such file or built-in (the built-ins are listed), or invalid content.
        """
        path = Path(name_or_path)
        if not path.is_file():
            path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TensorLMError(f"recipe {str(name_or_path)!r} is neither a file nor a built-in; "
                                f"built-ins: {', '.join(builtin_recipes())}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise TensorLMError(f"recipe {path}: invalid YAML: {err}") from err
        return cls.from_dict(data)


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in ``tensorlm/recipes``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
