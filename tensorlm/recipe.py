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
        budget: {ratio: 0.5}          # optional: one parameter budget for all targets; ranks allocated
        heal: {reconstruct: {...}}    # optional: block-wise reconstruction after this stage (tensorlm.heal)
        distill: {...}                # optional; run after this stage by the distillation step
    calibration: {samples: 128, length: 512, seed: 0}   # optional: the calibration text of calibrated stages

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

from tensorlm.distill.config import DistillConfig
from tensorlm.errors import TensorLMError
from tensorlm.heal.config import HealConfig
from tensorlm.methods import METHODS, options_from_dict

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class Budget:
    """One parameter budget for all targets of a stage (``budget: {ratio: r}`` or ``{params: N}``).

    ``ratio``: the targets keep this fraction of their parameters, in (0, 1); ``params``: they keep at
    most this many. Ranks are then allocated across the targets (:mod:`tensorlm.allocate`), not given
    per matrix; ``normalise``: each matrix's loss is its relative (True) or absolute (False) weighted error;
    ``floor``: every matrix keeps at least this fraction of its dense parameters (the allocator would
    otherwise cut some matrices to rank 1); ``sensitivity``: ``fisher`` weights each matrix's absolute
    whitened error by the empirical Fisher of the LM loss at its outputs (:mod:`tensorlm.fisher`), so the
    allocation compares estimated loss increases; it needs ``calibration: whitened`` and a causal LM, and
    replaces ``normalise``.
    """

    ratio: float | None = None
    params: int | None = None
    normalise: bool = True
    floor: float = 0.1
    sensitivity: str | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.params is None):
            raise TensorLMError("budget needs exactly one of ratio or params")
        if self.ratio is not None and not (isinstance(self.ratio, int | float) and 0 < self.ratio < 1):
            raise TensorLMError(f"budget ratio must be a number in (0, 1), got {self.ratio!r}")
        if self.params is not None and not (isinstance(self.params, int) and self.params > 0):
            raise TensorLMError(f"budget params must be a positive integer, got {self.params!r}")
        if not (isinstance(self.floor, int | float) and 0 <= self.floor < 1):
            raise TensorLMError(f"budget floor must be a number in [0, 1), got {self.floor!r}")
        if self.sensitivity not in (None, "fisher"):
            raise TensorLMError(f"budget sensitivity must be fisher (or absent), got {self.sensitivity!r}")

    def limit(self, params_before: int) -> int:
        """The parameters the targets may keep, given what they hold now."""
        return int(self.ratio * params_before) if self.ratio is not None else self.params


