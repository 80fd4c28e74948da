"""The Tucker matrix bank as modules: one shared :class:`TuckerBank`, one :class:`BankLinear` per weight.

Ren, Wang et al., "Exploring Extreme Parameter Compression for Pre-trained Language Models", ICLR 2022.
Weight ``W (out, in)`` is cut into ``D x D`` blocks (row-major over block row ``r``, block column ``c``),
block ``(r, c)`` is ``W_rc ~ U G_rc V^T`` with ``G_rc = sum_j P[rc, j] C_j``; ``U, V: (D, d)`` and
``C: (l, d, d)`` live in the bank, shared by every :class:`BankLinear`; each layer keeps its rows of
``P: (n_blocks, l)`` and its bias. The layer computes ``y_r = U sum_c G_rc (V^T x_c) + b_r`` and never
forms ``W``.

Inference (no gradient recorded, see :func:`tensorlm.layers.base.needs_grad`): what depends on parameters
alone is computed once and cached (:func:`tensorlm.layers.base.cached`, rebuilt after any parameter
changes): on the bank, ``C`` with ``U`` or ``V`` folded in (once per bank, not per layer); on each layer,
its cores in the layout of its contraction :attr:`BankLinear.order`, so a decoded token costs only the
contraction. Training recomputes the cores from ``P`` and ``C`` on every call, so gradients reach both.

Sharing: every :class:`BankLinear` holds the same :class:`TuckerBank` object as a child module, so
``model.parameters()`` yields ``U``, ``V``, ``C`` once and ``safetensors.torch.save_model`` stores one
copy. On reload, :meth:`BankLinear.from_tensorlm_config` finds or creates that one bank in the loader's
``shared`` dict under ``"tucker_bank:<id>"``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from tensorlm.decompose.tucker import (
    BankFactors,
    BlockLayout,
    check_ranks,
    identity_bank,
    merge_blocks,
    split_blocks,
    tucker_bank,
)
from tensorlm.errors import TensorLMError
from tensorlm.layers.base import cached, dense_linear, dense_weight, needs_grad, register_layer

BANK_CONFIG_KEYS = ("id", "block_size", "rank_blocks", "rank")
ORDERS = ("v_g_u", "v_gu", "vg_u")
"""Contraction orders of :meth:`BankLinear.forward` (``x -> V -> G -> U``, with ``G`` merged into ``U`` or ``V``)."""


class TuckerBank(nn.Module):
    """The shared factors ``U, V: (D, d)`` and ``C: (l, d, d)`` of one matrix bank.

    A freshly constructed bank holds NaN (so a bank that no saved file filled cannot pass for a trained
    one); :meth:`from_factors` or ``load_state_dict`` fills it.

    Args:
        bank_id: the name under which layers find this bank (``shared["tucker_bank:<id>"]``).
        block_size: ``D``.
        rank_blocks: ``l``, the number of core slices.
        rank: ``d``.
    """

    def __init__(self, bank_id: str, block_size: int, rank_blocks: int, rank: int):
        super().__init__()
        if not 1 <= rank <= block_size or rank_blocks < 1:
            raise TensorLMError(
                f"TuckerBank {bank_id!r}: ranks (l={rank_blocks}, d={rank}) with D={block_size}; "
                "need l >= 1 and 1 <= d <= D"
            )
        self.bank_id = bank_id
        self.block_size, self.rank_blocks, self.rank = block_size, rank_blocks, rank
        nan = float("nan")
        self.U = nn.Parameter(torch.full((block_size, rank), nan))  # (D, d)
        self.V = nn.Parameter(torch.full((block_size, rank), nan))  # (D, d)
        self.C = nn.Parameter(torch.full((rank_blocks, rank, rank), nan))  # (l, d, d)

    @classmethod
    def from_factors(cls, factors: BankFactors, bank_id: str) -> TuckerBank:
        """A bank holding copies of ``factors.U``, ``factors.V``, ``factors.C`` (dtype/device kept)."""
        rank_blocks, rank, _ = factors.C.shape
        bank = cls(bank_id, factors.U.shape[0], rank_blocks, rank).to(factors.C)
        with torch.no_grad():
            bank.U.copy_(factors.U)
            bank.V.copy_(factors.V)
            bank.C.copy_(factors.C)
        return bank

    def bank_config(self) -> dict:
        """``{"id", "block_size", "rank_blocks", "rank"}``: what a loader needs to rebuild the bank."""
        return {"id": self.bank_id, "block_size": self.block_size, "rank_blocks": self.rank_blocks,
                "rank": self.rank}

    def cores(self, P: torch.Tensor) -> torch.Tensor:
        """``G_i = sum_j P[i, j] C_j`` for the rows of ``P: (n, l)``; returns ``(n, d, d)``."""
        return torch.einsum("nl,lij->nij", P, self.C)

    def blocks(self, P: torch.Tensor) -> torch.Tensor:
        """The dense blocks ``W_i = U G_i V^T: (n, D, D)`` (for :meth:`BankLinear.to_dense` and checks)."""
        return self.U @ self.cores(P) @ self.V.T

    def fold(self, order: str) -> torch.Tensor:
        """The bank's part of a layer's factor for contraction ``order`` (computed now; see :meth:`folded`).

        Returns:
            ``"v_g_u"``: ``C`` as ``(l, d*d)`` (index ``(i, j)``); ``"v_gu"``: ``CU[l, j, e] = sum_i C_l[i, j]
            U[e, i]`` as ``(l, d*D)``; ``"vg_u"``: ``VC[l, e, i] = sum_j V[e, j] C_l[i, j]`` as ``(l, D*d)``.
        """
        if order == "v_gu":
            return torch.einsum("lij,ei->lje", self.C, self.U).reshape(self.rank_blocks, -1)
        if order == "vg_u":
            return torch.einsum("ej,lij->lei", self.V, self.C).reshape(self.rank_blocks, -1)
        return self.C.reshape(self.rank_blocks, -1)

    def folded(self, order: str) -> torch.Tensor:
        """:meth:`fold` cached on the bank (shared by all its layers) until ``U``, ``V`` or ``C`` change."""
        return cached(self, f"_tensorlm_folded_{order}", lambda: self.fold(order))

    def extra_repr(self) -> str:
        return f"id={self.bank_id!r}, D={self.block_size}, l={self.rank_blocks}, d={self.rank}"


@register_layer
class BankLinear(nn.Module):
    """A linear map ``(..., in) -> (..., out)`` whose weight is a slice of a shared :class:`TuckerBank`.

    Args:
        in_features, out_features: multiples of the bank's block size ``D``.
        bank: the shared bank (held as a child module, the same object in every layer that shares it).
        bias: keep a bias ``(out,)``.

    Parameters: ``P: (n_blocks, l)`` with ``n_blocks = (out / D) * (in / D)`` (row-major over
    (block row, block column)), ``bias: (out,)``. Uninitialised values are NaN.

    Raises:
        TensorLMError: a dimension that is not a multiple of ``D``.
    """

    def __init__(self, in_features: int, out_features: int, bank: TuckerBank, bias: bool = True):
        super().__init__()
        size = bank.block_size
        if in_features % size or out_features % size:
            raise TensorLMError(
                f"BankLinear: shape (out={out_features}, in={in_features}) is not a multiple of the bank's "
                f"block_size D={size} in both dimensions"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bank = bank
        like = {"dtype": bank.C.dtype, "device": bank.C.device}
        n_blocks = (out_features // size) * (in_features // size)
        self.P = nn.Parameter(torch.full((n_blocks, bank.rank_blocks), float("nan"), **like))  # (n, l)
        self.bias = nn.Parameter(torch.full((out_features,), float("nan"), **like)) if bias else None

    @property
    def grid(self) -> tuple[int, int]:
        """``(out / D, in / D)``: block rows and block columns."""
        size = self.bank.block_size
        return self.out_features // size, self.in_features // size

    @classmethod
    def from_dense(cls, layer: nn.Module, *, ranks: tuple[int, int], block_size: int | None = None,
                   n_iter_max: int = 10, seed: int = 0) -> BankLinear:
        """A bank of its own for one ``nn.Linear``/``Conv1D``; see :func:`bank_from_dense`."""
        return bank_from_dense({"layer": layer}, ranks=ranks, block_size=block_size,
                               n_iter_max=n_iter_max, seed=seed)["layer"]

    FACTORED_ORDERS = ORDERS  # timed by tensorlm.layers.base.choose_forward

    @property
    def order(self) -> str:
        """The contraction order at inference, one of :data:`ORDERS` (default: the fewest multiply-adds,
        :meth:`macs_per_token`); training always contracts ``"v_g_u"``."""
        return self.__dict__.get("_bank_order") or min(ORDERS, key=self.macs_per_token)

    @order.setter
    def order(self, value: str) -> None:
        if value not in ORDERS:
            raise TensorLMError(f"BankLinear: order {value!r} is not one of {ORDERS}")
        self.__dict__["_bank_order"] = value

    def macs_per_token(self, order: str) -> int:
        """Multiply-adds per input row of the contraction ``order`` (dense: ``out * in``), with ``R`` block rows,
        ``K`` block columns: ``"v_g_u"`` ``K D d + K R d^2 + R d D``; ``"v_gu"`` ``K D d + K d out``;
        ``"vg_u"`` ``in R d + R d D``.

        Raises:
            TensorLMError: an unknown order.
        """
        rows, cols = self.grid
        size, rank = self.bank.block_size, self.bank.rank
        costs = {"v_g_u": cols * size * rank + cols * rows * rank * rank + rows * rank * size,
                 "v_gu": cols * size * rank + cols * rank * self.out_features,
                 "vg_u": self.in_features * rows * rank + rows * rank * size}
        if order not in costs:
            raise TensorLMError(f"BankLinear: order {order!r} is not one of {ORDERS}")
        return costs[order]

    def factor(self, order: str) -> torch.Tensor:
        """This layer's cores in the layout of ``order`` (``R`` block rows, ``K`` block columns):
        ``"v_g_u"``: ``mix (K d, R d)``, ``mix[c d + j, r d + i] = G_rc[i, j]``; ``"v_gu"``: ``(K d, out)``,
        ``G_rc`` times ``U^T``; ``"vg_u"``: ``(in, R d)``, ``V`` times ``G_rc^T``. Built from
        :meth:`TuckerBank.folded` with one product by ``P``; cached unless a gradient is needed.

        Raises:
            TensorLMError: an unknown order.
        """
        if order not in ORDERS:
            raise TensorLMError(f"BankLinear: order {order!r} is not one of {ORDERS}")
        rows, cols = self.grid
        size, rank = self.bank.block_size, self.bank.rank

        def build() -> torch.Tensor:
            folded = self.bank.fold(order) if needs_grad(self) else self.bank.folded(order)  # (l, .)
            mixed = self.P @ folded  # (R K, l) @ (l, .) -> (R K, .)
            if order == "v_gu":  # (R, K, d, D) -> (K, d, R, D)
                return mixed.reshape(rows, cols, rank, size).permute(1, 2, 0, 3).reshape(cols * rank, -1)
            if order == "vg_u":  # (R, K, D, d) -> (K, D, R, d)
                return mixed.reshape(rows, cols, size, rank).permute(1, 2, 0, 3).reshape(-1, rows * rank)
            # (R, K, i, j) -> (K, j, R, i)
            return mixed.reshape(rows, cols, rank, rank).permute(1, 3, 0, 2).reshape(cols * rank, rows * rank)

        if needs_grad(self):
            return build()
        return cached(self, "_tensorlm_factor", build, extra=(order,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in) -> (..., out)`` by :attr:`order` (``"v_g_u"`` while training); per-row cost
        :meth:`macs_per_token`."""
        order = "v_g_u" if needs_grad(self) else self.order
        rows, cols = self.grid
        size, rank = self.bank.block_size, self.bank.rank
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)  # (N, in)
        factor = self.factor(order)
        if order == "v_gu":
            z = (flat.reshape(-1, size) @ self.bank.V).reshape(-1, cols * rank)  # (N, K d)
            y = z @ factor if self.bias is None else torch.addmm(self.bias, z, factor)  # (N, out)
            return y.reshape(*lead, self.out_features)
        if order == "vg_u":
            h = flat @ factor  # (N, R d)
        else:
            z = (flat.reshape(-1, size) @ self.bank.V).reshape(-1, cols * rank)  # (N, K d)
            h = z @ factor  # (N, R d)
        y = (h.reshape(-1, rank) @ self.bank.U.T).reshape(-1, self.out_features)  # (N R, D) -> (N, out)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*lead, self.out_features)

    def weight_matrix(self) -> torch.Tensor:
        """The weight ``W: (out, in)`` this layer applies (formed, for checks and export)."""
        return merge_blocks(self.bank.blocks(self.P), self.out_features, self.in_features)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (copies)."""
        with torch.no_grad():
            bias = None if self.bias is None else self.bias.detach()
            return dense_linear(self.weight_matrix().detach(), bias)

    def extra_repr(self) -> str:
        rows, cols = self.grid
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={rows}x{cols}, "
                f"bank={self.bank.bank_id!r}, bias={self.bias is not None}")

    def tensorlm_config(self) -> dict:
        """``{"in_features", "out_features", "bias", "bank": {"id", "block_size", "rank_blocks", "rank"},
        "order"}``."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bank": self.bank.bank_config(), "order": self.order}

    @classmethod
    def from_tensorlm_config(cls, cfg: dict, shared: dict) -> BankLinear:
        """An uninitialised (NaN) layer whose bank is ``shared["tucker_bank:<id>"]``, created there if absent.

        Raises:
            TensorLMError: ``cfg`` lacks a key, or names a bank whose shapes differ from the bank already
                rebuilt under that id.
        """
        missing = [key for key in ("in_features", "out_features", "bias", "bank") if key not in cfg]
        missing += [f"bank.{key}" for key in BANK_CONFIG_KEYS if key not in cfg.get("bank", {})]
        if missing:
            raise TensorLMError(f"BankLinear config lacks {missing}; it needs in_features, out_features, bias "
                                f"and bank {{{', '.join(BANK_CONFIG_KEYS)}}}")
        bank_cfg = cfg["bank"]
        key = f"tucker_bank:{bank_cfg['id']}"
        if key not in shared:
            shared[key] = TuckerBank(bank_cfg["id"], bank_cfg["block_size"], bank_cfg["rank_blocks"],
                                     bank_cfg["rank"])
        bank = shared[key]
        if bank.bank_config() != bank_cfg:
            raise TensorLMError(f"BankLinear config names bank {bank_cfg}, but the bank rebuilt under {key!r} "
                                f"is {bank.bank_config()}")
        layer = cls(cfg["in_features"], cfg["out_features"], bank, bias=cfg["bias"])
        if "order" in cfg:  # absent in older folders: the default order
            layer.order = cfg["order"]
        return layer


