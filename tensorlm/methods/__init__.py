"""Compression methods: one module per method, each registering itself with :func:`register_method`.

Importing this package registers the built-in methods: ``kronecker``, ``lowrank``, ``lowrank_embedding``,
``kronecker_embedding``, ``tt_embedding``, ``tt_matrix_embedding``, ``tt_linear`` and ``tucker_bank``. A new
method is a module that calls :func:`register_method` when imported (see :mod:`tensorlm.methods.registry`).
"""

from tensorlm.methods import (
    kronecker,
    kronecker_embedding,
    lowrank,
    lowrank_embedding,
    tt_embedding,
    tt_linear,
    tt_matrix_embedding,
    tucker_bank,
)
from tensorlm.methods.registry import METHODS, Method, PlanContext, get_method, options_from_dict, register_method

BUILTIN = (kronecker, kronecker_embedding, lowrank, lowrank_embedding, tt_embedding, tt_linear, tt_matrix_embedding,
           tucker_bank)

__all__ = ["BUILTIN", "METHODS", "Method", "PlanContext", "get_method", "options_from_dict", "register_method"]
