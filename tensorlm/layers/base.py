"""What every factorized layer shares: reading a dense weight, a registry for save/load, and the tied LM head.

A factorized layer class implements

* ``from_dense(layer, ...)``: build it from an ``nn.Linear`` or GPT-2 ``Conv1D`` (or ``nn.Embedding``);
* ``tensorlm_config() -> dict``: JSON-able constructor arguments (shapes, ranks, flags, never tensors);
* ``from_tensorlm_config(cfg, shared)``: an uninitialised module of the same shapes, whose state dict
  the saved file then fills; ``shared`` is one dict per model that the loader passes to every layer it
  rebuilds, mapping the paths of modules rebuilt earlier to those modules, and holding objects that
  several layers share (a Tucker bank) under keys the layers choose;
* ``to_dense()``: the equivalent dense module.

and is registered with :func:`register_layer` so that :mod:`tensorlm.io` can rebuild it by name.

Registering also gives the class a **forward choice** (tltorch's ``implementation='factorized' |
'reconstructed'``; see :func:`choose_forward`): every layer can run its factored forward or a forward
through its reconstructed dense weight (``to_dense()``, cached beside the module, never a parameter nor in
the state dict). The choice is one path, or one path per number of input rows (tokens), and travels in
the layer's ``tensorlm_config()`` under :data:`FORWARD_KEY`, so saved folders keep it; a config without the
key (older folders) loads as ``"factorized"``. The reconstructed path runs only when no gradient is
needed (``torch.no_grad``/``inference_mode``, or no parameter requires grad); otherwise the factored
forward runs, so training always updates the factors. The cache is rebuilt whenever a parameter or buffer
of the layer changed (in-place version counter, storage, dtype or device), e.g. after an optimizer step,
``load_state_dict`` or ``.to()``. The same mechanism (:func:`cached`, guarded by :func:`needs_grad`) keeps
whatever else a layer derives from its parameters alone for inference: a Tucker bank's cores, a TT table
behind a tied head.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tensorlm.decompose.linalg import check_finite
from tensorlm.errors import TensorLMError

LAYERS: dict[str, type[nn.Module]] = {}


def register_layer(cls: type[nn.Module] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: make ``cls`` loadable by name from a saved ``tensorlm.json``, and give it the
    forward choice (:func:`install_forward_choice`).

    ``aliases``: former class names that folders saved by earlier versions still carry
    (``@register_layer(aliases=("TTTiedHead",))``).
    """
    def register(layer_cls: type[nn.Module]) -> type[nn.Module]:
        for name in (layer_cls.__name__, *aliases):
            LAYERS[name] = layer_cls
        return install_forward_choice(layer_cls)

    return register if cls is None else register(cls)


def is_conv1d(layer: nn.Module) -> bool:
    """True for GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored ``(in, out)``)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "nx")


def dense_weight(layer: nn.Module, name: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight of a linear map in tensorlm's orientation, and its bias.

    Args:
        layer: ``nn.Linear`` (weight ``(out, in)``) or GPT-2 ``Conv1D`` (weight ``(in, out)``).
        name: the module's name, for error messages.

    Returns:
        ``W: (out_features, in_features)`` (detached; a transposed view for ``Conv1D``) and
        ``bias: (out_features,)`` or ``None``.

    Raises:
        TensorLMError: ``layer`` is neither, or its weight holds NaN or Inf.
    """
    if isinstance(layer, nn.Linear):
        weight = layer.weight.detach()
    elif is_conv1d(layer):
        weight = layer.weight.detach().T  # (in, out) -> (out, in)
    else:
        raise TensorLMError(
            f"module {name or type(layer).__name__!r} is a {type(layer).__name__}; "
            "expected nn.Linear or transformers Conv1D"
        )
    check_finite(weight, name or type(layer).__name__)
    bias = None if layer.bias is None else layer.bias.detach()
    return weight, bias