@dataclass
class CalibrationSettings:
    """The calibration text of a recipe's calibrated stages (``calibration:`` at the top of a recipe).

    ``samples`` sequences of ``length`` tokens of ``lm_text`` for causal LMs (training blocks, never a test
    split), or ``samples`` training sentences of at most ``length`` tokens for encoders; ``seed`` picks them.
    Defaults: 128 x 512 (causal LMs), 1,024 sentences of 128 tokens (encoders). ``count_samples``: the token
    counts of ``frequency``-calibrated tables are taken on this many samples, drawn the same way, instead of
    ``samples``: counting needs no forward pass, so it can read far more text than the second moments (4,096 x
    512 tokens in seconds), and a frequency estimate from ``samples`` alone leaves most tokens unseen.
    """

    samples: int | None = None
    length: int | None = None
    seed: int = 0
    count_samples: int | None = None

    def __post_init__(self):
        for key in ("samples", "length", "count_samples"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise TensorLMError(f"calibration {key} must be a positive integer, got {value!r}")


@dataclass
class Target:
    """A target pattern: an exact module name, or ``re:`` + a regex (full match), with an optional
    layer filter: ``odd``, ``even``, a list of indices, or ``"a-b"`` (inclusive); the layer index is the
    number after ``h.``/``layer.``/``layers.``/``blocks.`` in the module path."""

    match: str
    layers: str | list[int] | None = None

    def __post_init__(self):
        if not isinstance(self.match, str) or not self.match:
            raise TensorLMError(f"target match must be a module name or 're:' + a regex, got {self.match!r}")
        if self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as err:
                raise TensorLMError(f"target {self.match!r}: invalid regex ({err})") from None
        layers = self.layers
        ok = (layers is None or layers in ("odd", "even")
              or (isinstance(layers, str) and re.fullmatch(r"\d+-\d+", layers))
              or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in layers)))
        if not ok:
            raise TensorLMError(f"target {self.match!r}: layers {layers!r} must be odd, even, a list of indices "
                                "or 'a-b'")

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
    budget: Budget | None = None
    heal: HealConfig | None = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TensorLMError(f"stage name must be a string, got {self.name!r}")
        if self.distill is not None:
            where = f"stage {self.name!r} distill"
            if not isinstance(self.distill, dict):
                raise TensorLMError(f"{where}: must be a mapping of DistillConfig fields, got {self.distill!r}")
            try:
                DistillConfig.from_dict(self.distill)
            except TypeError as err:
                raise TensorLMError(f"{where}: {err}") from None
            except TensorLMError as err:
                raise TensorLMError(f"{where}: {err}") from None

    @classmethod
    def from_dict(cls, data: dict, index: int) -> Stage:
        """The stage at ``index`` of a recipe's ``stages`` list.

        Raises:
            TensorLMError: not a mapping; an unknown method or key; ``targets`` not a non-empty list;
                options, budget, heal or distill block that do not validate (each names the stage and key).
        """
        if not isinstance(data, dict):
            raise TensorLMError(f"stage {index}: must be a mapping with method, targets and options, got {data!r}")
        where = f"stage {index} ({data.get('name', 'unnamed')})"
        data = dict(data)
        method = data.pop("method", None)
        if not isinstance(method, str) or method not in METHODS:
            raise TensorLMError(f"{where}: method {method!r} is not one of {sorted(METHODS)}")
        raw_targets = data.pop("targets", None)
        if not raw_targets or not isinstance(raw_targets, list):
            raise TensorLMError(f"{where}: 'targets' must be a list of at least one module name, 're:' pattern or "
                                f"{{match, layers}} mapping, got {raw_targets!r}")
        if not all(isinstance(t, str | dict) for t in raw_targets):
            raise TensorLMError(f"{where}: each target is a module name, 're:' pattern or {{match, layers}} mapping; "
                                f"got {raw_targets!r}")
        targets = [Target(t) if isinstance(t, str) else options_from_dict(Target, t, f"{where} target")
                   for t in raw_targets]
        options = options_from_dict(METHODS[method].options, data.pop("options", None), f"{where} {method} options")
        budget = data.pop("budget", None)
        budget = None if budget is None else options_from_dict(Budget, budget, f"{where} budget")
        heal = data.pop("heal", None)
        heal = None if heal is None else HealConfig.from_dict(heal, f"{where} heal")
        if budget is not None and budget.sensitivity and getattr(options, "calibration", None) != "whitened":
            raise TensorLMError(f"{where}: budget sensitivity {budget.sensitivity!r} weighs whitened errors; set "
                                f"options calibration: whitened")
        stage = cls(data.pop("name", f"stage{index}"), method, targets, options, data.pop("distill", None), budget,
                    heal)
        if data:
            raise TensorLMError(
                f"{where}: unknown key(s) {sorted(data)}; valid: name, method, targets, options, budget, heal, distill"
            )
        return stage

    def to_dict(self) -> dict:
        out = {"name": self.name, "method": self.method, "targets": [t.to_json() for t in self.targets],
               "options": _drop_none(dataclasses.asdict(self.options))}
        if self.budget is not None:
            out["budget"] = _drop_none(dataclasses.asdict(self.budget))
        if self.heal is not None:
            out["heal"] = self.heal.to_dict()
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
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self):
        if self.extra:
            valid = ["stages", *(f.name for f in dataclasses.fields(self) if f.name not in ("stages", "extra"))]
            raise TensorLMError(f"recipe: unknown top-level key(s) {sorted(map(str, self.extra))}; valid: {valid}")
        for key in ("name", "description"):
            if not isinstance(getattr(self, key), str):
                raise TensorLMError(f"recipe {key} must be a string, got {getattr(self, key)!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise TensorLMError(f"recipe model must be a string, got {self.model!r}")

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Build and validate a recipe (every stage, target, option, budget and distill block).

        Raises:
            TensorLMError: anything invalid; the message names the stage, the key and the valid choices.
        """
        if not isinstance(data, dict) or not data.get("stages"):
            raise TensorLMError("a recipe is a mapping with a non-empty 'stages' list")
        data = dict(data)
        if not isinstance(data["stages"], list):
            raise TensorLMError(f"recipe 'stages' must be a list of stages, got a {type(data['stages']).__name__}")
        stages = [Stage.from_dict(s, i) for i, s in enumerate(data.pop("stages"))]
        calibration = options_from_dict(CalibrationSettings, data.pop("calibration", None), "recipe calibration")
        return cls(data.pop("name", "custom"), stages, data.pop("description", ""), data.pop("model", None), data,
                   calibration)

    def to_dict(self) -> dict:
        out = {"name": self.name, "description": self.description, "model": self.model, **self.extra}
        if self.calibrated:
            out["calibration"] = dataclasses.asdict(self.calibration)
        return {**out, "stages": [s.to_dict() for s in self.stages]}

    @property
    def calibrated(self) -> bool:
        """True when a stage asks for calibration statistics (a method option ``calibration``)."""
        return any(getattr(s.options, "calibration", None) for s in self.stages)

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


def recipe_path(name: str) -> Path:
    """The YAML file of the built-in recipe ``name`` (it may not exist; see :func:`builtin_recipes`)."""
    return RECIPE_DIR / f"{name}.yaml"


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in ``tensorlm/recipes``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
