"""The plan: what compression will do to every targeted module, computed before any decomposition.

``match targets -> plan every target -> (calibrate, allocate) -> build``. A :class:`LayerPlan` says, for
one module, which method replaces it, the dense shape, the layer that will stand in its place with that
layer's constructor config (the ``tensorlm.json`` entry it will have), the factor shapes, the ranks and
the parameters before and after. An allocator may change an entry's ranks (and config) before build;
work done while planning or preparing (a permutation search) travels in ``prepared`` to ``build``.

A :class:`Plan` is JSON-serialisable (``to_dict`` / ``from_dict``) except ``prepared``, which is never
written. Its totals come from a skeleton of the compressed model (the planned layers built on the meta
device, heads re-tied), so they equal the compressed model's parameter count without computing it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerPlan:
    """One targeted module.

    Attributes:
        name: module path (``transformer.h.1.mlp.c_fc``).
        method: registered method name.
        stage: the recipe stage it belongs to.
        dense_shape: the dense weight, ``(out, in)`` for a linear map, ``(V, d)`` for a table.
        layer: class name of the layer that replaces it (``KroneckerLinear``).
        config: that layer's ``tensorlm_config()`` (shapes, ranks, flags; never tensors).
        factors: factor name -> shape, e.g. ``{"a": [r, m1, n1], "b": [r, m2, n2]}``.
        ranks: the ranks (Kronecker terms, SVD rank, TT ranks, Tucker ``(l, d)``).
        params_before, params_after: parameters of the module before and after (a shared bank excluded).
        options: the stage's method options (``dataclasses.asdict``), what ``build`` reads besides ``config``.
        exact: False when ranks are caps that a tolerance may lower at build (TT with ``eps``).
        permute: the permutation search to run (``{"rows", "cols", "seed", "time_budget_s", "max_rounds"}``).
        group: the shared object a joint method builds once for several entries (a Tucker bank id).
        prepared: work done before build (a :class:`~tensorlm.decompose.permutation.PermutationResult`);
            never serialised.
    """

    name: str
    method: str
    stage: str
    dense_shape: list[int]
    layer: str
    config: dict[str, Any]
    factors: dict[str, list[int]]
    ranks: list[int]
    params_before: int
    params_after: int
    options: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    permute: dict[str, Any] | None = None
    group: str | None = None
    prepared: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prepared"}
        return json.loads(json.dumps(out))  # tuples -> lists: equal to what from_dict reads back

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        return cls(**data)


@dataclass
class StagePlan:
    """The entries of one stage; ``shared``: parameters of objects built once per group (``{bank id: n}``);
    ``kept_dense``: targets a budget allocation left dense (their best rank cost as much as the module)."""

    name: str
    method: str
    entries: list[LayerPlan]
    shared: dict[str, int] = field(default_factory=dict)
    kept_dense: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "entries": [e.to_dict() for e in self.entries],
                "shared": dict(self.shared), "kept_dense": list(self.kept_dense)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePlan:
        return cls(data["name"], data["method"], [LayerPlan.from_dict(e) for e in data["entries"]],
                   dict(data.get("shared", {})), list(data.get("kept_dense", [])))


@dataclass
class Plan:
    """Every stage of a recipe planned on one model.

    Attributes:
        recipe: the recipe's name.
        stages: one :class:`StagePlan` per recipe stage, in order.
        params_before: unique parameters of the input model.
        params_after: unique parameters of the compressed model (its ``count_parameters()["total"]``).
        params_after_without_head: the same without the LM head group.
    """

    recipe: str
    stages: list[StagePlan]
    params_before: int
    params_after: int
    params_after_without_head: int

    @property
    def entries(self) -> list[LayerPlan]:
        return [e for s in self.stages for e in s.entries]

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "stages": [s.to_dict() for s in self.stages],
                "params_before": self.params_before, "params_after": self.params_after,
                "params_after_without_head": self.params_after_without_head}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(data["recipe"], [StagePlan.from_dict(s) for s in data["stages"]], data["params_before"],
                   data["params_after"], data["params_after_without_head"])

    def table(self) -> str:
        """A text table: one line per module (stage, method, shapes, ranks, parameters), then the totals."""
        lines = [f"{'module':<36} {'stage':<12} {'method':<20} {'dense':>12} {'factors':<34} {'ranks':<10} "
                 f"{'before':>12} {'after':>12}"]
        for e in self.entries:
            factors = " ".join("x".join(map(str, shape)) for shape in e.factors.values())
            ranks = ",".join(map(str, e.ranks)) + ("" if e.exact else " (caps)")
            lines.append(f"{e.name:<36} {e.stage:<12} {e.method:<20} {'x'.join(map(str, e.dense_shape)):>12} "
                         f"{factors:<34} {ranks:<10} {e.params_before:>12,} {e.params_after:>12,}")
        for s in self.stages:
            lines += [f"{'  shared ' + key:<36} {s.name:<12} {s.method:<20} {'':>12} {'':<34} {'':<10} "
                      f"{'':>12} {count:>12,}" for key, count in s.shared.items()]
        lines += [f"{name:<36} {s.name:<12} {'kept dense':<20}" for s in self.stages for name in s.kept_dense]
        bound = "" if all(e.exact for e in self.entries) else "at most "  # a tolerance lowers the caps' count
        lines.append(f"model parameters: {self.params_before:,} -> {bound}{self.params_after:,} "
                     f"({self.params_after_without_head:,} without the LM head; "
                     f"{self.params_before / self.params_after:.3f}x smaller)")
        return "\n".join(lines)