def fill(module: nn.Module, **values: torch.Tensor | None) -> nn.Module:
    """Copy ``values`` into ``module``'s parameters of the same names (None: skipped); returns ``module``."""
    with torch.no_grad():
        for name, value in values.items():
            if value is not None:
                getattr(module, name).copy_(value)
    return module


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight: (out, in)`` and ``bias: (out,)`` (copies)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def project(table: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits ``h @ E^T`` of an embedding table without forming ``E`` where it is factored.

    Args:
        table: ``nn.Embedding`` ``(V, d)`` or a factored table with a ``project(h)`` method.
        h: ``(..., d)``.

    Returns:
        ``(..., V)``.

    Raises:
        TensorLMError: ``table`` is neither.
    """
    if isinstance(table, nn.Embedding):
        return F.linear(h, table.weight)
    if hasattr(table, "project"):
        return table.project(h)
    raise TensorLMError(f"cannot compute logits from a {type(table).__name__} table")


# ----------------------------------------------------------------------------------------------------------
# The forward choice: factored forward or a forward through the reconstructed (dense) weight
# ----------------------------------------------------------------------------------------------------------

FACTORIZED, RECONSTRUCTED = "factorized", "reconstructed"
FORWARD_PATHS = (FACTORIZED, RECONSTRUCTED)
FORWARD_KEY = "forward"
"""The key of a layer's ``tensorlm_config()`` holding its forward choice (absent: ``"factorized"``)."""
_CHOICE, _CACHE, _BUILDING = "_tensorlm_forward", "_tensorlm_dense", "_tensorlm_building"

Choice = str | tuple[tuple[int, str], ...]


def normalize_forward(choice, name: str = "layer") -> Choice:
    """Check a forward choice and bring it to its canonical form.

    Args:
        choice: a path (``"factorized"`` or ``"reconstructed"``), or pairs ``[[rows, path], ...]``: at run
            time the pair whose ``rows`` is nearest (on a log scale) to the input's number of rows (tokens:
            all axes but the last of a linear map's input, every id of an embedding's) gives the path.
        name: for error messages.

    Returns:
        The path, when every pair names the same one; otherwise the pairs sorted by ``rows`` (a tuple).

    Raises:
        TensorLMError: an unknown path, no pairs, ``rows < 1`` or the same ``rows`` twice.
    """
    if isinstance(choice, str):
        if choice not in FORWARD_PATHS:
            raise TensorLMError(f"{name}: forward {choice!r} is not one of {FORWARD_PATHS}")
        return choice
    try:
        pairs = tuple(sorted((int(rows), str(path)) for rows, path in choice))
    except (TypeError, ValueError) as err:
        raise TensorLMError(f"{name}: forward {choice!r} is neither a path nor [[rows, path], ...]") from err
    if (not pairs or any(rows < 1 or path not in FORWARD_PATHS for rows, path in pairs)
            or len({rows for rows, _ in pairs}) != len(pairs)):
        raise TensorLMError(f"{name}: forward {choice!r} needs distinct rows >= 1 and paths in {FORWARD_PATHS}")
    paths = {path for _, path in pairs}
    return pairs[0][1] if len(paths) == 1 else pairs


def set_forward(module: nn.Module, choice) -> None:
    """Give a registered layer the forward ``choice`` (see :func:`normalize_forward`); a layer that will never
    take the reconstructed path drops its cached dense weight.

    Raises:
        TensorLMError: a bad choice.
    """
    module.__dict__[_CHOICE] = normalize_forward(choice, type(module).__name__)
    if module.__dict__[_CHOICE] == FACTORIZED:
        module.__dict__.pop(_CACHE, None)


def get_forward(module: nn.Module) -> str | list[list]:
    """The layer's forward choice in JSON form: a path, or ``[[rows, path], ...]``; ``"factorized"`` if unset."""
    choice = module.__dict__.get(_CHOICE, FACTORIZED)
    return choice if isinstance(choice, str) else [list(pair) for pair in choice]


def path_for(choice: Choice, rows: int) -> str:
    """The path a normalised ``choice`` takes for an input of ``rows`` rows (tokens)."""
    if isinstance(choice, str):
        return choice
    target = math.log(max(rows, 1))
    return min(choice, key=lambda pair: (abs(math.log(pair[0]) - target), pair[0]))[1]


def input_rows(x: torch.Tensor) -> int:
    """Rows of a layer input: ``prod(shape[:-1])`` of features ``(..., d)``, ``numel`` of integer ids ``(...)``."""
    return math.prod(x.shape[:-1]) if x.is_floating_point() else x.numel()


def _state_key(module: nn.Module) -> tuple:
    """What identifies the current values of the layer's tensors: storage, in-place version, dtype, device."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                 for t in itertools.chain(module.parameters(), module.buffers()))


def cached(owner: nn.Module, slot: str, build, extra: tuple = ()):
    """``build()`` computed under ``no_grad`` and kept beside ``owner`` until its tensors change.

    The value lives in ``owner.__dict__[slot]`` (a plain attribute: not a parameter, not in the state dict)
    with the :func:`_state_key` of ``owner``'s parameters and buffers (its children's included) and ``extra``
    (e.g. a contraction order) it was built for; any in-place update (an optimizer step, ``load_state_dict``),
    a new storage, dtype or device, or another ``extra`` rebuilds it, the stale copy freed first.

    Args:
        owner: the module whose tensors the value depends on (a layer, or a bank shared by layers).
        slot: the attribute name, one per kind of value.
        build: a function of no arguments returning the value (tensors or tuples of them).
        extra: anything hashable the value also depends on.
    """
    key = (_state_key(owner), extra)
    hit = owner.__dict__.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    owner.__dict__.pop(slot, None)  # free the stale copy before building the new one
    with torch.no_grad():
        value = build()
    owner.__dict__[slot] = (key, value)
    return value


def _dense_form(module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """``(kind, weight, bias)`` of ``module.to_dense()`` (detached), run with the factored forward."""
    module.__dict__[_BUILDING] = True  # to_dense may call the layer (KroneckerEmbedding): factored there
    try:
        dense = module.to_dense()
    finally:
        module.__dict__.pop(_BUILDING, None)
    kind = "embedding" if isinstance(dense, nn.Embedding) else "linear"
    bias = getattr(dense, "bias", None) if kind == "linear" else None
    return kind, dense.weight.detach(), None if bias is None else bias.detach()


def reconstructed(module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """The layer's dense form, cached beside it (:func:`cached`): ``(kind, weight, bias)``.

    ``kind`` is ``"linear"`` (``weight: (out, in)``, ``bias: (out,)`` or None) or ``"embedding"``
    (``weight: (V, d)``, bias None), after the type ``to_dense()`` returns; rebuilt from ``to_dense()``
    whenever a parameter or buffer changed since it was built. A layer with a ``reconstructed_tensors()``
    method (:class:`TiedHead`) supplies its own (shared) tensors instead.
    """
    own = getattr(module, "reconstructed_tensors", None)
    if own is not None:
        return own()
    return cached(module, _CACHE, lambda: _dense_form(module))


def needs_grad(module: nn.Module) -> bool:
    """True when autograd records (``torch.is_grad_enabled()``) and a parameter of ``module`` requires grad:
    then a layer must run from its parameters, never from a cache (:func:`cached`)."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _reconstructed_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` through the cached dense weight, or ids ``(...) -> (..., d)``."""
    kind, weight, bias = reconstructed(module)
    return F.embedding(x, weight) if kind == "embedding" else F.linear(x, weight, bias)


