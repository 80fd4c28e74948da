"""SmolLM2-135M: every built-in SmolLM2 recipe, training-free, beside dense and beside truncated SVD at the
same parameter count, in one harness.

Protocol (``tensorlm.evaluate``): ``wt2-16k`` = the first 16,384 tokens of WikiText-2 raw test, sliding
windows of 1024, stride 512, token-level perplexity; LAMBADA (OpenAI test) last-word accuracy on the first
1,000 passages; teacher KL = KL(dense || compressed) in nats per token on held-out ``lm_text`` (the last
2,000 characters of 16 shards, windows of 512). Dense is also measured on ``wt2-4k`` (the ``quick``
protocol, the figure the slow test checks) and, with ``--full``, on ``wt2-full`` (the whole test set) and
all 5,153 LAMBADA passages. The model is SmolLM2-135M-Instruct, GGUF Q4_1 weights dequantized to float32:
the teacher is itself a 4-bit quantization of the released model.

Run: ``python benchmarks/causal_lm.py [--full]`` (resumable: rows already in the JSON are kept; about
6-10 minutes a row on 2 CPU cores). ``--render-only`` rewrites the Markdown and PNG from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from tensorlm import compress, count_parameters, load_model
from tensorlm.allocate import allocate
from tensorlm.data import load_wikitext2_test
from tensorlm.evaluate import CAUSAL_PROTOCOLS, agreement, evaluate_model
from tensorlm.evaluate.generation import greedy_sample
from tensorlm.evaluate.lambada import lambada
from tensorlm.evaluate.perplexity import perplexity
from tensorlm.pipeline import machine
from tensorlm.recipe import Recipe
from tensorlm.surgery import calibrate, match_targets, plan_recipe

HERE = Path(__file__).parent
RESULTS = HERE / "results"
MODEL = "smollm2-135m"
# one row of each method first, then the other budgets
RECIPES = ["smollm2-lowrank-mlp-90", "smollm2-lowrank-mlp-80", "smollm2-kronecker-mlp-50", "smollm2-tensorgpt-3x",
           "smollm2-tq", "smollm2-tucker-bank-1x7", "smollm2-lowrank-mlp-50", "smollm2-tensorgpt-2x",
           "smollm2-tensorgpt-10x"]


class Rows:
    """The benchmark's JSON file: rows keyed by ``recipe``, rewritten atomically after every row."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {**header, "rows": []}

    def get(self, recipe: str) -> dict | None:
        return next((r for r in self.data["rows"] if r["recipe"] == recipe), None)

    def put(self, row: dict) -> None:
        self.data["rows"] = [r for r in self.data["rows"] if r["recipe"] != row["recipe"]] + [row]
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(model, teacher, tokenizer, data_dir, mode: str = "sweep") -> dict:
    """Perplexity, LAMBADA and teacher KL of ``model`` on the ``mode`` protocol (a benchmark row's metrics)."""
    metrics, protocols = evaluate_model(model, tokenizer, "causal-lm", data_dir=data_dir, mode=mode)
    kl, kl_protocol = agreement(model, teacher, tokenizer, "causal-lm", data_dir=data_dir, mode=mode)
    return {"protocol": CAUSAL_PROTOCOLS[mode].name, "wikitext2_ppl": metrics["wikitext2_ppl"],
            "lambada_acc": metrics["lambada_acc"], "lambada_ppl": metrics["lambada_ppl"],
            "teacher_kl": kl["teacher_kl"], "protocols": {**protocols, **kl_protocol},
            "sample": greedy_sample(model, tokenizer)}


def targeted(model, recipe: Recipe) -> list[str]:
    """Top-level module names the recipe's stages replace (matched on the dense model)."""
    names = [n for stage in recipe.stages for n in match_targets(model, stage)]
    return [n for n in names if not any(n.startswith(p + ".") for p in names)]


def compress_row(loaded, recipe: Recipe, data_dir, kind: str = "causal-lm") -> tuple[torch.nn.Module, dict]:
    """Compress the dense model by ``recipe`` (plan, calibrate, allocate, build); the row's parameter fields
    and the seconds of calibration (0 for data-blind recipes) and of the decompositions."""
    plan = plan_recipe(loaded.model, recipe)
    t0 = time.perf_counter()
    stats = calibrate(loaded.model, recipe, plan, loaded.tokenizer, kind, data_dir, progress=False)
    calibrate_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = allocate(loaded.model, plan, recipe, stats)
    small = compress(loaded.model, recipe, plan=plan, stats=stats, progress=False)
    seconds = time.perf_counter() - t0
    names = targeted(loaded.model, recipe)
    before, after = count_parameters(loaded.model, names), count_parameters(small, names)
    assert after["total"] == plan.params_after, "the plan's total is the model's"
    return small, {"params": after["total"], "stored": after["stored"], "targeted_params_before": before["targeted"],
                   "targeted_params_after": after["targeted"], "compress_seconds": seconds,
                   "calibrate_seconds": calibrate_seconds, "calibration_tokens": stats.tokens if stats else 0,
                   "ranks": {e.name: e.ranks for e in plan.entries} if recipe.stages[0].budget else None}


