"""Embedding compression where embeddings dominate: every token-table method at equal compression ratios of
the table, training-free, on Gemma-3-270M (63% of its parameters are the tied table), SmolLM2-135M (21%) and
all-MiniLM-L6-v2, beside the dense model measured in the same run.

Methods (``tensorlm`` method, options chosen per target ratio ``rho`` of the table ``V x d``):
``svd`` truncated SVD ``U (V, r) V (r, d)`` (``lowrank_embedding``); ``tensorgpt`` one MPS per row at a uniform
TT-rank (``tt_embedding``; TensorGPT, Xu et al. 2023), ``tensorgpt-frequency`` the same parameters with ragged
per-row ranks weighted by token frequency on calibration text, ``tensorgpt-tolerance`` TensorGPT's per-row
tolerance ``eps`` (each row its own smallest TT-ranks with ``||e_t - e~_t|| <= eps ||e_t||``, stored at them;
``eps`` by bisection so that 4,096 evenly spaced rows cost ``d / rho`` on average, at the uniform plan's
tensorisation); ``tt-matrix`` a TT-matrix over the padded
vocabulary and ``d`` (``tt_matrix_embedding``; Hrinchuk et al. 2020; the padded rows counted),
``tt-matrix-frequency`` its rows weighted by token frequency (through the nearest Kronecker product of the
weights over the vocabulary digits); ``kronecker``
``E ~ A (x) b`` with ``b: (1, f)`` (KnGPT2/TQ), ``kronecker-permute`` after a column-permutation search,
``kronecker-frequency`` rows weighted by token frequency; ``svd-frequency`` the SVD minimising ``sum_t f_t
||e_t - e~_t||^2``, ``svd-frequency-whitened`` (tied heads) ``sum_t f_t ||(e_t - e~_t) G^{1/2}||^2`` with ``G``
the second moment of the head's inputs (``lowrank_embedding`` ``calibration``; closed forms), ``*-split``
the same with half the parameters spent on the ``V / (2 rho)`` most frequent tokens' rows kept exactly
(``dense_rows``, adaptive-input style) and the other half on the SVD of the other rows (``-split75``: three
quarters on ``3 V / (4 rho)`` rows; ``-2m``: the token counts on 4,096 x 512 = 2.1M tokens of ``lm_text``,
calibration ``count_samples``, the second moments still on the 32 x 512 below); calibration
text: causal LMs 32 x 512 tokens of ``lm_text`` training blocks, MiniLM 1,024 training sentences; ``*-untied``:
the causal LM keeps its dense head.
Every tied head is re-tied to the factors (Gemma's ``embed_scale`` kept on the lookups only).

Protocols: causal LMs ``wt2-16k`` (the first 16,384 tokens of WikiText-2 raw test, sliding windows of 1024,
stride 512, token-level perplexity) and LAMBADA (OpenAI test) last-word accuracy on the first 1,000 passages,
scored only where wt2-16k perplexity is at most 1,000 (``BROKEN_PPL``, about 50x dense: the 31 rows measured
above it before this rule scored at most 0.022, against dense 0.297 and 0.405, and LAMBADA's 1,000 passages are
three times wt2-16k's tokens: "skipped" in the tables); a method broken in that sense at one ratio is not run at
the larger ones (``broken_below``: among the 171 rows measured before this rule, no method came back to 1,000 or
below at a larger ratio once above it; "not run" in the tables);
MiniLM STS-B test Spearman (mean pooling, cosine). ``embedding_ratio`` = ``V d`` / parameters of the
replacing table; ``params`` = unique parameters of the whole model (a tied table once); ``size_bytes`` =
``model.safetensors`` of the saved folder. Lookup: median seconds of the table's forward on 32 x 128 random
ids (factored path) against ``nn.Embedding`` on the same ids, same process. Evaluation runs the compressed
model through its cached reconstructed table (``set_forward_all(model, "reconstructed")``): the numbers
are those of the factored model, computed at dense speed. ``--heal``: each row also after reconstructing the
table alone (``tensorlm.heal.embedding``: Adam on the table's factors against the dense table's looked-up rows,
weighted by token counts, and, with a tied head, its logits centred over the vocabulary on the 64 leading
principal directions of the head's inputs; calibration text as above, 1/8 held out for early stopping; at most
300 Adam steps at lr 1e-3: ``HEAL``), under ``healed`` with its wall seconds. Models: Gemma 3 270M (Google,
Gemma Terms of Use), GGUF Q4_K_M weights (third-party quantization) dequantized to float32; SmolLM2-135M-Instruct
GGUF Q4_1 dequantized to float32; all-MiniLM-L6-v2 float32. No other training.

Run: ``python benchmarks/embeddings.py [--models minilm smollm2 gemma3] [--methods ...] [--ratios 2 5 ...]
[--heal]`` (resumable: rows already in the JSON are kept, and with ``--heal`` a row without ``healed`` is
compressed again, healed and measured; ``--smoke`` runs tiny random models into a temporary folder);
``--render-only`` rewrites the Markdown and PNG from the JSON.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from tensorlm import Recipe, compress, count_parameters, load_model, save_compressed
from tensorlm.calibrate import calibration_batches
from tensorlm.decompose.tt import default_shape, max_ranks, suggest_shape, tt_parameter_count, tt_svd_rows
from tensorlm.errors import TensorLMError
from tensorlm.evaluate import CAUSAL_PROTOCOLS, evaluate_model
from tensorlm.evaluate.sts import sts_spearman
from tensorlm.heal import ReconstructConfig
from tensorlm.heal.embedding import reconstruct_embedding
from tensorlm.layers.base import RECONSTRUCTED, forward_all
from tensorlm.pipeline import machine
from tensorlm.recipe import CalibrationSettings
from tensorlm.surgery import calibrate, plan_recipe

HERE = Path(__file__).parent
RESULTS = HERE / "results"
MODELS = {  # short name -> (load_model name, token table, kind)
    "minilm": ("all-MiniLM-L6-v2", "embeddings.word_embeddings", "encoder"),
    "smollm2": ("smollm2-135m", "model.embed_tokens", "causal-lm"),
    "gemma3": ("gemma3-270m", "model.embed_tokens", "causal-lm"),
}
METHODS = ["svd", "tensorgpt", "tt-matrix", "kronecker", "tensorgpt-frequency", "kronecker-frequency",
           "kronecker-permute", "svd-untied", "tensorgpt-untied", "svd-frequency", "svd-frequency-whitened",
           "tensorgpt-tolerance", "tt-matrix-frequency", "svd-frequency-split", "svd-frequency-whitened-split",
           "svd-frequency-split75", "svd-frequency-whitened-split75", "svd-frequency-whitened-split-2m",
           "svd-frequency-whitened-split75-2m"]
COUNTED, COUNT_SAMPLES = "-2m", 4096  # *-2m: token counts on 4,096 x 512 tokens of lm_text (calibration count_samples)
RATIOS = [2.0, 3.3, 5.0, 10.0, 20.0, 40.0]
BROKEN_PPL = 1_000.0  # above this wt2-16k perplexity a causal LM is broken: no LAMBADA, no larger ratio (docstring)
CAUSAL_CALIBRATION = {"calibration": {"samples": 32, "length": 512, "seed": 0}}  # 32 x 512 lm_text training tokens
LOOKUP_SHAPE = (32, 128)
HEAL = ReconstructConfig(batch_size=4, embedding_steps=300, embedding_lr=1e-3, eval_every=10, patience=3,
                         head_directions=64, time_budget_s=600.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Rows:
    """The JSON file: rows keyed by ``(model, method, target_ratio)``, rewritten atomically after every row; its
    header (protocol, machine) is the running script's."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {**(json.loads(path.read_text()) if path.exists() else {"rows": []}), **header}

    @staticmethod
    def key(row: dict) -> tuple:
        return row["model"], row["method"], row.get("target_ratio")

    def get(self, model: str, method: str, target: float | None) -> dict | None:
        return next((r for r in self.data["rows"] if self.key(r) == (model, method, target)), None)

    def put(self, row: dict) -> None:
        """Add ``row`` to the file as it is now (runs for different models may share it: merged under a lock)."""
        with open(Path(tempfile.gettempdir()) / f"{self.path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.data["rows"] = json.loads(self.path.read_text())["rows"]
            self.data["rows"] = [r for r in self.data["rows"] if self.key(r) != self.key(row)] + [row]
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=2, allow_nan=False))
            os.replace(tmp, self.path)