def _dispatching(forward):
    """Wrap a layer's factored ``forward(x)`` so that it follows the layer's forward choice."""
    @functools.wraps(forward)
    def dispatch(self, x, *args, **kwargs):
        choice = self.__dict__.get(_CHOICE, FACTORIZED)
        if (choice != FACTORIZED and not args and not kwargs and _BUILDING not in self.__dict__
                and path_for(choice, input_rows(x)) == RECONSTRUCTED and not needs_grad(self)):
            return _reconstructed_forward(self, x)
        return forward(self, x, *args, **kwargs)

    dispatch.tensorlm_dispatch = True
    return dispatch


def _config_with_forward(method):
    """Wrap ``tensorlm_config()`` so that it carries the forward choice (only once one was set)."""
    @functools.wraps(method)
    def config(self) -> dict:
        cfg = method(self)
        return {**cfg, FORWARD_KEY: get_forward(self)} if _CHOICE in self.__dict__ else cfg

    config.tensorlm_dispatch = True
    return config


def _rebuilt_with_forward(func):
    """Wrap ``from_tensorlm_config`` (its function) so that the rebuilt layer takes the saved choice."""
    @functools.wraps(func)
    def rebuild(cls, cfg: dict, shared: dict):
        module = func(cls, cfg, shared)
        if FORWARD_KEY in cfg:
            set_forward(module, cfg[FORWARD_KEY])
        return module

    rebuild.tensorlm_dispatch = True
    return classmethod(rebuild)