def svd_twin(loaded, recipe: Recipe, params: int) -> Recipe | None:
    """Truncated SVD of the recipe's linear targets at the same whole-model parameter count, or None.

    Embedding stages stay dense, so their savings too are taken from the linear targets (TQ's embedding);
    every linear target keeps the same share of its dense parameters (``rank * (m + n)``). None for a recipe
    without linear targets (TensorGPT: an SVD of the embedding is not a method yet) or of SVD itself.
    """
    linear = [s for s in recipe.stages if s.method in ("kronecker", "tucker_bank")]
    if not linear or any(s.method == "lowrank" for s in recipe.stages):
        return None
    names = [n for s in linear for n in match_targets(loaded.model, s)]
    dense = sum(p.numel() for n in names for p in loaded.model.get_submodule(n).parameters())
    total = count_parameters(loaded.model)["total"]
    ratio = (dense - (total - params)) / dense
    if not 0 < ratio < 1:
        return None
    stages = [{"name": s.name, "method": "lowrank", "targets": [t.to_json() for t in s.targets],
               "options": {"ratio": round(ratio, 6)}} for s in linear]
    return Recipe.from_dict({"name": f"svd@{recipe.name}", "stages": stages,
                             "description": f"truncated SVD of the linear targets of {recipe.name} at its "
                                            f"whole-model parameter count ({ratio:.1%} of their parameters)"})


def svd_row_near(rows: Rows, params: int, tolerance: float = 0.005) -> bool:
    """True when a truncated-SVD row already sits within ``tolerance`` of ``params`` (no twin needed)."""
    return any(abs(r["params"] - params) <= tolerance * params for r in rows.data["rows"]
               if "lowrank" in r["recipe"] or r["recipe"].startswith("svd@"))


def run_rows(rows: Rows, loaded, data_dir, recipes: list[str], twins: bool = True) -> None:
    """Every recipe not yet in ``rows``, then (with ``twins``) the SVD twin of each: compress, measure, write."""
    todo = [Recipe.load(name) for name in recipes]
    if twins:
        todo += [TwinOf(name) for name in recipes]
    for item in todo:
        recipe = item.recipe(loaded, rows) if isinstance(item, TwinOf) else item
        if recipe is None or rows.get(recipe.name) is not None:
            continue
        log(f"{recipe.name}: compressing")
        small, fields = compress_row(loaded, recipe, data_dir)
        log(f"{recipe.name}: {fields['params']:,} params in {fields['compress_seconds']:.0f} s; measuring")
        metrics = measure(small, loaded.model, loaded.tokenizer, data_dir)
        rows.put({"recipe": recipe.name, **fields, **metrics, "description": recipe.description.strip()})
        log(f"{recipe.name}: wt2-16k {metrics['wikitext2_ppl']:.2f}, LAMBADA {metrics['lambada_acc']:.3f}")


class TwinOf:
    """The SVD twin of a recipe, decided once that recipe's row (its parameter count) is in the file."""

    def __init__(self, name: str):
        self.name = name

    def recipe(self, loaded, rows: Rows) -> Recipe | None:
        row = rows.get(self.name)
        if row is None or svd_row_near(rows, row["params"]):
            return None
        return svd_twin(loaded, Recipe.load(self.name), row["params"])