def default_bank_id(names: list[str]) -> str:
    """A stable id for the bank of these module paths: the first 12 hex digits of their SHA-1."""
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]


def bank_from_dense(layers: dict[str, nn.Module], *, ranks: tuple[int, int], block_size: int | None = None,
                    n_iter_max: int = 10, seed: int = 0, bank_id: str | None = None) -> dict[str, BankLinear]:
    """Replace many linear maps by slices of one Tucker bank (Ren, Wang et al. 2022).

    Cuts every weight into ``D x D`` blocks, stacks them to ``(M, D, D)`` and fits ranks ``(l, d, d)``:
    by HOOI (:func:`tensorlm.decompose.tucker.tucker_bank`) or, at full ranks ``(M, D)``, by the exact
    identity bank (``U = V = I``, ``C = blocks``, ``P = I``).

    Args:
        layers: module path -> ``nn.Linear`` or GPT-2 ``Conv1D``; the order fixes the order of the blocks.
        ranks: ``(l, d)``, ``1 <= l <= min(M, d^2)``, ``1 <= d <= D``.
        block_size: ``D``; default the smallest dimension among the weights (the hidden size).
        n_iter_max, seed: passed to HOOI.
        bank_id: the bank's name in saved configs; default :func:`default_bank_id` of the paths.

    Returns:
        module path -> :class:`BankLinear`, all holding the same :class:`TuckerBank`, in the weights'
        dtype and device; a ``Conv1D`` is replaced by a map that computes exactly what it computed.

    Raises:
        TensorLMError: a module that is neither linear kind, a weight not a multiple of ``D``, ranks out of
            range, or weights of different dtype/device.
    """
    dense = {name: dense_weight(layer, name) for name, layer in layers.items()}
    weights = {name: weight for name, (weight, _) in dense.items()}
    if len({(w.dtype, w.device) for w in weights.values()}) > 1:
        raise TensorLMError("tucker bank: the weights differ in dtype or device; convert the model first")
    blocks, layout = split_blocks(weights, block_size)  # (M, D, D)
    rank_blocks, rank = ranks
    check_ranks(layout.n_blocks, layout.block_size, rank_blocks, rank)
    if (rank_blocks, rank) == (layout.n_blocks, layout.block_size):
        factors = identity_bank(blocks)
    else:
        factors = tucker_bank(blocks, ranks, n_iter_max=n_iter_max, seed=seed)
    return layers_from_factors({name: bias for name, (_, bias) in dense.items()}, factors, layout,
                               bank_id or default_bank_id(list(layers)))