# --- options per method at a target ratio --------------------------------------------------------------------

def svd_options(vocab: int, dim: int, ratio: float) -> dict:
    """Rank ``r`` whose ``r (V + d)`` is nearest ``V d / ratio``."""
    return {"rank": max(1, min(dim, round(vocab * dim / (ratio * (vocab + dim)))))}


def tensorgpt_options(vocab: int, dim: int, ratio: float) -> dict:
    """The tensorisation (3 to 6 modes) and uniform rank whose per-row cost ``sum_k r I_k r`` is nearest (in
    log ratio) ``d / ratio``."""
    best = None
    for modes in (3, 4, 5, 6):
        try:
            shape = list(suggest_shape(dim, modes))
        except TensorLMError:  # d has no factorisation into this many factors
            continue
        for rank in range(1, max(max_ranks(shape)) + 1):
            ranks = [min(rank, b) for b in max_ranks(shape)]
            gap = abs(math.log(dim / tt_parameter_count(shape, ranks) / ratio))
            if best is None or gap < best[0]:
                best = (gap, {"shape": shape, "ranks": ranks})
    return best[1]


def tt_matrix_options(vocab: int, dim: int, ratio: float) -> dict:
    """Uniform TT-rank over 3 modes (vocabulary padded as :func:`default_shape` pads it) nearest ``V d / ratio``
    parameters."""
    vocab_shape, dim_shape = list(default_shape(vocab, 3)), list(suggest_shape(dim, 3))
    bound = max_ranks([v * d for v, d in zip(vocab_shape, dim_shape, strict=True)])
    best = None
    for rank in range(1, max(bound) + 1):
        ranks = [min(rank, b) for b in bound]
        full = [1, *ranks, 1]
        params = sum(full[k] * v * d * full[k + 1] for k, (v, d) in enumerate(zip(vocab_shape, dim_shape, strict=True)))
        gap = abs(math.log(vocab * dim / params / ratio))
        if best is None or gap < best[0]:
            best = (gap, {"vocab_shape": vocab_shape, "dim_shape": dim_shape, "ranks": ranks})
    return best[1]


