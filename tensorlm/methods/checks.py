"""Checks of recipe option values against the annotations of an options dataclass.

:func:`tensorlm.methods.registry.options_from_dict` runs :func:`check_fields` before building any
options dataclass, so every method gets, without code of its own: a mapping (not a list or a string),
known keys, and values of the annotated types (``rank: int`` refuses ``"4"``, ``a_shape: list[int]``
refuses ``"2x3"``). Range rules shared by all methods follow the field names in :data:`POSITIVE`
(ranks, shapes and sizes are >= 1) and :data:`TWO_SIDED` (a factor shape has two sides); a method's
own ``__post_init__`` checks the rest.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from tensorlm.errors import TensorLMError

POSITIVE = {"rank", "ranks", "a_shape", "b_shape", "shape", "in_shape", "out_shape", "factor", "n_modes",
            "block_size", "n_iter_max", "samples", "length"}
"""Option names whose integers (or every integer of whose lists) must be >= 1."""
TWO_SIDED = {"a_shape", "b_shape"}
"""Option names that are ``[rows, cols]``."""


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value, hint) -> bool:
    """Whether ``value`` (parsed YAML) fits the annotation ``hint`` (dataclass-typed fields: any mapping/bool)."""
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | bool) or isinstance(value, hint)  # parsed by the method itself
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, list | tuple)
    if origin is dict or hint is dict:
        args = typing.get_args(hint)
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True  # an annotation this checker does not know: the dataclass decides


def check_fields(cls, data, where: str) -> dict:
    """``data`` as a dict of ``cls``'s fields, checked against their annotations.

    Raises:
        TensorLMError: ``data`` is not a mapping; an unknown key (the valid ones listed); a value of the
            wrong type (the expected type named); a rank, shape or size below 1; a factor shape without
            exactly two sides.
    """
    if data is None:
        return {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        raise TensorLMError(f"{where}: must be a mapping of {sorted(fields)}, got a {type(data).__name__} "
                            f"({data!r})")
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise TensorLMError(f"{where}: unknown option(s) {unknown}; valid: {sorted(fields)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: leave the types to the dataclass
        hints = {}
    for key, value in data.items():
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            raise TensorLMError(f"{where}: option {key!r} must be {_type_name(hint)}, got {value!r} "
                                f"({type(value).__name__})")
        _check_range(key, value, where)
    return dict(data)


def _check_range(key: str, value, where: str) -> None:
    if key in TWO_SIDED and value is not None and (not isinstance(value, list | tuple) or len(value) != 2):
        raise TensorLMError(f"{where}: option {key!r} must be [rows, cols] (two sides), got {value!r}")
    if key in POSITIVE and value is not None:
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, int | float) and not isinstance(v, bool) and v < 1 for v in values):
            raise TensorLMError(f"{where}: option {key!r} must be >= 1, got {value!r}")