def layers_from_factors(biases: dict[str, torch.Tensor | None], factors: BankFactors, layout: BlockLayout,
                        bank_id: str) -> dict[str, BankLinear]:
    """One :class:`BankLinear` per weight of ``layout``, all holding one :class:`TuckerBank` of ``factors``.

    Args:
        biases: module path -> ``bias (out,)`` or None, in the layout's order.
        factors: ``U, V: (D, d)``, ``C: (l, d, d)``, ``P: (M, l)``, in the dtype/device the layers get.
        layout: where each weight's rows of ``P`` are; bank_id: the bank's name in saved configs.
    """
    bank = TuckerBank.from_factors(factors, bank_id)
    replacements = {}
    for name, bias in biases.items():
        out_features, in_features = layout.shapes[name]
        layer = BankLinear(in_features, out_features, bank, bias=bias is not None)
        with torch.no_grad():
            layer.P.copy_(factors.P[layout.blocks_of(name)])
            if bias is not None:
                layer.bias.copy_(bias)
        replacements[name] = layer
    return replacements


def bank_parameters(layers: dict[str, BankLinear]) -> dict[str, int]:
    """Count what a set of bank layers holds: ``bank`` (``U``, ``V``, ``C`` of each distinct bank once),
    ``rows`` (all ``P``), ``bias``, and ``weights = bank + rows`` (the figure compared with the dense
    weights; equals :func:`tensorlm.decompose.tucker.bank_parameter_count` for one bank)."""
    banks = {id(layer.bank): layer.bank for layer in layers.values()}
    bank = sum(p.numel() for b in banks.values() for p in b.parameters())
    rows = sum(layer.P.numel() for layer in layers.values())
    bias = sum(layer.bias.numel() for layer in layers.values() if layer.bias is not None)
    return {"bank": bank, "rows": rows, "bias": bias, "weights": bank + rows}