def kronecker_options(vocab: int, dim: int, ratio: float) -> dict:
    """The divisor ``f`` of ``d`` nearest (in log) the ratio: ``A (V, d/f)``, ``b (1, f)``."""
    divisors = [f for f in range(2, dim + 1) if dim % f == 0]
    return {"factor": min(divisors, key=lambda f: abs(math.log(f / ratio)))}


def tolerance_eps(weight: torch.Tensor, shape: list[int], ratio: float, sample: int = 4096) -> float:
    """The per-row tolerance whose rows' own TT-ranks cost ``d / ratio`` values per row on average, by bisection
    on ``log eps`` over ``sample`` evenly spaced rows of ``weight (V, d)`` (the cost falls as ``eps`` grows);
    ``0.999`` when even rank 1 everywhere costs more."""
    rows = weight.detach()[torch.linspace(0, weight.shape[0] - 1, min(sample, weight.shape[0])).long()]  # (n, d)

    def cost(eps: float) -> float:
        _, ranks = tt_svd_rows(rows, shape, eps=eps)  # (n, N+1)
        full = ranks.double()
        return float(sum(full[:, k] * size * full[:, k + 1] for k, size in enumerate(shape)).mean())

    target, low, high = weight.shape[1] / ratio, math.log(1e-4), math.log(0.999)
    if cost(math.exp(high)) > target:
        return 0.999
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(math.exp(middle)) > target else (low, middle)
    return round(math.exp(high), 6)


def method_stage(method: str, table: str, vocab: int, dim: int, ratio: float, kind: str,
                 weight: torch.Tensor | None = None) -> dict | None:
    """The recipe stage of ``method`` at ``ratio``; None when the variant does not apply (untied head of an
    encoder, a permutation search beyond ``b: (1, 4)``). ``tensorgpt-tolerance`` chooses its ``eps`` on the
    table ``weight (V, d)`` (:func:`tolerance_eps`; without it, ``eps`` is None: only whether it applies)."""
    base, _, variant = method.partition("-")
    variant = variant.removesuffix(COUNTED)
    if base == "tt":  # tt-matrix[-variant]
        variant = variant.partition("-")[2]
    variant, split, share = variant.partition("-split")  # svd-frequency[-whitened]-split[75]: dense rows
    if variant == "untied" and kind != "causal-lm":
        return None
    if base == "svd":
        name, options = "lowrank_embedding", svd_options(vocab, dim, ratio)
    elif base == "tensorgpt":
        name, options = "tt_embedding", tensorgpt_options(vocab, dim, ratio)
    elif base == "tt":
        name, options = "tt_matrix_embedding", tt_matrix_options(vocab, dim, ratio)
    else:
        name, options = "kronecker_embedding", kronecker_options(vocab, dim, ratio)
    if variant == "frequency-whitened" and kind != "causal-lm":  # it weights by the tied head's inputs
        return None
    if variant in ("frequency", "frequency-whitened"):
        options["calibration"] = variant
    if split:  # half (75: three quarters) of the budget on the most frequent rows, the rest buys the rank
        dense_rows = int(int(share or 50) / 100 * vocab / ratio)
        options = {"ratio": 1 / ratio, "dense_rows": dense_rows, "calibration": variant}
    if variant == "tolerance":  # TensorGPT's per-row eps at the uniform plan's tensorisation, stored ragged
        options = {"shape": options["shape"],
                   "eps": None if weight is None else tolerance_eps(weight, options["shape"], ratio)}
    if variant == "permute":  # the search pairs columns: b of 2 or 4 columns only (SEARCHED_B_SIDES)
        if ratio > 6:
            return None
        options = {"factor": 2 if ratio < 2.9 else 4, "permute": {"time_budget_s": 30.0, "seed": 0}}
    if kind == "causal-lm":
        options["head"] = "untie" if variant == "untied" else "tie"
    return {"name": "embedding", "method": name, "targets": [table], "options": options}