def run_dense(rows: Rows, loaded, data_dir, full: tuple[str, ...] = ()) -> None:
    """The dense row: sweep and quick protocols, and the ``full`` parts asked for (``wt2-full``: the whole
    WikiText-2 test set; ``lambada-full``: all 5,153 LAMBADA passages), each stored as soon as it is measured."""
    row = rows.get("dense") or {"recipe": "dense", "params": count_parameters(loaded.model)["total"]}
    if "wikitext2_ppl" not in row:
        log("dense: sweep protocol")
        row.update(measure(loaded.model, loaded.model, loaded.tokenizer, data_dir))
        rows.put(row)
    if "quick" not in row:
        metrics, protocols = evaluate_model(loaded.model, loaded.tokenizer, "causal-lm", data_dir=data_dir,
                                            mode="quick")
        row["quick"] = {"wikitext2_ppl": metrics["wikitext2_ppl"], "lambada_acc": metrics["lambada_acc"],
                        "protocols": protocols}
        rows.put(row)
    done = row.setdefault("full", {})
    if "wt2-full" in full and "wikitext2_ppl" not in done:
        log("dense: wt2-full (the whole WikiText-2 test set)")
        result = perplexity(loaded.model, loaded.tokenizer, load_wikitext2_test(data_dir),
                            name="wt2-full: wikitext-2-raw test")
        done.update(wikitext2_ppl=result["perplexity"], protocols={"wikitext2_ppl": result["protocol"]})
        rows.put(row)
    if "lambada-full" in full and "lambada_acc" not in done:
        log("dense: all of LAMBADA")
        result = lambada(loaded.model, loaded.tokenizer, data_dir=data_dir, limit=None)
        done.update(lambada_acc=result["accuracy"], lambada_ppl=result["perplexity"])
        done.setdefault("protocols", {})["lambada_acc"] = result["protocol"]
        rows.put(row)


def render(data: dict) -> str:
    """The Markdown table of the JSON."""
    dense = next(r for r in data["rows"] if r["recipe"] == "dense")
    lines = ["# SmolLM2-135M: every recipe, training-free", "", data["protocol"], "",
             f"Machine: {data['machine']}.", "",
             "| recipe | params | vs dense | targeted params (before -> after) | wt2-16k ppl | x dense | "
             "LAMBADA acc | teacher KL | compress s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(data["rows"], key=lambda r: (r["recipe"] != "dense", -r["params"])):
        targets = "-" if r["recipe"] == "dense" else \
            f"{r['targeted_params_before']:,} -> {r['targeted_params_after']:,}"
        seconds = "-" if r["recipe"] == "dense" else f"{r['compress_seconds']:.0f}"
        lines.append(f"| {r['recipe']} | {r['params']:,} | {r['params'] / dense['params']:.3f} | {targets} | "
                     f"{r['wikitext2_ppl']:,.2f} | {r['wikitext2_ppl'] / dense['wikitext2_ppl']:,.1f} | "
                     f"{r['lambada_acc']:.3f} | {r['teacher_kl']:.3f} | {seconds} |")
    lines += ["", f"Dense on `wt2-4k` (the quick protocol): perplexity {dense['quick']['wikitext2_ppl']:.3f}."
              if "quick" in dense else ""]
    full = dense.get("full", {})
    if "wikitext2_ppl" in full:
        lines += [f"Dense on `wt2-full` (the whole test set): perplexity {full['wikitext2_ppl']:.3f}."]
    if "lambada_acc" in full:
        lines += [f"Dense on all 5,153 LAMBADA passages: accuracy {full['lambada_acc']:.4f}, target perplexity "
                  f"{full['lambada_ppl']:.2f}."]
    lines += ["", "Greedy continuations of 'The capital of France is':", ""]
    lines += [f"- {r['recipe']}: {r['sample']!r}" for r in data["rows"] if "sample" in r]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    """Perplexity (log scale) against parameters, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in data["rows"]:
        marker = "*" if r["recipe"] == "dense" else "s" if r["recipe"].startswith("svd@") or "lowrank" in \
            r["recipe"] else "o"
        ax.scatter(r["params"] / 1e6, r["wikitext2_ppl"], marker=marker, s=80 if marker == "*" else 40)
        ax.annotate(r["recipe"].replace("smollm2-", ""), (r["params"] / 1e6, r["wikitext2_ppl"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("WikiText-2 perplexity (wt2-16k, log scale)")
    ax.set_title("SmolLM2-135M, training-free: squares are truncated SVD, the star is dense")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--full", action="store_true",
                        help="dense also on wt2-full (after the recipes, before their SVD twins) and all of LAMBADA "
                             "(last); slow")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = RESULTS / "causal_lm.json"
    if not args.render_only:
        loaded = load_model(MODEL, data_dir=args.data_dir)
        rows = Rows(path, {"protocol": __doc__.split("Run:")[0].strip(), "model": loaded.notes[0],
                           "machine": machine()})
        run_dense(rows, loaded, args.data_dir)
        run_rows(rows, loaded, args.data_dir, args.recipes, twins=False)
        run_dense(rows, loaded, args.data_dir, full=("wt2-full",) if args.full else ())
        run_rows(rows, loaded, args.data_dir, args.recipes)
        run_dense(rows, loaded, args.data_dir, full=("wt2-full", "lambada-full") if args.full else ())
    data = json.loads(path.read_text())
    (RESULTS / "causal_lm.md").write_text(render(data))
    plot(data, RESULTS / "causal_lm.png")
    print(render(data))


if __name__ == "__main__":
    main()
