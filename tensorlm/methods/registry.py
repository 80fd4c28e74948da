"""The method registry: each compression method registers itself here once.

A method module (``tensorlm/methods/<name>.py``, or any module of a user's) defines an options dataclass
and functions, and calls :func:`register_method` at import::

    @dataclass
    class DiagLowRankOptions:
        rank: int = 4

    def plan(module, name, options, context) -> LayerPlan: ...     # shapes and ranks, no decomposition
    def build(module, entry, stats=None) -> nn.Module: ...         # the decomposition, from the entry

    register_method(Method("diag_lowrank", DiagLowRankOptions, accepts=is_linear, plan=plan, build=build))

Surgery, recipes, planning, save and load read this registry and nothing else. Style after peft's
``register_peft_method`` and torchao's ``register_quantize_module_handler``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tensorlm.errors import TensorLMError
from tensorlm.layers.base import TiedHead, is_conv1d
from tensorlm.methods.checks import check_fields
from tensorlm.plan import LayerPlan


@dataclass(frozen=True)
class PlanContext:
    """What a method's ``plan`` may know besides the module: its stage, and whether the weights are real.

    ``weights``: False when planning on a skeleton (meta tensors, a table a previous stage will build);
    a method must then plan from shapes alone.
    """

    stage: str
    weights: bool = True


@dataclass(frozen=True)
class Method:
    """A registered compression method.

    Attributes:
        name: the recipe's ``method:`` value.
        options: the options dataclass; recipe ``options:`` are its keyword arguments (unknown keys refused).
        accepts: ``accepts(module) -> bool``: the modules it can replace.
        plan: ``plan(module, name, options, context) -> LayerPlan``; for a ``joint`` method
            ``plan(modules: {name: module}, options, context) -> (list[LayerPlan], shared: {group: params})``.
            Never decomposes (a ``ratio`` Kronecker choice compares candidate errors when weights are real).
        build: ``build(module, entry, stats=None) -> nn.Module``; for a ``joint`` method
            ``build(modules, entries, stats=None) -> {name: module}``. ``stats``: per-module calibration
            statistics (``{name: ...}``) when a calibration step provides them, else None.
        prepare: optional ``prepare(module, entry) -> None``: expensive work before build whose result it
            stores in ``entry.prepared`` (a permutation search); ``build`` uses it instead of redoing it.
        joint: plan and build all targets of a stage at once (they share factors).
        tied_head: for methods that replace a token table: ``tied_head(new_table, name, options)`` returns
            the head that computes logits from the new table, or None to keep an untied dense head.
        rank_curve: optional ``rank_curve(module, entry, stats, normalise, floor) -> RankCurve``: the loss of
            every rank the entry may take from ``floor`` of its dense parameters up
            (:mod:`tensorlm.decompose.allocation`), for a stage ``budget``.
        rerank: optional ``rerank(entry, rank) -> LayerPlan | None``: the entry re-planned at another rank,
            or None to keep the dense module (a rank that would cost as much as the module).
        plan_reads_weights: optional ``plan_reads_weights(options) -> bool``: True when ``plan`` chooses from
            the weight values, not from shapes alone (a dry run must then load the real weights).
    """

    name: str
    options: type
    accepts: Callable[[nn.Module], bool]
    plan: Callable[..., Any]
    build: Callable[..., Any]
    prepare: Callable[[nn.Module, LayerPlan], None] | None = None
    joint: bool = False
    tied_head: Callable[[nn.Module, str, Any], nn.Module | None] | None = None
    rank_curve: Callable[..., Any] | None = None
    rerank: Callable[[LayerPlan, int], LayerPlan | None] | None = None
    plan_reads_weights: Callable[[Any], bool] | None = None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a later registration of the same name replaces it); returns it.

    Raises:
        TensorLMError: ``method.options`` is not a dataclass.
    """
    if not dataclasses.is_dataclass(method.options):
        raise TensorLMError(f"method {method.name!r}: options must be a dataclass, got {method.options!r}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        TensorLMError: no such method (the registered ones are listed).
    """
    if name not in METHODS:
        raise TensorLMError(f"method {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def options_from_dict(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys with the valid ones listed.

    Raises:
        TensorLMError: ``data`` not a mapping, unknown or missing required keys, values of the wrong type or range
            (:func:`tensorlm.methods.checks.check_fields`), or what ``cls.__post_init__`` raises.
    """
    data = check_fields(cls, data, where)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in data]
    if required:
        raise TensorLMError(f"{where}: missing required key(s) {required}")
    try:
        return cls(**data)
    except TensorLMError as err:
        raise TensorLMError(f"{where}: {err}") from None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(out_features, in_features, has_bias)`` of an ``nn.Linear`` or ``Conv1D`` (meta tensors welcome)."""
    out_features, in_features = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
    return int(out_features), int(in_features), module.bias is not None


def tie_by_option(new: nn.Module, name: str, options) -> nn.Module | None:
    """The tied-head rule of the embedding methods: ``options.head == "tie"`` ties logits to ``new``."""
    return TiedHead(new, name) if options.head == "tie" else None


CALIBRATIONS = (None, "whitened")


def check_calibration(value, method: str) -> None:
    """Raise :class:`TensorLMError` unless ``value`` is a known ``calibration`` option (None or ``whitened``)."""
    if value not in CALIBRATIONS:
        raise TensorLMError(f"{method} calibration must be one of {list(CALIBRATIONS)}, got {value!r}")


def second_moment(stats, entry: LayerPlan):
    """The input second moment ``G (in, in)`` (float64) of ``entry``'s module from calibration ``stats``.

    Raises:
        TensorLMError: no statistics for this module (the recipe asks for calibration but none ran).
    """
    found = None if stats is None else stats.get(entry.name)
    if found is None:
        raise TensorLMError(f"{entry.name}: stage {entry.stage!r} asks for calibration, but no calibration "
                            "statistics were given; pass tokenizer= and data_dir= to tensorlm.compress, or use "
                            "tensorlm run")
    return found.second_moment


def check_head(head: str, method: str) -> None:
    """Raise :class:`TensorLMError` unless ``head`` is ``tie`` or ``untie``."""
    if head not in ("tie", "untie"):
        raise TensorLMError(f"{method} head must be 'tie' or 'untie', got {head!r}")
