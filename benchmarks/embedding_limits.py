"""What limits the frequency-split token table: which side of the tied table, and which tokens, lose perplexity.

``benchmarks/embeddings.py`` finds the best training-free table to be ``svd-frequency-whitened-split-2m``
(``lowrank_embedding`` with ``dense_rows``: the ``V / (2 rho)`` most frequent tokens' rows kept exactly, the
others a frequency-whitened truncated SVD; tokens counted on 4,096 x 512 tokens of ``lm_text``). This script
builds that table for each model and target ratio ``rho`` exactly as the sweep does, then scores the model with
the reconstructed table ``E~`` on each side of the tie in turn:

* ``dense``: ``E`` on both sides (the uncompressed model);
* ``both``: ``E~`` for the lookups and the head (the compressed model the sweep measures);
* ``lookup``: ``E~`` for the lookups, the dense ``E`` as an untied head;
* ``head``: the dense ``E`` for the lookups, ``E~`` as an untied head;
* ``healed``: ``both`` after healing the table alone by the KL of its tied head (``tensorlm.heal.embedding``,
  ``embedding_head: kl``: Adam on the table's factors and dense rows against the dense model's softmax at its
  cached head inputs, plus the frequency-weighted lookup error, on the calibration text below, 1/8 held out for
  early stopping: ``HEAL_KL``), with its wall seconds; only for ``--heal`` ratios.

Per configuration: ``wt2-16k`` perplexity (the first 16,384 tokens of WikiText-2 raw test, sliding windows of
1024, stride 512, token-level, as the sweep) and, over the same scored tokens, the mean NLL (nats) of the
targets whose row is kept dense and of those whose row is factored, the share of factored targets, and the mean
probability the model gives the factored rows. Calibration: as the sweep (``lm_text`` training blocks); no test
text is seen before scoring. Gemma's ``embed_scale`` stays on the lookups.

Run: ``python benchmarks/embedding_limits.py [--models smollm2 gemma3] [--ratios 2 3.3 5 10] [--heal 3.3 10]``
(resumable: the rows already in ``results/embedding_limits.json`` are kept); ``--render-only`` rewrites the
Markdown and PNG.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import embeddings
import torch
import torch.nn.functional as F
from embeddings import (
    CAUSAL_CALIBRATION,
    MODELS,
    RESULTS,
    Rows,
    heal_table,
    log,
    method_recipe,
    method_stage,
    save_figure,
    stamp,
)
from torch import nn

from tensorlm import compress, load_model
from tensorlm.data import load_wikitext2_test
from tensorlm.evaluate.perplexity import causal_logits, sliding_windows
from tensorlm.evaluate.runtime import inference
from tensorlm.heal import ReconstructConfig
from tensorlm.layers.base import RECONSTRUCTED, forward_all
from tensorlm.pipeline import machine
from tensorlm.surgery import calibrate, plan_recipe

METHOD = "svd-frequency-whitened-split-2m"
SIDES = ("dense", "both", "lookup", "head", "healed")
HEAL_KL = ReconstructConfig(batch_size=4, embedding_steps=200, embedding_lr=1e-4, eval_every=20, patience=3,
                            embedding_head="kl", time_budget_s=1800.0)  # lr 1e-3 raised SmolLM2's held-out KL
TOKENS, CONTEXT, STRIDE = 16_384, 1024, 512  # wt2-16k


class LimitRows(Rows):
    """``results/embedding_limits.json``: rows keyed by ``(model, target_ratio, side)``."""

    @staticmethod
    def key(row: dict) -> tuple:
        return row["model"], row["target_ratio"], row["side"]

    def find(self, model: str, ratio: float, side: str) -> dict | None:
        return next((r for r in self.data["rows"] if self.key(r) == (model, ratio, side)), None)


def split_model(loaded, table: str, ratio: float, data_dir):
    """``(small, recipe, E~ (V, d), factored rows (V,) bool, stage options)`` of ``METHOD`` at ``ratio``."""
    dense = loaded.model.get_submodule(table)
    stage = method_stage(METHOD, table, dense.num_embeddings, dense.embedding_dim, ratio, "causal-lm", dense.weight)
    recipe = method_recipe("limits", METHOD, ratio, stage, CAUSAL_CALIBRATION)
    plan = plan_recipe(loaded.model, recipe)
    stats = calibrate(loaded.model, recipe, plan, loaded.tokenizer, "causal-lm", data_dir, progress=False)
    small = compress(loaded.model, recipe, plan=plan, stats=stats, progress=False)
    layer = small.get_submodule(table)
    layer = getattr(layer, "embedding", layer)  # the LowRankEmbedding inside Gemma's scaled table
    return small, recipe, layer.to_dense().weight.detach(), layer.slot >= layer.dense_rows, stage["options"]


def score(model: nn.Module, ids: torch.Tensor, factored: torch.Tensor, context: int = CONTEXT,
          stride: int = STRIDE) -> dict:
    """Sliding-window perplexity of ``model`` on ``ids (N,)`` (:func:`tensorlm.evaluate.perplexity`'s windows),
    and the NLL split by whether the target's row is ``factored (V,)``, with the mean probability on those rows."""
    nll, targets, mass = [], [], []
    with inference(model):
        for begin, end, n_scored in sliding_windows(ids.numel(), context, stride):
            logits = causal_logits(model, ids[None, begin:end], keep=n_scored + 1)[0, :n_scored].float()  # (n, V)
            target = ids[end - n_scored : end]  # (n,)
            nll.append(F.cross_entropy(logits, target, reduction="none"))
            mass.append(logits.softmax(-1)[:, factored].sum(-1))
            targets.append(target)
    nll, rare = torch.cat(nll), factored[torch.cat(targets)]  # (n,), (n,)
    return {"wikitext2_ppl": math.exp(nll.mean().item()), "scored": nll.numel(),
            "factored_share": rare.float().mean().item(), "nll_factored": nll[rare].mean().item(),
            "nll_dense_rows": nll[~rare].mean().item(), "factored_mass": torch.cat(mass).mean().item()}


def set_sides(model: nn.Module, table: str, lookup: torch.Tensor, head: torch.Tensor) -> None:
    """Untie ``model``'s head: ``lookup (V, d)`` for the input table, ``head (V, d)`` for the output."""
    model.get_submodule(table).weight = nn.Parameter(lookup, requires_grad=False)
    model.get_output_embeddings().weight = nn.Parameter(head, requires_grad=False)


def sides(ratio: float, healed: list[float]) -> tuple[str, ...]:
    """The sides measured at ``ratio``: ``healed`` only at the ratios ``--heal`` names."""
    return SIDES if ratio in healed else SIDES[:-1]


def model_rows(rows: LimitRows, short: str, ratios: list[float], healed: list[float], data_dir) -> None:
    """Every side of every ratio of ``short`` that ``rows`` lacks (``healed`` only at those ratios), written as
    each is measured."""
    if all(rows.find(short, ratio, side) for ratio in ratios for side in sides(ratio, healed)):
        return
    name, table, _ = MODELS[short]
    loaded = load_model(name, data_dir=data_dir)
    model = loaded.model
    ids = torch.tensor(loaded.tokenizer(load_wikitext2_test(data_dir), verbose=False)["input_ids"][:TOKENS])
    dense = model.get_submodule(table).weight.detach().clone()  # (V, d)
    for ratio in ratios:
        if all(rows.find(short, ratio, side) for side in sides(ratio, healed)):
            continue
        start = time.perf_counter()
        small, recipe, approx, factored, options = split_model(loaded, table, ratio, data_dir)
        log(f"{short} {ratio:g}x: {options}, {int(factored.sum()):,} factored rows")
        tables = {"dense": (dense, dense), "both": (approx, approx), "lookup": (approx, dense), "head": (dense, approx)}
        for side in sides(ratio, healed):
            if rows.find(short, ratio, side):
                continue
            extra = {}
            if side == "healed":  # the teacher dense on both sides again, then the table healed against it
                set_sides(model, table, dense, dense)
                extra["heal"] = heal_table(small, loaded, recipe, "causal-lm", data_dir, False, config=HEAL_KL)
                with forward_all(small, RECONSTRUCTED):
                    scores = score(small, ids, factored)
            else:
                set_sides(model, table, *tables[side])
                scores = score(model, ids, factored)
            row = {"model": short, "target_ratio": ratio, "side": side, "method": METHOD, "options": options,
                   **scores, **extra, "seconds": round(time.perf_counter() - start, 1), **stamp()}
            rows.put(row)
            write_outputs(rows.path)
            log(f"{short} {ratio:g}x {side}: ppl {row['wikitext2_ppl']:.2f}, NLL factored {row['nll_factored']:.3f} "
                f"dense rows {row['nll_dense_rows']:.3f}")
            start = time.perf_counter()
        set_sides(model, table, dense, dense)
        model.get_output_embeddings().weight = model.get_submodule(table).weight  # tied again for the next build
    del loaded, model


def render(data: dict) -> str:
    lines = ["# What limits the frequency-split table: lookup or head, rare or frequent targets", "",
             data["protocol"], "", f"Machine: {data['machine']}.", "",
             "| model | target | side | wt2-16k ppl | x dense | factored targets | NLL factored targets | "
             "NLL dense-row targets | p on factored rows | load avg |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(data["rows"], key=lambda r: (r["model"], r["target_ratio"], SIDES.index(r["side"])))
    for r in rows:
        dense = next((d for d in rows if d["model"] == r["model"] and d["target_ratio"] == r["target_ratio"]
                      and d["side"] == "dense"), None)
        versus = f"{r['wikitext2_ppl'] / dense['wikitext2_ppl']:.3f}" if dense else "-"
        lines.append(f"| {r['model']} | {r['target_ratio']:g}x | {r['side']} | {r['wikitext2_ppl']:,.2f} | {versus} | "
                     f"{r['factored_share']:.3f} | {r['nll_factored']:.3f} | {r['nll_dense_rows']:.3f} | "
                     f"{r['factored_mass']:.4f} | {r['load_average']} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    """Per model: perplexity of each side against the ratio (left), NLL of factored and dense-row targets (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    colors = dict(zip(SIDES, plt.cm.tab10.colors, strict=False))  # one colour per side in both panels
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for (left, right), model in zip(axes, models, strict=True):
        mine = [r for r in data["rows"] if r["model"] == model]
        for side in SIDES:
            pts = sorted((r["target_ratio"], r["wikitext2_ppl"]) for r in mine if r["side"] == side)
            if not pts:
                continue
            left.plot(*zip(*pts, strict=True), marker="o", label=side, color=colors[side],
                      ls="--" if side == "dense" else "-")
            for key, style, which in (("nll_factored", "-", "factored"), ("nll_dense_rows", ":", "dense-row")):
                pts = sorted((r["target_ratio"], r[key]) for r in mine if r["side"] == side)
                right.plot(*zip(*pts, strict=True), marker="o", ls=style, color=colors[side],
                           label=f"{side}: {which} targets")
        ratios = sorted({r["target_ratio"] for r in mine})
        left.set(yscale="log", ylabel="wt2-16k perplexity (log)", title=f"{model}: the split table on each side")
        left.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))  # 20, 30, 50, 100 ...
        left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        right.set(ylabel="mean NLL per target token (nats)", title=f"{model}: NLL by the target's row")
        for ax in (left, right):
            ax.set_xscale("log")
            ax.set_xticks(ratios, [f"{x:g}x" for x in ratios])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("target embedding ratio")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path, dpi=100)


def write_outputs(path: Path) -> None:
    embeddings.write_outputs(path, render, plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=["smollm2", "gemma3"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0, 3.3, 5.0, 10.0])
    parser.add_argument("--heal", nargs="*", type=float, default=[3.3, 10.0],
                        help="the ratios that also get the healed side")
    parser.add_argument("--out", type=Path, default=RESULTS / "embedding_limits.json")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not args.render_only:
        rows = LimitRows(args.out, {"protocol": __doc__.split("Run:")[0].strip(), "machine": machine(load=False)})
        for short in args.models:
            model_rows(rows, short, args.ratios, args.heal, args.data_dir)
    write_outputs(args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
