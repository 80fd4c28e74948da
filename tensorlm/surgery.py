"""Model surgery: match recipe targets to modules and swap in factorized layers.

Surgery knows the layers only through ``Layer.from_dense(...)``. Embedding replacements also
settle the LM head: a head tied to the replaced table is either re-tied to the factors
(:class:`~tensorlm.layers.kronecker.TiedHead`) or kept as an untied dense head, as the recipe says.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings

from torch import nn
from tqdm.auto import tqdm

from tensorlm.decompose.kronecker import choose_kronecker_shape
from tensorlm.decompose.permutation import SEARCHED_B_SIDES, search_permutations
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import LAYERS, dense_weight, is_conv1d
from tensorlm.layers.kronecker import KroneckerEmbedding, KroneckerLinear, TiedHead
from tensorlm.layers.lowrank import LowRankLinear
from tensorlm.layers.tt import TTEmbedding, TTLinear, TTTiedHead
from tensorlm.layers.tucker import bank_from_dense
from tensorlm.recipe import Recipe, Stage, Target

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layer|layers|blocks)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The transformer block index in a module path (``transformer.h.3.mlp`` -> 3), or None."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding | KroneckerEmbedding)


def is_dense_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


ACCEPTS = {"kronecker": is_linear, "lowrank": is_linear, "kronecker_embedding": is_embedding,
           "tt_embedding": is_dense_embedding, "tt_linear": is_linear, "tucker_bank": is_linear}


def match_targets(model: nn.Module, stage: Stage) -> list[str]:
    """Module names the stage's targets select, in model order, restricted to what its method accepts.

    Raises:
        TensorLMError: a target matches no module (the closest module names are listed), or an exact
            name is a module the method cannot take.
    """
    accepts = ACCEPTS[stage.method]
    modules = dict(model.named_modules())
    chosen: dict[str, None] = {}
    for target in stage.targets:
        hits = _match(target, modules)
        if target.match in modules and hits and not accepts(modules[target.match]):
            raise TensorLMError(f"stage {stage.name!r}: module {target.match!r} is a "
                                f"{type(modules[target.match]).__name__}, which method {stage.method!r} cannot take")
        hits = [n for n in hits if accepts(modules[n])]
        if not hits:
            raise TensorLMError(_no_match_message(stage, target, modules, accepts))
        chosen.update(dict.fromkeys(hits))
    return list(chosen)


def _match(target: Target, modules: dict[str, nn.Module]) -> list[str]:
    if target.match.startswith("re:"):
        pattern = re.compile(target.match[3:])
        names = [n for n in modules if pattern.fullmatch(n)]
    else:
        names = [target.match] if target.match in modules else []
    return [n for n in names if target.layer_ok(layer_index(n))]


def _no_match_message(stage: Stage, target: Target, modules: dict, accepts) -> str:
    candidates = [n for n, m in modules.items() if n and accepts(m)]
    probe = target.match[3:] if target.match.startswith("re:") else target.match
    close = difflib.get_close_matches(probe, candidates, n=5, cutoff=0.3) or candidates[:5]
    layers = "" if target.layers is None else f" with layers={target.layers!r}"
    return (f"stage {stage.name!r}: target {target.match!r}{layers} matches no module that method "
            f"{stage.method!r} accepts; closest names: {', '.join(close)}")


def _build_kronecker(module: nn.Module, name: str, options) -> nn.Module:
    w, _ = dense_weight(module, name)
    fact = options.factorisation(tuple(w.shape), name)
    if fact is None:
        shape = choose_kronecker_shape(tuple(w.shape), options.ratio, weight=w)
        fact = {"a_shape": shape.a_shape, "b_shape": shape.b_shape, "rank": shape.rank}
    perms = {}
    if options.permute is not None:
        rows, cols = (side in SEARCHED_B_SIDES for side in fact["b_shape"])
        if not (rows and cols):
            warnings.warn(f"{name}: B {tuple(fact['b_shape'])} has a side not in {SEARCHED_B_SIDES}; only the "
                          f"{'row' if rows else 'column' if cols else 'no'} permutation is searched", stacklevel=2)
        if rows or cols:
            found = search_permutations(w, fact["a_shape"], fact["b_shape"], fact["rank"], rows=rows, cols=cols,
                                        seed=options.permute.seed, time_budget_s=options.permute.time_budget_s,
                                        max_rounds=options.permute.max_rounds, name=name)
            perms = {"row_perm": found.row_perm if rows else None, "col_perm": found.col_perm if cols else None}
    return KroneckerLinear.from_dense(module, fact["a_shape"], fact["b_shape"], fact["rank"], name=name, **perms)


def _build_lowrank(module: nn.Module, name: str, options) -> nn.Module:
    return LowRankLinear.from_dense(module, rank=options.rank, ratio=options.ratio, name=name)


def _build_kronecker_embedding(module: nn.Module, name: str, options) -> nn.Module:
    col_perm = None
    if options.permute is not None:
        table = module if isinstance(module, nn.Embedding) else module.to_dense()
        w = table.weight.detach()  # (V, d)
        found = search_permutations(w, (w.shape[0], w.shape[1] // options.factor), (1, options.factor), 1,
                                    seed=options.permute.seed, time_budget_s=options.permute.time_budget_s,
                                    max_rounds=options.permute.max_rounds, rows=False)
        col_perm = found.col_perm
    return KroneckerEmbedding.from_dense(module, options.factor, col_perm=col_perm, name=name)


def _build_tt_embedding(module: nn.Module, name: str, options) -> nn.Module:
    return TTEmbedding.from_dense(module, shape=options.shape, ranks=options.ranks, eps=options.eps,
                                  n_modes=options.n_modes)


def _build_tt_linear(module: nn.Module, name: str, options) -> nn.Module:
    return TTLinear.from_dense(module, in_shape=options.in_shape, out_shape=options.out_shape, ranks=options.ranks,
                               eps=options.eps, n_modes=options.n_modes)


def _build_tucker_bank(modules: dict[str, nn.Module], options) -> dict[str, nn.Module]:
    return bank_from_dense(modules, ranks=tuple(options.ranks), block_size=options.block_size,
                           n_iter_max=options.n_iter_max, seed=options.seed)


# one module at a time: (module, name, options) -> replacement
BUILDERS = {"kronecker": _build_kronecker, "lowrank": _build_lowrank,
            "kronecker_embedding": _build_kronecker_embedding, "tt_embedding": _build_tt_embedding,
            "tt_linear": _build_tt_linear}
# all targets at once: ({name: module}, options) -> {name: replacement}
JOINT_BUILDERS = {"tucker_bank": _build_tucker_bank}
# embedding methods: the head that computes logits from the new table
TIED_HEADS = {"kronecker_embedding": TiedHead, "tt_embedding": TTTiedHead}


def _settle_head(model: nn.Module, old: nn.Module, new: nn.Module, name: str, method, head: str) -> None:
    """After replacing embedding ``old`` by ``new``: re-tie or untie an LM head that shared its table."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out else None
    if not isinstance(out, nn.Linear) or not isinstance(old, nn.Embedding) or out.weight is not old.weight:
        return
    if getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = False  # stop transformers from re-tying to a table that is gone
    if head == "tie":
        model.set_output_embeddings(TIED_HEADS[method](new, name))