# --- measuring ---------------------------------------------------------------------------------------------

def lookup_seconds(layer: nn.Module, vocab: int, repeats: int = 7) -> float:
    """Median seconds of ``layer(ids)`` for ``ids (32, 128)`` random token ids (factored path, no grad)."""
    ids = torch.randint(0, vocab, LOOKUP_SHAPE, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        layer(ids)
        for _ in range(repeats):
            start = time.perf_counter()
            layer(ids)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def quality(model: nn.Module, loaded, kind: str, data_dir, smoke: bool) -> dict:
    """``wikitext2_ppl``, ``lambada_acc`` and ``lambada_ppl`` (causal, ``sweep`` protocol; LAMBADA left out
    above ``BROKEN_PPL``) or ``stsb`` (encoder); for ``--smoke``
    ``output_mse`` against the dense ``loaded.model``, all a tiny random model can give."""
    if smoke:
        return {"output_mse": output_gap(model, loaded.model, model.get_input_embeddings().num_embeddings)}
    if kind == "encoder":
        return {"stsb": sts_spearman(model, loaded.tokenizer, dataset="stsb", split="test", data_dir=data_dir,
                                     progress=False), "protocol": "STS-B test Spearman, mean pooling, cosine"}
    metrics, protocols = evaluate_model(model, loaded.tokenizer, kind, data_dir=data_dir, mode="sweep",
                                        lambada_max_ppl=BROKEN_PPL)
    return {**metrics, "protocol": CAUSAL_PROTOCOLS["sweep"].name, "protocols": protocols}


def measure(model: nn.Module, loaded, kind: str, data_dir, smoke: bool) -> dict:
    """:func:`quality` of ``model`` through each factored layer's cached reconstruction (the same function at
    dense speed), with ``eval_seconds``; the layers keep their own forward after (the factored one healing trains)."""
    start = time.perf_counter()
    with forward_all(model, RECONSTRUCTED):
        metrics = quality(model, loaded, kind, data_dir, smoke)
    return {**metrics, "eval_seconds": round(time.perf_counter() - start, 1)}


def table_error(small: nn.Module, dense: nn.Module) -> float:
    """Relative Frobenius error of ``small``'s token table (the factored one inside a ScaledEmbedding) against
    ``dense``'s."""
    table, reference = small.get_input_embeddings(), dense.get_input_embeddings().weight
    with torch.no_grad():
        approx = getattr(table, "embedding", table).to_dense().weight  # (V, d)
        return float((approx - reference).norm() / reference.norm())


def size_on_disk(model: nn.Module, kind: str, recipe: Recipe | None) -> int:
    """Bytes of ``model.safetensors`` when ``model`` is saved (a temporary folder, removed after); the dense
    model is written by ``safetensors.torch.save_model`` (a tied table once), as ``save_pretrained`` would
    write it, which refuses a model loaded from GGUF."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        if recipe is None:
            folder.mkdir()
            save_model(model, str(folder / "model.safetensors"))
        else:
            save_compressed(model, folder, kind=kind, recipe=recipe)
        return (folder / "model.safetensors").stat().st_size


def output_gap(small: nn.Module, dense: nn.Module, vocab: int) -> float:
    """Mean squared difference of the outputs (logits or hidden states) on fixed random ids (``--smoke``)."""
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = small(ids), dense(ids)
    key = "logits" if hasattr(a, "logits") and a.logits is not None else "last_hidden_state"
    return float((getattr(a, key) - getattr(b, key)).square().mean())


def stamp() -> dict:
    """Where and under what load a row was measured."""
    return {"threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def dense_row(rows: Rows, short: str, loaded, table: str, kind: str, data_dir, smoke: bool) -> dict:
    row = rows.get(short, "dense", None)
    if row is not None:
        return row
    log(f"{short}: dense")
    layer = loaded.model.get_submodule(table)
    row = {"model": short, "method": "dense", "target_ratio": None, "embedding_ratio": 1.0,
           "params": count_parameters(loaded.model)["total"], "embedding_params": layer.weight.numel(),
           "size_bytes": size_on_disk(loaded.model, kind, None),
           "lookup_seconds": lookup_seconds(layer, layer.num_embeddings),
           **measure(loaded.model, loaded, kind, data_dir, smoke), "model_notes": loaded.notes, **stamp()}
    rows.put(row)
    return row


def method_recipe(short: str, method: str, ratio: float, stage: dict, calibration: dict) -> Recipe:
    """The one-stage recipe of ``method`` at ``ratio`` (``stage`` from :func:`method_stage`); a ``-2m`` method
    counts tokens on ``COUNT_SAMPLES`` samples, far more text than the second moments."""
    if method.endswith(COUNTED):
        calibration = {"calibration": {**calibration["calibration"], "count_samples": COUNT_SAMPLES}}
    return Recipe.from_dict({"name": f"{short}-{method}-{ratio:g}x", "stages": [stage], **calibration})


def broken_below(rows: list[dict], model: str, method: str, ratio: float) -> dict | None:
    """The row of ``method`` on ``model`` at a target ratio below ``ratio`` whose wt2-16k perplexity is above
    ``BROKEN_PPL`` (the smallest such ratio), or None: the sweep does not run ``method`` at ``ratio`` then."""
    broken = [r for r in rows if r["model"] == model and r["method"] == method and r.get("target_ratio")
              and r["target_ratio"] < ratio and r.get("wikitext2_ppl", 0.0) > BROKEN_PPL]
    return min(broken, key=lambda r: r["target_ratio"], default=None)


def unmeasured(rows: list[dict], model: str, kind: str, broken: bool = False) -> list[str]:
    """``["svd at 3.3x, 5x", ...]``: the sweep's methods without a row on ``model`` at the ratios where they
    apply to a model of ``kind`` (:func:`method_stage` on a 512 x 64 stand-in: only the options, not whether it
    applies, depend on the table's shape); ``broken``: those not run because the method broke at a smaller
    ratio (:func:`broken_below`), else the others."""
    have = {(r["method"], r["target_ratio"]) for r in rows if r["model"] == model}
    gaps = []
    for method in METHODS:
        ratios = [x for x in RATIOS if (method, x) not in have and method_stage(method, "t", 512, 64, x, kind)
                  and (broken_below(rows, model, method, x) is not None) == broken]
        if ratios:
            gaps.append(f"{method} at {', '.join(f'{x:g}x' for x in ratios)}")
    return gaps


def method_row(rows: Rows, short: str, loaded, table: str, kind: str, method: str, ratio: float, data_dir,
               smoke: bool, calibration: dict, heal: bool = False) -> None:
    """Measure ``method`` at ``ratio`` training-free (unless its row exists) and, with ``heal``, after
    :func:`heal_table` (unless the row has ``healed``); the row is written after each."""
    row = rows.get(short, method, ratio)
    if row is not None and (not heal or "healed" in row):
        return
    if row is None and (broken := broken_below(rows.data["rows"], short, method, ratio)):
        log(f"{short} {method} {ratio:g}x: not run, broken at {broken['target_ratio']:g}x "
            f"(wt2-16k {broken['wikitext2_ppl']:,.0f} > {BROKEN_PPL:,.0f})")
        return
    dense_table = loaded.model.get_submodule(table)
    vocab, dim = dense_table.num_embeddings, dense_table.embedding_dim
    stage = method_stage(method, table, vocab, dim, ratio, kind, dense_table.weight)
    if stage is None:
        return
    recipe = method_recipe(short, method, ratio, stage, calibration)
    log(f"{short} {method} {ratio:g}x: {stage['method']} {stage['options']}")
    start = time.perf_counter()
    plan = plan_recipe(loaded.model, recipe)
    stats = calibrate(loaded.model, recipe, plan, loaded.tokenizer, kind, data_dir, progress=False)
    small = compress(loaded.model, recipe, plan=plan, stats=stats, progress=False)
    compress_seconds = time.perf_counter() - start
    if row is None:
        row = measure_row(small, loaded, short, table, kind, method, ratio, stage, recipe, data_dir, smoke)
        rows.put({**row, "compress_seconds": round(compress_seconds, 1)})
        shown = {k: row[k] for k in ("wikitext2_ppl", "lambada_acc", "stsb", "output_mse") if k in row}
        log(f"{short} {method} {ratio:g}x: embedding {row['embedding_ratio']:.2f}x, {row['params']:,} params, {shown}")
    if heal:
        result = heal_table(small, loaded, recipe, kind, data_dir, smoke)
        metrics = measure(small, loaded, kind, data_dir, smoke)
        rows.put({**rows.get(short, method, ratio), "healed": {**metrics, "heal": result, **stamp()}})
        log(f"{short} {method} {ratio:g}x healed: {({k: v for k, v in metrics.items() if k != 'protocols'})}")


def measure_row(small: nn.Module, loaded, short: str, table: str, kind: str, method: str, ratio: float, stage: dict,
                recipe: Recipe, data_dir, smoke: bool) -> dict:
    """The training-free row of ``small`` (``method`` at ``ratio``): counts, size, table error, lookup time and
    quality (:func:`measure`)."""
    dense_table = loaded.model.get_submodule(table)
    vocab, dim = dense_table.num_embeddings, dense_table.embedding_dim
    replaced = small.get_submodule(table)
    inner = getattr(replaced, "embedding", replaced)  # the factored table inside a ScaledEmbedding
    embedding_params = sum(p.numel() for p in inner.parameters())
    counts = count_parameters(small)
    lookup = lookup_seconds(replaced, vocab)
    size = size_on_disk(small, kind, recipe)
    return {"model": short, "method": method, "target_ratio": ratio, "embedding_ratio": vocab * dim / embedding_params,
            "params": counts["total"], "stored": counts["stored"], "tied_head": counts["tied_head"],
            "embedding_params": embedding_params, "size_bytes": size,
            "table_rel_error": table_error(small, loaded.model), "lookup_seconds": lookup, "options": stage["options"],
            "layer": type(inner).__name__, **measure(small, loaded, kind, data_dir, smoke), **stamp()}


def heal_table(small: nn.Module, loaded, recipe: Recipe, kind: str, data_dir, smoke: bool,
               config: ReconstructConfig = HEAL) -> dict:
    """Reconstruct ``small``'s factored table (and tied head) in place on the recipe's calibration text
    (``config``; random ids for ``--smoke``); returns the result with the table's relative error after."""
    if smoke:
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, small.get_input_embeddings().num_embeddings, (4, 16), generator=g)
                   for _ in range(8)]
    else:
        batches, _ = calibration_batches(recipe.calibration or CalibrationSettings(), loaded.tokenizer, kind,
                                         data_dir, batch_size=config.batch_size)
    result = reconstruct_embedding(small, loaded.model, batches, config=config, log=log).to_dict()
    return {**result, "table_rel_error": table_error(small, loaded.model), "config": config.to_dict(),
            "batches": len(batches)}


