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

Stages run in order on the already-compressed model. Each method has one options dataclass below;
unknown option keys are refused with the valid ones listed.
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

RECIPE_DIR = Path(__file__).parent / "recipes"


def _from_dict(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys with the valid ones listed."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TensorLMError(f"{where}: unknown option(s) {unknown}; valid: {sorted(names)}")
    return cls(**data)


@dataclass
class PermuteConfig:
    """Options of the TQCompressor permutation search (:mod:`tensorlm.decompose.permutation`)."""

    time_budget_s: float = 10.0
    seed: int = 0
    max_rounds: int | None = None


@dataclass
class KroneckerConfig:
    """``kronecker``: ``W[p][:, q] ~ sum_k A_k (x) B_k`` for ``nn.Linear``/``Conv1D`` targets.

    Give the factorisation as ``a_shape``/``b_shape``/``rank``; or per dense ``(out, in)`` shape as
    ``shapes: {"OUTxIN": {a_shape, b_shape, rank}}``; or as ``ratio`` (fraction of the dense
    parameters, shapes chosen by :func:`tensorlm.decompose.kronecker.choose_kronecker_shape`).
    ``permute`` turns on the permutation search (TQCompressor).
    """

    a_shape: list[int] | None = None
    b_shape: list[int] | None = None
    rank: int = 1
    shapes: dict[str, dict] | None = None
    ratio: float | None = None
    permute: PermuteConfig | None = None

    def __post_init__(self):
        if isinstance(self.permute, dict | bool):
            self.permute = _from_dict(PermuteConfig, {} if self.permute is True else self.permute, "permute") \
                if self.permute else None
        given = sum(x is not None for x in (self.a_shape, self.shapes, self.ratio))
        if given != 1:
            raise TensorLMError("kronecker options need exactly one of a_shape/b_shape, shapes, or ratio")
        if (self.a_shape is None) != (self.b_shape is None):
            raise TensorLMError("kronecker options: a_shape and b_shape go together")

    def factorisation(self, shape: tuple[int, int], name: str) -> dict | None:
        """``{a_shape, b_shape, rank}`` for a dense ``(out, in)`` shape, or None when ``ratio`` decides.

        Raises:
            TensorLMError: ``shapes`` has no entry for this shape (the entries are listed).
        """
        if self.a_shape is not None:
            return {"a_shape": tuple(self.a_shape), "b_shape": tuple(self.b_shape), "rank": self.rank}
        if self.shapes is not None:
            key = f"{shape[0]}x{shape[1]}"
            if key not in self.shapes:
                raise TensorLMError(f"module {name!r} has (out, in) = {key}; kronecker 'shapes' lists only "
                                    f"{sorted(self.shapes)}")
            entry = self.shapes[key]
            return {"a_shape": tuple(entry["a_shape"]), "b_shape": tuple(entry["b_shape"]),
                    "rank": int(entry.get("rank", 1))}
        return None


@dataclass
class LowRankConfig:
    """``lowrank``: truncated SVD ``W ~ U V`` with a fixed ``rank`` or a parameter ``ratio``."""

    rank: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.ratio is None):
            raise TensorLMError("lowrank options need exactly one of rank or ratio")


@dataclass
class KroneckerEmbeddingConfig:
    """``kronecker_embedding``: ``E[:, q] ~ A (x) b``, ``b: (1, factor)``.

    ``head``: when the replaced table was tied to the LM head, ``tie`` computes logits from the
    factors, ``untie`` keeps the dense head (TQ's released model). ``permute``: search a column
    permutation first.
    """

    factor: int = 2
    head: str = "tie"
    permute: PermuteConfig | None = None

    def __post_init__(self):
        if isinstance(self.permute, dict | bool):
            self.permute = _from_dict(PermuteConfig, {} if self.permute is True else self.permute, "permute") \
                if self.permute else None
        if self.head not in ("tie", "untie"):
            raise TensorLMError(f"kronecker_embedding head must be 'tie' or 'untie', got {self.head!r}")


@dataclass
class TTEmbeddingConfig:
    """``tt_embedding``: every row of the table as a matrix product state by TT-SVD (TensorGPT).

    ``shape``: tensorisation of ``d`` (default: the most balanced with ``n_modes`` factors);
    ``ranks``: fixed internal TT-ranks (one int or ``N-1`` ints); ``eps``: per-row relative tolerance
    in (0, 1) (with ``ranks`` as caps). ``head``: ``tie`` or ``untie``, as for Kronecker embeddings.
    """

    shape: list[int] | None = None
    ranks: int | list[int] | None = None
    eps: float | None = None
    n_modes: int = 3
    head: str = "tie"

    def __post_init__(self):
        if self.ranks is None and self.eps is None:
            raise TensorLMError("tt_embedding options need ranks, eps, or both")
        if self.head not in ("tie", "untie"):
            raise TensorLMError(f"tt_embedding head must be 'tie' or 'untie', got {self.head!r}")


@dataclass
class TTLinearConfig:
    """``tt_linear``: the weight as a TT-matrix with cores ``(r_{k-1}, m_k, n_k, r_k)`` (TT-SVD)."""

    in_shape: list[int] | None = None
    out_shape: list[int] | None = None
    ranks: int | list[int] | None = None
    eps: float | None = None
    n_modes: int = 3

    def __post_init__(self):
        if self.ranks is None and self.eps is None:
            raise TensorLMError("tt_linear options need ranks, eps, or both")


@dataclass
class TuckerBankConfig:
    """``tucker_bank``: all targets cut into ``D x D`` blocks sharing one Tucker decomposition
    ``W_i ~ U (sum_j P[i, j] C_j) V^T`` with ranks ``(l, d)`` (Ren, Wang et al., ICLR 2022), fitted by HOOI.
    ``block_size``: ``D`` (default: the smallest weight dimension, the hidden size)."""

    ranks: list[int] = field(default_factory=list)
    block_size: int | None = None
    n_iter_max: int = 10
    seed: int = 0

    def __post_init__(self):
        if len(self.ranks) != 2:
            raise TensorLMError(f"tucker_bank ranks must be [l, d], got {self.ranks!r}")


METHOD_CONFIGS: dict[str, type] = {
    "kronecker": KroneckerConfig,
    "lowrank": LowRankConfig,
    "kronecker_embedding": KroneckerEmbeddingConfig,
    "tt_embedding": TTEmbeddingConfig,
    "tt_linear": TTLinearConfig,
    "tucker_bank": TuckerBankConfig,
}


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
        if method not in METHOD_CONFIGS:
            raise TensorLMError(f"{where}: method {method!r} is not one of {sorted(METHOD_CONFIGS)}")
        raw_targets = data.pop("targets", None)
        if not raw_targets:
            raise TensorLMError(f"{where}: 'targets' must list at least one module name or 're:' pattern")
        targets = [Target(t) if isinstance(t, str) else _from_dict(Target, t, f"{where} target") for t in raw_targets]
        options = _from_dict(METHOD_CONFIGS[method], data.pop("options", None), f"{where} {method} options")
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