def apply_stage(model: nn.Module, stage: Stage, *, progress: bool = True) -> list[str]:
    """Replace, in place, every module ``stage`` targets; return their names.

    Raises:
        TensorLMError: from target matching or from the layer's ``from_dense``.
    """
    names = match_targets(model, stage)
    if stage.method in JOINT_BUILDERS:
        for name, new in JOINT_BUILDERS[stage.method]({n: model.get_submodule(n) for n in names},
                                                      stage.options).items():
            model.set_submodule(name, new)
        return names
    build = BUILDERS[stage.method]
    for name in tqdm(names, desc=f"{stage.name} ({stage.method})", disable=not progress, leave=False):
        old = model.get_submodule(name)
        new = build(old, name, stage.options)
        model.set_submodule(name, new)
        if stage.method in TIED_HEADS:
            _settle_head(model, old, new, name, stage.method, stage.options.head)
    return names


def compress(model: nn.Module, recipe: Recipe | str, *, progress: bool = True, inplace: bool = False,
             after_stage=None) -> nn.Module:
    """Compress ``model`` by ``recipe``, stage by stage; the input model is left untouched.

    Args:
        model: a Hugging Face model (or any ``nn.Module``).
        recipe: a :class:`~tensorlm.recipe.Recipe` or a built-in name / YAML path.
        progress: show a progress bar per stage.
        inplace: modify ``model`` itself instead of a deep copy.
        after_stage: ``callable(model, stage, replaced_names)`` run after each stage (the
            distillation step of iterative compression). Without it, a stage's ``distill:`` block is
            recorded in the recipe and skipped with a message.

    Returns:
        The compressed model (eval mode unless it was training).

    Raises:
        TensorLMError: invalid targets, shapes or options.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    out = model if inplace else copy.deepcopy(model)
    for stage in recipe.stages:
        replaced = apply_stage(out, stage, progress=progress)
        if after_stage is not None:
            after_stage(out, stage, replaced)
        elif stage.distill is not None and progress:
            print(f"stage {stage.name!r}: distill block recorded but not run here (use tensorlm run or distill)")
    return out


def decompress(model: nn.Module) -> nn.Module:
    """A dense copy of ``model``: every factorized layer replaced by its ``to_dense()`` module.

    Permutations are undone, tied heads become untied dense heads holding a copy of the table, and
    nested factorizations are expanded from the outside (the outer ``to_dense()`` forms the whole
    table). The input model is left untouched.
    """
    out = copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if type(m).__name__ in LAYERS]
    for name in [n for n in names if not any(n.startswith(p + ".") for p in names)]:
        out.set_submodule(name, out.get_submodule(name).to_dense())
    return out