# --- smoke models --------------------------------------------------------------------------------------------

def smoke_models() -> dict:
    """Tiny random stand-ins (no data, no packages): a Gemma 3 with its scaled table and a BERT encoder."""
    from transformers import BertConfig, BertModel, Gemma3ForCausalLM, Gemma3TextConfig

    from tensorlm.loaded import LoadedModel

    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=32, max_position_embeddings=64)).eval()
    bert = BertModel(BertConfig(vocab_size=512, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=96), add_pooling_layer=False).eval()
    return {"tiny-gemma3": (LoadedModel(gemma, None, "causal-lm", "tiny-gemma3", ["random"]), "model.embed_tokens",
                            "causal-lm"),
            "tiny-bert": (LoadedModel(bert, None, "encoder", "tiny-bert", ["random"]), "embeddings.word_embeddings",
                          "encoder")}


# --- rendering -----------------------------------------------------------------------------------------------

def quality_key(row: dict) -> str:
    return "stsb" if "stsb" in row else "wikitext2_ppl" if "wikitext2_ppl" in row else "output_mse"


ROUNDING = 0.99  # a sweep point counts as its target ratio when its integer ranks reach 99% of it (3.29x as 3.3x)


def headline(rows: list[dict], model: str) -> list[str]:
    """The issue's targets: the largest embedding ratio within 1% and 5% of dense perplexity (causal) or at
    99% of dense STS-B (MiniLM), over every method measured, training-free or healed."""
    dense = next((r for r in rows if r["model"] == model and r["method"] == "dense"), None)
    done = [r for r in rows if r["model"] == model and r["method"] != "dense" and quality_key(r) in r]
    done += [{**r, **r["healed"], "method": f"{r['method']}, healed"} for r in done if "healed" in r]
    if dense is None or quality_key(dense) not in dense or not done:
        return []
    key = quality_key(dense)
    out = []
    if key == "stsb":
        kept = [r for r in done if r["stsb"] >= 0.99 * dense["stsb"]]
        best = max(kept, key=lambda r: r["embedding_ratio"], default=None)
        near = max((r for r in done if r["embedding_ratio"] >= 3 * ROUNDING), key=lambda r: r["stsb"], default=None)
        out.append(f"- {model}: largest embedding ratio at >= 99% of dense STS-B ({0.99 * dense['stsb']:.4f}): "
                   + (f"{best['embedding_ratio']:.2f}x ({best['method']}, STS-B {best['stsb']:.4f})" if best
                      else f"none of the {len(done)} rows (target: >= 3x)")
                   + (f"; the best at 3x or more: {near['method']} at {near['embedding_ratio']:.2f}x, STS-B "
                      f"{near['stsb']:.4f} ({near['stsb'] / dense['stsb']:.1%} of dense)" if near else ""))
    elif key == "wikitext2_ppl":
        for slack, target in ((0.01, 3.3), (0.05, 10)):
            kept = [r for r in done if r["wikitext2_ppl"] <= (1 + slack) * dense["wikitext2_ppl"]]
            best = max(kept, key=lambda r: r["embedding_ratio"], default=None)
            near = min((r for r in done if r["embedding_ratio"] >= target * ROUNDING),
                       key=lambda r: r["wikitext2_ppl"], default=None)
            out.append(f"- {model}: largest embedding ratio within {slack:.0%} of dense wt2-16k perplexity: "
                       + (f"{best['embedding_ratio']:.2f}x ({best['method']})" if best
                          else f"none of the {len(done)} rows (target: >= {target}x)")
                       + (f"; the best at {target}x or more: {near['method']} at {near['embedding_ratio']:.2f}x, "
                          f"{near['wikitext2_ppl']:,.2f} ({near['wikitext2_ppl'] / dense['wikitext2_ppl']:.2f}x "
                          "dense)" if near else ""))
    return out