def install_forward_choice(layer_cls: type[nn.Module]) -> type[nn.Module]:
    """Give a layer class the forward choice (called by :func:`register_layer`; idempotent).

    Wraps the class's own ``forward`` (:func:`_dispatching`), ``tensorlm_config`` and
    ``from_tensorlm_config``; the layer files need no code of their own for it.
    """
    own = layer_cls.__dict__
    if "forward" in own and not getattr(own["forward"], "tensorlm_dispatch", False):
        layer_cls.forward = _dispatching(own["forward"])
    if "tensorlm_config" in own and not getattr(own["tensorlm_config"], "tensorlm_dispatch", False):
        layer_cls.tensorlm_config = _config_with_forward(own["tensorlm_config"])
    rebuild = own.get("from_tensorlm_config")
    if isinstance(rebuild, classmethod) and not getattr(rebuild.__func__, "tensorlm_dispatch", False):
        layer_cls.from_tensorlm_config = _rebuilt_with_forward(rebuild.__func__)
    return layer_cls


def factorized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The registered layers of ``model`` that no other registered layer contains, by module path
    (a nested table such as ``transformer.wte.table`` is left out: its parent's choice covers it)."""
    found = {name: m for name, m in model.named_modules() if LAYERS.get(type(m).__name__) is type(m)}
    return {name: m for name, m in found.items()
            if not any(o != name and (not o or name.startswith(o + ".")) for o in found)}


def set_forward_all(model: nn.Module, choice) -> None:
    """Set the same forward ``choice`` on every layer of :func:`factorized_layers` (e.g. ``"factorized"``)."""
    for layer in factorized_layers(model).values():
        set_forward(layer, choice)


@contextmanager
def forward_all(model: nn.Module, choice) -> Iterator[None]:
    """Inside the block every layer of :func:`factorized_layers` takes ``choice`` (:func:`set_forward_all`);
    after it, each layer's own choice again (e.g. an evaluation through the cached reconstructions)."""
    layers = factorized_layers(model)
    before = {name: get_forward(layer) for name, layer in layers.items()}
    set_forward_all(model, choice)
    try:
        yield
    finally:
        for name, layer in layers.items():
            set_forward(layer, before[name])


def prepare_reconstructed(model: nn.Module) -> None:
    """Build now the dense weight of every layer whose choice can take the reconstructed path (after a load
    or a cast), so that the first forward does not pay for it."""
    for layer in factorized_layers(model).values():
        choice = layer.__dict__.get(_CHOICE, FACTORIZED)
        if choice == RECONSTRUCTED or (not isinstance(choice, str) and any(p == RECONSTRUCTED for _, p in choice)):
            reconstructed(layer)


def _synchronize(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def median_seconds(call, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median wall-clock seconds of ``call()`` over ``repeats`` runs after ``warmup`` (CUDA synchronised)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        _synchronize(x)
        start = time.perf_counter()
        call()
        _synchronize(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _candidates(module: nn.Module) -> list[tuple[str, str | None]]:
    """``(path, order)`` pairs to time: the factored forward in each of the layer's ``FACTORED_ORDERS``
    (contraction orders, :class:`~tensorlm.layers.kronecker.KroneckerLinear`), then the reconstructed one."""
    return [(FACTORIZED, order) for order in getattr(module, "FACTORED_ORDERS", (None,))] + [(RECONSTRUCTED, None)]


def measure_paths(module: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1
                  ) -> dict[tuple[str, str | None], float]:
    """Median seconds of the layer's forward on ``x`` along each candidate ``(path, order)``.

    The dense weight is built before its timing (a one-time cost at load, not a per-call one); the layer's
    choice and order are restored afterwards. Runs under ``no_grad``.
    """
    saved_choice, saved_order = module.__dict__.get(_CHOICE), getattr(module, "order", None)
    times = {}
    try:
        with torch.no_grad():
            for path, order in _candidates(module):
                module.__dict__[_CHOICE] = path
                if order is not None:
                    module.order = order
                if path == RECONSTRUCTED:
                    reconstructed(module)
                times[(path, order)] = median_seconds(lambda: module.forward(x), x, repeats, warmup)
    finally:
        module.__dict__.pop(_CHOICE, None)
        if saved_choice is not None:
            module.__dict__[_CHOICE] = saved_choice
        if saved_order is not None:
            module.order = saved_order
    return times


class _PathTimer:
    """Forward pre-hook: times the candidate paths of a layer on the first input of each row count it sees."""

    def __init__(self, repeats: int, warmup: int):
        self.repeats, self.warmup = repeats, warmup
        self.seconds: dict[int, dict] = {}  # rows -> {(path, order): seconds}
        self.busy = False  # the layer calls itself while measuring (KroneckerEmbedding.to_dense): not timed

    def __call__(self, module: nn.Module, args: tuple) -> None:
        rows = input_rows(args[0])
        if rows not in self.seconds and not self.busy:
            self.busy = True
            try:
                self.seconds[rows] = measure_paths(module, args[0], self.repeats, self.warmup)
            finally:
                self.busy = False


def _decide(module: nn.Module, seconds: dict[int, dict]) -> Choice:
    """Set the fastest order (summed over row counts) and, per row count, the faster path; returns the choice."""
    orders = [order for path, order in _candidates(module) if path == FACTORIZED]
    best = min(orders, key=lambda o: sum(t[(FACTORIZED, o)] for t in seconds.values()))
    if best is not None:
        module.order = best
    pairs = [(rows, RECONSTRUCTED if t[(RECONSTRUCTED, None)] < t[(FACTORIZED, best)] else FACTORIZED)
             for rows, t in seconds.items()]
    set_forward(module, pairs)
    return module.__dict__[_CHOICE]


def _example_call(model: nn.Module, example) -> None:
    """Run ``model`` on one example: a tensor (first positional argument), a dict (keyword arguments) or a
    shape ``(batch, seq)`` (random ids below ``model.config.vocab_size``)."""
    if isinstance(example, dict):
        model(**example)
        return
    if not isinstance(example, torch.Tensor):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab or len(tuple(example)) != 2:
            raise TensorLMError(f"choose_forward: example {example!r} is a shape, but the model has no "
                                "config.vocab_size or the shape is not (batch, seq)")
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        example = torch.randint(0, vocab, tuple(example), generator=torch.Generator().manual_seed(0)).to(device)
    model(example)


def choose_forward(model: nn.Module, examples: Iterable | Sequence, *, repeats: int = 5, warmup: int = 1
                   ) -> dict[str, dict]:
    """Time each factorized layer's paths at the given input shapes and keep the faster one per shape.

    For every layer of :func:`factorized_layers`, on the inputs it receives while ``model`` runs each
    example (eval mode, ``no_grad``), the factored forward (in each of its contraction orders, if it has
    several) and the reconstructed forward are timed (median of ``repeats`` after ``warmup``); the order
    fastest in total is kept, and per input row count the faster path. The choice is stored in the layer
    (and so in :func:`tensorlm.io.save_compressed`'s manifest). Layers that no example reaches keep theirs.

    Args:
        model: a model (Hugging Face call convention) or a single layer.
        examples: tensors (passed positionally), dicts (keyword arguments) or ``(batch, seq)`` shapes (random
            ids). For a causal LM give the prefill shape and the decoding shape ``(batch, 1)``.
        repeats, warmup: timed and untimed calls per layer, path and shape (``repeats >= 1``).

    Returns:
        module path -> ``{"forward": choice in JSON form, "order": contraction order or None,
        "seconds": {rows: {"factorized" or "factorized:<order>", "reconstructed": median seconds}}}``.

    Raises:
        TensorLMError: ``repeats < 1`` or ``warmup < 0``; a shape example for a model without vocabulary.
    """
    if repeats < 1 or warmup < 0:
        raise TensorLMError(f"choose_forward: repeats {repeats} must be >= 1 and warmup {warmup} >= 0")
    layers = factorized_layers(model)
    timers = {name: _PathTimer(repeats, warmup) for name in layers}
    handles = [layer.register_forward_pre_hook(timers[name]) for name, layer in layers.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for example in examples:
                _example_call(model, example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    report = {}
    for name, layer in layers.items():
        if timers[name].seconds:
            _decide(layer, timers[name].seconds)
            seconds = {rows: {path if order is None else f"{path}:{order}": s for (path, order), s in t.items()}
                       for rows, t in timers[name].seconds.items()}
            report[name] = {"forward": get_forward(layer), "order": getattr(layer, "order", None),
                            "seconds": seconds}
    return report


@register_layer(aliases=("TTTiedHead",))
class TiedHead(nn.Module):
    """LM head tied to a factored embedding: ``logits = h @ E^T``, computed by ``embedding.project(h)``.

    The one tied head of every factored table (Kronecker, TT, a method registered later). The table is
    a child module, the same object as the model's input embedding, so ``parameters()`` yields its
    tensors once and ``safetensors`` stores them once. Input ``(..., d)``, output ``(..., V)``.

    Args:
        embedding: the factored table (has ``project(h)`` and ``to_dense()``).
        tied_to: the table's module path (``"transformer.wte"``), used to re-tie on load.
        block_rows: for tables that form their rows block by block to compute logits (``TTEmbedding``):
            rows formed at a time; sets ``embedding.block_rows``.

    Raises:
        TensorLMError: ``block_rows`` below 1 or given for a table that has no blocks.
    """

    tied_factored = True  # parameter accounting: logits come from the embedding's factors

    def __init__(self, embedding: nn.Module, tied_to: str, block_rows: int | None = None):
        super().__init__()
        if block_rows is not None:
            if not hasattr(embedding, "block_rows") or block_rows < 1:
                raise TensorLMError(f"TiedHead: block_rows={block_rows} for a {type(embedding).__name__} table; "
                                    "only tables with row blocks (TTEmbedding) take it, and it must be >= 1")
            embedding.block_rows = block_rows
        self.embedding, self.tied_to = embedding, tied_to

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return project(self.embedding, h)

    def reconstructed_tensors(self) -> tuple[str, torch.Tensor, None]:
        """The reconstructed forward's ``("linear", E (V, d), None)``: the table cached by the embedding
        itself (:func:`reconstructed`), so that a reconstructed head and table hold one dense copy."""
        _, table, _ = reconstructed(self.embedding)
        return "linear", table, None

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear (d -> V)`` without bias holding a copy of the dense table (untied)."""
        return dense_linear(self.embedding.to_dense().weight.detach(), None)

    def tensorlm_config(self) -> dict:
        block = getattr(self.embedding, "block_rows", None)
        return {"tied_to": self.tied_to, **({} if block is None else {"block_rows": block})}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> TiedHead:
        """The head re-tied to ``shared[cfg["tied_to"]]`` (folders of version 0.1 say ``"embedding"``).

        Raises:
            TensorLMError: the table was not rebuilt before the head.
        """
        tied_to = cfg.get("tied_to", cfg.get("embedding"))
        if tied_to not in shared:
            raise TensorLMError(f"tied head: tied_to {tied_to!r} is not a factored table the saved folder "
                                "rebuilds before the head")
        return cls(shared[tied_to], tied_to, cfg.get("block_rows"))

    def extra_repr(self) -> str:
        return f"tied_to={self.tied_to!r}"
