"""Tensor-train layers: TTEmbedding (one MPS per token row, TensorGPT) and TTLinear (TT-matrix).

TensorGPT (Xu, Xu, Mandic 2023, "Efficient Compression of the Embedding Layer in LLMs based on the
Tensor-Train Decomposition") writes each row of the embedding table, reshaped to ``(I_1, ..., I_N)``, as
a matrix product state by TT-SVD, with no training. TTLinear is the TT-matrix layer of Novikov et al.
2015 ("Tensorizing Neural Networks") built by TT-SVD of the dense weight (Oseledets 2011, Sec. 4.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tensorlm.decompose.linalg import check_finite
from tensorlm.decompose.tt import (
    Ranks,
    allocate_row_classes,
    class_slots,
    default_shape,
    max_ranks,
    rank_ladder,
    suggest_shape,
    tt_flat_rows_to_full,
    tt_matrix_svd,
    tt_matrix_to_full,
    tt_parameter_count,
    tt_row_errors,
    tt_rows_to_full,
    tt_svd_ragged,
    tt_svd_rows,
)
from tensorlm.decompose.weighted_tt import whitened_tt_matrix
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import dense_linear, dense_weight, needs_grad, reconstructed, register_layer


def _ranks_of(cores: Sequence[torch.Tensor]) -> list[int]:
    return [int(c.shape[-1]) for c in cores[:-1]]


@register_layer
class TTEmbedding(nn.Module):
    """An embedding table whose every row is a matrix product state (TensorGPT).

    Row ``t`` of the ``(V, d)`` table, reshaped to ``shape = (I_1, ..., I_N)``, is
    ``G_1[t][:, i_1, :] @ ... @ G_N[t][:, i_N, :]``. Core ``k`` is stored as one parameter
    ``cores[k]: (V, r_{k-1}, I_k, r_k)``, ``r_0 = r_N = 1``; with a tolerance the rows have their own
    ranks and the stored ``r_k`` is their maximum, smaller rows padded with zeros.

    Parameter count (what is stored): ``V * sum_k r_{k-1} I_k r_k`` with the stored (maximum) ranks,
    zero padding included; compression ratio ``d / sum_k r_{k-1} I_k r_k``.

    Forward: ``ids (...)`` int64 -> ``(..., d)``; gathers only the rows in ``ids`` and contracts their cores.
    ``padding_idx`` behaves as in ``nn.Embedding``: its row receives no gradient.

    Raises (forward): ``IndexError`` for an id outside ``[0, V)``, as ``nn.Embedding`` does.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        shape: Sequence[int],
        ranks: Sequence[int],
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape, ranks = [int(s) for s in shape], [int(r) for r in ranks]
        if math.prod(shape) != embedding_dim or len(ranks) != len(shape) - 1:
            raise TensorLMError(
                f"TTEmbedding: shape {tuple(shape)} (product {math.prod(shape)}) and ranks {ranks} do not fit "
                f"embedding_dim={embedding_dim}; need product == d and len(ranks) == len(shape) - 1"
            )
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise TensorLMError(f"TTEmbedding: padding_idx {padding_idx} outside [0, {num_embeddings})")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.shape, self.ranks = shape, ranks
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        self.block_rows = 8192  # rows formed at a time by project (a tied head may change it)
        full = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(num_embeddings, full[k], shape[k], full[k + 1], dtype=dtype))
            for k in range(len(shape))
        )

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], padding_idx: int | None = None) -> TTEmbedding:
        """Wrap batched MPS cores ``(V, r_{k-1}, I_k, r_k)`` (e.g. from :func:`tt_svd_rows`)."""
        shape = [int(c.shape[2]) for c in cores]
        layer = cls(cores[0].shape[0], math.prod(shape), shape, _ranks_of(cores), padding_idx, cores[0].dtype)
        with torch.no_grad():
            for param, core in zip(layer.cores, cores, strict=True):
                param.copy_(core)
        return layer

    @classmethod
    def from_dense(
        cls,
        layer: nn.Embedding,
        shape: Sequence[int] | None = None,
        ranks: Ranks = None,
        eps: float | None = None,
        n_modes: int = 3,
    ) -> TTEmbedding:
        """TT-SVD of every row of ``layer.weight: (V, d)`` at once (TensorGPT; Oseledets 2011, Alg. 1).

        Args:
            layer: an ``nn.Embedding`` (``max_norm`` unsupported).
            shape: tensorisation of ``d`` (default :func:`suggest_shape` with ``n_modes`` factors).
            ranks, eps: fixed ranks and/or per-row relative tolerance, as in :func:`tt_svd_rows`.

        Raises:
            TensorLMError: not an ``nn.Embedding``, ``max_norm`` set, bad shape/ranks/eps, NaN/Inf weights.
        """
        if not isinstance(layer, nn.Embedding) or layer.max_norm is not None:
            raise TensorLMError(
                f"TTEmbedding.from_dense: expected nn.Embedding without max_norm, got {type(layer).__name__}"
            )
        check_finite(layer.weight, "embedding")
        shape = suggest_shape(layer.embedding_dim, n_modes) if shape is None else shape
        cores, _ = tt_svd_rows(layer.weight.detach(), shape, ranks=ranks, eps=eps)
        return cls.from_cores(cores, layer.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"index out of range in self: TTEmbedding ids span [{int(ids.min())}, {int(ids.max())}], "
                f"valid [0, {self.num_embeddings})"
            )
        flat = ids.reshape(-1)  # (n,)
        rows = [F.embedding(flat, core.reshape(self.num_embeddings, -1)).reshape(-1, *core.shape[1:])
                for core in self.cores]  # each (n, r_{k-1}, I_k, r_k)
        if self.padding_idx is not None and needs_grad(self):  # only the gradient differs at padding_idx
            pad = (flat == self.padding_idx)[:, None, None, None]  # (n, 1, 1, 1)
            rows = [torch.where(pad, g.detach(), g) for g in rows]
        return tt_rows_to_full(rows).reshape(*ids.shape, self.embedding_dim)  # (..., d)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``hidden @ E^T``: ``(..., d)`` -> ``(..., V)``, forming ``block_rows`` rows of ``E`` at a time.

        Logits straight from the cores cost ``~ n V d r`` multiply-adds for ``n`` hidden states (each
        contracted with every row's MPS); rebuilding the table costs ``V d r`` once plus ``n V d`` for the
        product, never more for ``n >= 2``. Without a gradient to record (:func:`needs_grad`) the whole table
        is rebuilt once and cached (:func:`tensorlm.layers.base.reconstructed`, the copy the forward choice
        uses; rebuilt after any parameter changes), so a decoding step costs only ``n V d``; while training
        it is rebuilt block by block on every call and never held whole (each block is kept for backward).
        """
        if not needs_grad(self):
            return F.linear(hidden, reconstructed(self)[1])  # (..., d) @ (V, d)^T -> (..., V)
        vocab = self.num_embeddings
        logits = hidden.new_empty(*hidden.shape[:-1], vocab)  # (..., V)
        for start in range(0, vocab, self.block_rows):
            stop = min(start + self.block_rows, vocab)
            logits[..., start:stop] = hidden @ self.weight_rows(start, stop).T  # (..., block)
        return logits

    def weight_rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The dense rows ``[start, stop)`` of the table, ``(stop - start, d)``."""
        return tt_rows_to_full([core[start:stop] for core in self.cores])

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding`` (forms the whole ``(V, d)`` table)."""
        with torch.no_grad():
            return nn.Embedding.from_pretrained(self.weight_rows(), freeze=False, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        stored = sum(c.numel() for c in self.cores)
        return (f"{self.num_embeddings}, {self.embedding_dim}, shape={tuple(self.shape)}, ranks={self.ranks}, "
                f"padding_idx={self.padding_idx}, ratio={self.num_embeddings * self.embedding_dim / stored:.2f}x")

    def tensorlm_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "shape": list(self.shape), "ranks": list(self.ranks), "padding_idx": self.padding_idx}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> TTEmbedding:
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], cfg["shape"], cfg["ranks"], cfg["padding_idx"])



@register_layer
class RaggedTTEmbedding(nn.Module):
    """An embedding table whose rows are matrix product states of their own TT-ranks (ragged TensorGPT).

    TensorGPT (Xu, Xu, Mandic 2023) gives every row the same ranks. Here each row ``t`` has a rank class
    ``row_class[t]`` out of ``classes`` (``C`` lists of ``N-1`` internal ranks, :func:`rank_ladder` by
    default), chosen by :func:`allocate_row_classes` to minimise ``sum_t f_t ||E_t - E~_t||^2`` (``f``:
    token frequency) under a total parameter budget, so frequent tokens keep higher ranks; or, by
    :meth:`from_tolerance`, each row's smallest ranks within a relative tolerance (TensorGPT's ``eps``).

    Storage: one flat parameter ``values (stored,)``: a block per rank class, ``(rows of the class, cost_c)``
    with ``cost_c = sum_k r_{k-1} I_k r_k``, each row its cores ``(r_{k-1}, I_k, r_k)`` back to back (layout
    of :func:`tt_svd_ragged`); the index map is the int64 buffer ``row_class (V,)`` (each row's place in its
    block follows from it, :func:`class_slots`). With frequency ``stored`` is fixed by the plan (the uniform
    plan's ``V * cost``), so the parameter count is known before the data; the allocation uses ``used <=
    stored`` of them and the rest (less than one rank step) stays zero. With a tolerance ``stored = used``.

    Forward: ``ids (...)`` int64 -> ``(..., d)``; gathers only the rows in ``ids``, one batched contraction
    per rank class present. ``padding_idx`` behaves as in ``nn.Embedding`` (its row gets no gradient).

    Raises (forward): ``IndexError`` for an id outside ``[0, V)``, as ``nn.Embedding`` does.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, shape: Sequence[int],
                 classes: Sequence[Sequence[int]], stored: int, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape, classes = [int(s) for s in shape], [[int(r) for r in c] for c in classes]
        bound = max_ranks(shape) if shape and math.prod(shape) == embedding_dim else None
        if bound is None or not classes or any(
                len(c) != len(bound) or not all(1 <= r <= b for r, b in zip(c, bound, strict=True)) for c in classes):
            raise TensorLMError(f"RaggedTTEmbedding: shape {tuple(shape)} and classes {classes} do not fit "
                                f"embedding_dim={embedding_dim}; need product == d and ranks in 1..{bound}")
        self.costs = [tt_parameter_count(shape, c) for c in classes]
        if stored < num_embeddings * self.costs[0]:
            raise TensorLMError(f"RaggedTTEmbedding: stored={stored} is below {num_embeddings} rows at the "
                                f"first class ({self.costs[0]} values each)")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise TensorLMError(f"RaggedTTEmbedding: padding_idx {padding_idx} outside [0, {num_embeddings})")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.shape, self.classes, self.stored = shape, classes, int(stored)
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        self.block_rows = 8192  # rows formed at a time by project (a tied head may change it)
        self.values = nn.Parameter(torch.zeros(self.stored, dtype=dtype))
        self.register_buffer("row_class", torch.zeros(num_embeddings, dtype=torch.int64))  # every row class 0
        self.register_buffer("slot", torch.arange(num_embeddings), persistent=False)  # place in its class block
        self.sizes = [num_embeddings] + [0] * (len(classes) - 1)  # rows per class

    @classmethod
    def from_dense(cls, layer: nn.Embedding, shape: Sequence[int], stored: int, weights: torch.Tensor | None = None,
                   classes: Sequence[Sequence[int]] | None = None,
                   reference: Sequence[int] | None = None) -> RaggedTTEmbedding:
        """Ragged TT-SVD of ``layer.weight (V, d)`` in ``stored`` parameters, rows weighted by ``weights``.

        Args:
            layer: an ``nn.Embedding`` (``max_norm`` unsupported).
            shape: tensorisation of ``d``; stored: the parameter budget (values); weights: ``(V,)`` positive
                row weights ``f`` (token frequency; default ones); classes: rank classes, costs increasing
                (default :func:`rank_ladder`); reference: the uniform plan's ranks, kept if its weighted error
                is lower.

        Raises:
            TensorLMError: not an ``nn.Embedding``, ``max_norm`` set, bad shape, NaN/Inf weights, ``weights``
                not ``(V,)`` positive and finite, a budget below every row at the cheapest class.
        """
        if not isinstance(layer, nn.Embedding) or layer.max_norm is not None:
            raise TensorLMError(
                f"RaggedTTEmbedding.from_dense: expected nn.Embedding without max_norm, got {type(layer).__name__}"
            )
        check_finite(layer.weight, "embedding")
        w = layer.weight.detach()  # (V, d)
        weights = torch.ones(w.shape[0], dtype=torch.float64) if weights is None else weights.detach().double()
        if weights.shape != (w.shape[0],) or not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise TensorLMError(f"RaggedTTEmbedding.from_dense: row weights {tuple(weights.shape)} must be "
                                f"({w.shape[0]},), finite and > 0")
        classes = rank_ladder(shape) if classes is None else [list(c) for c in classes]
        out = cls(w.shape[0], w.shape[1], shape, classes, stored, layer.padding_idx, w.dtype)
        ref = list(reference) if reference is not None else None
        errors = tt_row_errors(w, shape, classes) * weights[:, None]  # (V, C) weighted squared errors
        row_class = allocate_row_classes(errors, out.costs, stored, classes.index(ref) if ref in classes else None)
        values = tt_svd_ragged(w, shape, classes, row_class)  # (used,)
        with torch.no_grad():
            out.values.zero_()
            out.values[: values.shape[0]] = values.to(w.dtype)
            out.row_class.copy_(row_class)
        out._index()
        return out

    @classmethod
    def from_tolerance(cls, layer: nn.Embedding, shape: Sequence[int], eps: float,
                       ranks: Ranks = None) -> RaggedTTEmbedding:
        """TensorGPT's per-row tolerance, stored ragged: each row of ``layer.weight (V, d)`` keeps the smallest
        TT-ranks with ``||e_t - TT(e_t)|| <= eps ||e_t||`` (TT-SVD, Oseledets 2011, Alg. 1; TensorGPT, Xu et al.
        2023, Sec. 3), and only those: the classes are the distinct rank lists that occur, cheapest first, and
        ``stored`` is exactly the rows' own cores, ``sum_t sum_k r_{k-1}(t) I_k r_k(t)`` (a padded
        :class:`TTEmbedding` would store every row at the largest ranks).

        Args:
            layer: an ``nn.Embedding`` (``max_norm`` unsupported); shape: tensorisation of ``d``; eps: relative
                tolerance in (0, 1); ranks: caps (one int or ``N-1`` ints; default :func:`max_ranks`).

        Raises:
            TensorLMError: not an ``nn.Embedding``, ``max_norm`` set, bad shape/ranks/eps, NaN/Inf weights.
        """
        if not isinstance(layer, nn.Embedding) or layer.max_norm is not None:
            raise TensorLMError(f"RaggedTTEmbedding.from_tolerance: expected nn.Embedding without max_norm, "
                                f"got {type(layer).__name__}")
        check_finite(layer.weight, "embedding")
        w = layer.weight.detach()  # (V, d)
        _, row_ranks = tt_svd_rows(w, shape, ranks=ranks, eps=eps)  # (V, N+1)
        found, row_class = torch.unique(row_ranks[:, 1:-1], dim=0, return_inverse=True)  # (C, N-1), (V,)
        costs = torch.tensor([tt_parameter_count(shape, c.tolist()) for c in found])  # (C,)
        order = torch.argsort(costs, stable=True)  # cheapest class first
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(order.numel())
        classes, row_class = found[order].tolist(), rank_of[row_class]  # (C, N-1), (V,)
        stored = int(costs[order][row_class].sum())  # every row's own cores, no padding
        out = cls(w.shape[0], w.shape[1], shape, classes, stored, layer.padding_idx, w.dtype)
        with torch.no_grad():
            out.values.copy_(tt_svd_ragged(w, shape, classes, row_class).to(w.dtype))
            out.row_class.copy_(row_class)
        out._index()
        return out

    def _index(self) -> None:
        """Recompute ``slot`` and ``sizes`` from ``row_class`` (after a build or a load)."""
        slot, self.sizes = class_slots(self.row_class, len(self.classes))
        self.slot = slot.to(self.row_class.device)

    @property
    def used(self) -> int:
        """Values the rows use, ``sum_c sizes[c] cost_c <= stored``."""
        return sum(n * cost for n, cost in zip(self.sizes, self.costs, strict=True))

    def row_ranks(self) -> torch.Tensor:
        """Every row's internal ranks ``(V, N-1)`` int64."""
        return torch.tensor(self.classes, dtype=torch.int64, device=self.row_class.device)[self.row_class]

    def _block(self, c: int) -> torch.Tensor:
        """Class ``c``'s block of ``values``, ``(sizes[c], cost_c)`` (a view)."""
        start = sum(n * cost for n, cost in zip(self.sizes[:c], self.costs[:c], strict=True))
        return self.values[start:start + self.sizes[c] * self.costs[c]].view(self.sizes[c], self.costs[c])

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``(n, d)`` of the flat ids ``(n,)``: ids sorted by rank class, each class gathers its rows'
        cores from its block, contracts them in one batch and writes them to their places in the output."""
        kind = self.row_class[ids]  # (n,)
        order = torch.argsort(kind, stable=True)  # (n,)
        counts = torch.bincount(kind, minlength=len(self.classes)).tolist()
        out = self.values.new_empty(ids.shape[0], self.embedding_dim)  # (n, d), every row written below
        done = 0
        for c, count in enumerate(counts):
            if count:
                where = order[done:done + count]  # (n_c,) positions in ids of class c
                pick = ids[where]
                flat = F.embedding(self.slot[pick], self._block(c))  # (n_c, cost_c)
                if self.padding_idx is not None and needs_grad(self):
                    flat = torch.where((pick == self.padding_idx)[:, None], flat.detach(), flat)
                out[where] = tt_flat_rows_to_full(flat, self.shape, self.classes[c])  # (n_c, d)
                done += count
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"index out of range in self: RaggedTTEmbedding ids span [{int(ids.min())}, {int(ids.max())}], "
                f"valid [0, {self.num_embeddings})"
            )
        return self._rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)  # (..., d)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``hidden @ E^T``: ``(..., d)`` -> ``(..., V)``, from the cached table without a gradient to
        record, else forming ``block_rows`` rows of ``E`` at a time (as :meth:`TTEmbedding.project`)."""
        if not needs_grad(self):
            return F.linear(hidden, reconstructed(self)[1])  # (..., d) @ (V, d)^T -> (..., V)
        logits = hidden.new_empty(*hidden.shape[:-1], self.num_embeddings)  # (..., V)
        for start in range(0, self.num_embeddings, self.block_rows):
            stop = min(start + self.block_rows, self.num_embeddings)
            logits[..., start:stop] = hidden @ self.weight_rows(start, stop).T  # (..., block)
        return logits

    def weight_rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The dense rows ``[start, stop)`` of the table, ``(stop - start, d)``."""
        stop = self.num_embeddings if stop is None else stop
        return self._rows(torch.arange(start, stop, device=self.row_class.device))

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding`` (forms the whole ``(V, d)`` table)."""
        with torch.no_grad():
            return nn.Embedding.from_pretrained(self.weight_rows(), freeze=False, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        spread = ", ".join(f"{tuple(c)}: {n}" for c, n in zip(self.classes, self.sizes, strict=True) if n)
        return (f"{self.num_embeddings}, {self.embedding_dim}, shape={tuple(self.shape)}, stored={self.stored}, "
                f"used={self.used}, rows per ranks {{{spread}}}, padding_idx={self.padding_idx}, "
                f"ratio={self.num_embeddings * self.embedding_dim / self.stored:.2f}x")

    def tensorlm_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "shape": list(self.shape),
                "classes": [list(c) for c in self.classes], "stored": self.stored, "padding_idx": self.padding_idx}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> RaggedTTEmbedding:
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], cfg["shape"], cfg["classes"], cfg["stored"],
                   cfg["padding_idx"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "row_class"
        if key in state_dict:
            check_row_classes(state_dict[key], self.num_embeddings, self.costs, self.stored,
                              prefix.rstrip(".") or "RaggedTTEmbedding")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if key in state_dict:
            self._index()


def check_row_classes(row_class: torch.Tensor, num_embeddings: int, costs: Sequence[int], stored: int,
                      name: str) -> None:
    """Raise :class:`TensorLMError` unless ``row_class`` is ``(V,)`` integer in ``[0, C)`` and its rows fit
    in ``stored`` values (``sum_t costs[row_class[t]] <= stored``)."""
    ok = (row_class.shape == (num_embeddings,) and not row_class.is_floating_point()
          and (num_embeddings == 0 or 0 <= int(row_class.min()) <= int(row_class.max()) < len(costs)))
    if not ok or int(torch.as_tensor(costs)[row_class.long().cpu()].sum()) > stored:
        raise TensorLMError(f"{name}: row_class {tuple(row_class.shape)} is not a valid rank-class map of "
                            f"{num_embeddings} rows over {len(costs)} classes within {stored} values")


@register_layer
class TTLinear(nn.Module):
    """A linear map whose weight ``W: (out, in)`` is a TT-matrix (Novikov et al. 2015).

    ``W`` (zero-padded to ``(prod out_shape, prod in_shape)`` when a size factors badly, see
    :func:`padded_shape`) is ``W[(i_1..i_N), (j_1..j_N)] = prod_k G_k[:, i_k, j_k, :]`` with cores
    ``cores[k]: (r_{k-1}, m_k, n_k, r_k)``. Forward contracts ``x`` with the cores one at a time, never
    forming ``W``; padded inputs are zeros and padded outputs are dropped. Behaves as the ``nn.Linear`` or
    GPT-2 ``Conv1D`` it replaces: ``y = x W^T + b``.

    Parameter count: ``sum_k r_{k-1} m_k n_k r_k`` (+ ``out_features`` for the bias).

    Forward: ``x (..., in_features)`` -> ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_shape, out_shape, ranks = [int(s) for s in in_shape], [int(s) for s in out_shape], [int(r) for r in ranks]
        if (len(in_shape) != len(out_shape) or len(ranks) != len(in_shape) - 1
                or math.prod(in_shape) < in_features or math.prod(out_shape) < out_features):
            raise TensorLMError(
                f"TTLinear: in_shape {tuple(in_shape)}, out_shape {tuple(out_shape)}, ranks {ranks} do not fit "
                f"({out_features}, {in_features}); need equal lengths N, N-1 ranks, products >= the features"
            )
        self.in_features, self.out_features = in_features, out_features
        self.in_shape, self.out_shape, self.ranks = in_shape, out_shape, ranks
        full = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(full[k], out_shape[k], in_shape[k], full[k + 1], dtype=dtype))
            for k in range(len(in_shape))
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_dense(
        cls,
        layer: nn.Module,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        ranks: Ranks = None,
        eps: float | None = None,
        n_modes: int = 3,
        second_moment: torch.Tensor | None = None,
    ) -> TTLinear:
        """TT-SVD of the dense weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` (Oseledets 2011, Sec. 4.1).

        Args:
            layer: ``nn.Linear`` or ``Conv1D`` (read through :func:`dense_weight`).
            in_shape, out_shape: tensorisations of the features (default: most balanced with ``n_modes``
                factors, padded when the size factors badly).
            ranks, eps: as in :func:`tt_svd_rows` (``eps`` bounds ``||W - W_TT||_F / ||W||_F``).
            second_moment: ``(in, in)`` second moment of the layer's inputs: the data-aware TT-matrix
                (:func:`~tensorlm.decompose.weighted_tt.whitened_tt_matrix`) instead of the plain one.

        Raises:
            TensorLMError: wrong layer type, shapes that do not fit, bad ranks or eps, NaN/Inf weights, a bad
                second moment.
        """
        weight, bias = dense_weight(layer)
        out_features, in_features = weight.shape
        in_shape = default_shape(in_features, n_modes) if in_shape is None else in_shape
        out_shape = default_shape(out_features, n_modes) if out_shape is None else out_shape
        padded = weight.new_zeros(math.prod(out_shape), math.prod(in_shape))
        if padded.shape[0] < out_features or padded.shape[1] < in_features:
            raise TensorLMError(
                f"TTLinear.from_dense: out_shape {tuple(out_shape)} x in_shape {tuple(in_shape)} too small for "
                f"weight {tuple(weight.shape)}"
            )
        padded[:out_features, :in_features] = weight
        if second_moment is None:
            cores = tt_matrix_svd(padded.double(), out_shape, in_shape, ranks=ranks, eps=eps)
        else:
            cores = whitened_tt_matrix(padded, second_moment, out_shape, in_shape, ranks=ranks, eps=eps)
        tt = cls(in_features, out_features, in_shape, out_shape, _ranks_of(cores), bias is not None, weight.dtype)
        with torch.no_grad():
            for param, core in zip(tt.cores, cores, strict=True):
                param.copy_(core)
            if bias is not None:
                tt.bias.copy_(bias)
        return tt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        n_in = math.prod(self.in_shape)
        flat = x.reshape(-1, self.in_features)  # (B, in)
        if n_in > self.in_features:
            flat = F.pad(flat, (0, n_in - self.in_features))  # (B, prod n_k)
        batch = flat.shape[0]
        state = flat.reshape(batch, 1, 1, self.in_shape[0], -1)  # (B, M_prev, r_prev, n_k, N_rest)
        for k, core in enumerate(self.cores):
            state = torch.einsum("bprjs,rijq->bpiqs", state, core)  # (B, M_prev, m_k, r_k, N_rest)
            state = state.reshape(batch, -1, core.shape[-1], state.shape[-1])  # (B, M_prev m_k, r_k, N_rest)
            nxt = self.in_shape[k + 1] if k + 1 < len(self.in_shape) else 1
            state = state.reshape(batch, state.shape[1], core.shape[-1], nxt, -1)
        out = state.reshape(batch, -1)[:, : self.out_features]  # (B, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (forms ``W``)."""
        weight = tt_matrix_to_full(list(self.cores))[: self.out_features, : self.in_features]
        return dense_linear(weight.detach(), None if self.bias is None else self.bias.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, in_shape={tuple(self.in_shape)}, "
                f"out_shape={tuple(self.out_shape)}, ranks={self.ranks}, bias={self.bias is not None}")

    def tensorlm_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "in_shape": list(self.in_shape),
                "out_shape": list(self.out_shape), "ranks": list(self.ranks), "bias": self.bias is not None}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> TTLinear:
        return cls(cfg["in_features"], cfg["out_features"], cfg["in_shape"], cfg["out_shape"], cfg["ranks"],
                   cfg["bias"])