def render(data: dict) -> str:
    rows = data["rows"]
    lines = ["# Embedding compression: every token-table method at equal ratios, training-free", "",
             data["protocol"], "", f"Machine: {data['machine']}.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model),
                      key=lambda r: (r["method"] != "dense", r["method"], r.get("target_ratio") or 0))
        dense = next((r for r in mine if r["method"] == "dense"), {})
        key = quality_key(dense) if dense else quality_key(mine[0])
        name = {"stsb": "STS-B", "wikitext2_ppl": "wt2-16k ppl", "output_mse": "output MSE"}[key]
        lines += [f"## {model}", "", (dense.get("model_notes") or [""])[0], "",
                  f"| method | target | embedding ratio | params | size MB | table rel. error | {name} | x dense | "
                  f"LAMBADA acc | healed: {name} (x dense) | healed: LAMBADA | lookup 32x128 ms (dense) | load avg |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mine:
            value = r.get(key)
            versus = f"{value / dense[key]:,.3f}" if value is not None and dense.get(key) else "-"
            target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}x"
            lambada = (f"{r['lambada_acc']:.3f}" if "lambada_acc" in r
                       else "skipped" if r.get(key, 0) > BROKEN_PPL and key == "wikitext2_ppl" else "-")
            shown = "-" if value is None else f"{value:,.4g}"
            lookup = f"{r['lookup_seconds'] * 1e3:.2f} ({dense.get('lookup_seconds', float('nan')) * 1e3:.2f})"
            healed = r.get("healed", {})
            healed_value = (f"{healed[key]:,.4g} ({healed[key] / dense[key]:,.3f})" if key in healed and dense.get(key)
                            else "-")
            healed_lambada = f"{healed['lambada_acc']:.3f}" if "lambada_acc" in healed else "-"
            lines.append(f"| {r['method']} | {target} | {r['embedding_ratio']:.2f}x | {r['params']:,} | "
                         f"{r['size_bytes'] / 1e6:,.1f} | {r.get('table_rel_error', 0.0):.3f} | {shown} | {versus} | "
                         f"{lambada} | {healed_value} | {healed_lambada} | {lookup} | {r['load_average']} |")
        kind = "causal-lm" if key == "wikitext2_ppl" else "encoder"
        skipped, todo = unmeasured(rows, model, kind, broken=True), unmeasured(rows, model, kind)
        lines += [""] + headline(rows, model) + [""]
        lines += [f"Not run, as the method broke (wt2-16k above {BROKEN_PPL:,.0f}) at a smaller ratio: "
                  f"{'; '.join(skipped)}.", ""] if skipped else []
        lines += [f"Not yet measured: {'; '.join(todo)}.", ""] if todo else []
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    """Quality against embedding ratio, one panel per model, one line per method, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    methods = sorted({r["method"] for r in data["rows"]} - {"dense"})
    palette = [*plt.cm.tab20.colors, *plt.cm.tab20b.colors]  # 40 colours: one per method in every panel
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        mine = [r for r in data["rows"] if r["model"] == model]
        dense = next((r for r in mine if r["method"] == "dense"), None)
        key = quality_key(dense or mine[0])
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "dense"):
            pts = sorted((r["embedding_ratio"], r[key]) for r in mine if r["method"] == method and key in r)
            if pts:
                line, = ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=method, color=colors[method])
                healed = sorted((r["embedding_ratio"], r["healed"][key]) for r in mine
                                if r["method"] == method and key in r.get("healed", {}))
                if healed:
                    ax.plot(*zip(*healed, strict=True), marker="^", ms=3, ls=":", color=line.get_color(),
                            label=f"{method}, healed")
        if dense is not None and key in dense:
            ax.axhline(dense[key], color="k", lw=0.8, ls="--", label="dense")
        ax.set_xscale("log")
        ax.set_xticks(RATIOS, [f"{x:g}x" for x in RATIOS])  # plain labels, no "3 x 10^0" overprinting
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if key != "stsb":
            ax.set_yscale("log")
        ax.set_xlabel("embedding compression ratio (V d / table parameters)")
        ax.set_ylabel({"stsb": "STS-B test Spearman", "wikitext2_ppl": "wt2-16k perplexity (log)"}.get(key, key))
        ax.set_title(f"{model}: training-free (solid), table healed (dotted)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    save_figure(fig, path, dpi=110)


def save_figure(fig, path: Path, dpi: int) -> None:
    """``fig`` as the PNG ``path``, written atomically (a temporary file, then renamed)."""
    fig.tight_layout()
    tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


def write_outputs(path: Path, render_md=None, draw=None) -> None:
    """The Markdown and PNG beside the JSON ``path``, each written atomically: ``render_md(data) -> str`` and
    ``draw(data, png_path)``, by default this sweep's :func:`render` and :func:`plot`."""
    data = json.loads(path.read_text())
    markdown = path.with_suffix(".md")
    tmp = markdown.with_suffix(f".md.{os.getpid()}.tmp")
    tmp.write_text((render_md or render)(data))
    os.replace(tmp, markdown)
    (draw or plot)(data, path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS)
    parser.add_argument("--smoke", action="store_true", help="tiny random models into a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="the JSON path (default results/embeddings.json)")
    parser.add_argument("--heal", action="store_true", help="also measure each row after reconstructing its table")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = args.out or (Path(tempfile.mkdtemp()) / "embeddings.json" if args.smoke else RESULTS / "embeddings.json")
    if not args.render_only:
        rows = Rows(path, {"protocol": __doc__.split("Run:")[0].strip(), "machine": machine(load=False)})
        todo = smoke_models() if args.smoke else {s: MODELS[s] for s in args.models}
        for short, spec in todo.items():
            if args.smoke:
                loaded, table, kind = spec
            else:
                name, table, kind = spec
                loaded = load_model(name, data_dir=args.data_dir)
            calibration = CAUSAL_CALIBRATION if kind == "causal-lm" else {}
            dense_row(rows, short, loaded, table, kind, args.data_dir, args.smoke)
            methods = [m for m in args.methods if not (args.smoke and "frequency" in m)]
            for ratio in args.ratios:
                for method in methods:
                    method_row(rows, short, loaded, table, kind, method, ratio, args.data_dir, args.smoke, calibration,
                               args.heal)
                write_outputs(path)
            del loaded
    write_outputs(path)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
