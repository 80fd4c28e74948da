"""Data-aware compression: whitened SVD (uniform and allocated ranks) and the data-aware Kronecker sum,
against the data-blind methods at the same budgets, training-free.

SmolLM2-135M protocol: as ``benchmarks/causal_lm.py`` (``wt2-16k`` perplexity: the first 16,384 tokens of
WikiText-2 raw test, sliding windows of 1024, stride 512, token-level; LAMBADA accuracy on the first 1,000
passages; teacher KL on held-out ``lm_text``). The dense model and the data-blind rows ``svd`` at mlp
90/80/50% and ``kronecker`` at mlp 50% are the rows of ``results/causal_lm.json``: the same code, harness,
protocol and machine, measured earlier; this script reads those and measures every other row. Calibration: 32
x 512 tokens of ``lm_text`` training blocks (never a test split). all-MiniLM-L6-v2: FFNs at half their
parameters, STS-B and SICK-R test Spearman, calibrated on 1,024 training sentences (``lm_text`` sentences and
STS-B/SICK train pairs), dense measured in this run. ``*-allocated`` rows spend one budget across their
targets (stage ``budget``); for ``kronecker`` the number of terms of each matrix at the factor shapes
``KRON_TERMS`` (at mlp 50%) or with 4 x 4 ``B`` factors (``B4_A_SHAPES``; the data-aware rows at whole -10%
and mlp 90%) (whitened: one ALS sweep), ``-fisher`` weighting the losses by the output Fisher; ``*-terms``:
their uniform twins, 92 terms in every MLP matrix (49.9% of its values). Rows with ``forward: reconstructed``
were evaluated through each factored layer's cached dense reconstruction (the same function, at dense speed;
earlier rows ran the factored forward). ``*-ridge0``: data-aware Kronecker rows measured before
``weighted_kronecker`` damped ``G`` (``ridge: 0``), kept beside their reruns for comparison. The
``kronecker``, ``kronecker-whitened`` and ``kronecker-whitened-permuted`` rows at mlp 90/80% and whole
-10/-20/-30% are uniform Kronecker sums with 4 x 4 ``B`` factors (``B4_BUDGETS``; at mlp 50%: 2 x 2, rank 2,
``KRON``); ``-permuted``: row and column permutations searched first (at most 2 rounds or 5 s per matrix), the
permuted ``G`` whitened.

Run: ``python benchmarks/calibrated.py`` (resumable; rows are written as they finish, in the order of
``smollm2_rows``, or ``--rows NAME ...`` in the order given; ``--full NAME ...`` adds ``wt2-full`` to measured
rows). ``--render-only`` rewrites the Markdown and PNG from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from causal_lm import MODEL, Rows, compress_row, log, measure

from tensorlm import count_parameters, load_model
from tensorlm.data import load_wikitext2_test
from tensorlm.evaluate import evaluate_model
from tensorlm.evaluate.perplexity import perplexity
from tensorlm.layers.base import RECONSTRUCTED, set_forward_all
from tensorlm.pipeline import machine
from tensorlm.recipe import Recipe

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ATTN_MLP = "re:model\\.layers\\.\\d+\\.(self_attn\\.(q|k|v|o)|mlp\\.(gate|up|down))_proj"
MLP = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj"
KRON = {"1536x576": {"a_shape": [768, 288], "b_shape": [2, 2], "rank": 2},
        "576x1536": {"a_shape": [288, 768], "b_shape": [2, 2], "rank": 2}}
# budget-allocated Kronecker sums: B large enough that a rank step is 0.5-0.8% of a matrix, n1 and n2 small
# enough that one ALS sweep stays cheap (its Cholesky factors are (rank n1)^2 and (rank n2)^2)
KRON_TERMS = {"1536x576": {"a_shape": [96, 48], "b_shape": [16, 12]},
              "576x1536": {"a_shape": [96, 48], "b_shape": [6, 32]},
              "576x576": {"a_shape": [48, 48], "b_shape": [12, 12]},
              "192x576": {"a_shape": [16, 48], "b_shape": [12, 12]}}
CALIBRATION = {"samples": 32, "length": 512, "seed": 0}
# uniform Kronecker sums with 4 x 4 B factors (TQCompressor's shapes; the permutation search takes B sides of
# 1, 2 or 4): every targeted matrix is 16 terms at full size, so t terms keep t/16 of its values
B4_A_SHAPES = {"1536x576": [384, 144], "576x1536": [144, 384], "576x576": [144, 144], "192x576": [48, 144]}
B4_BUDGETS = [("mlp 90%", MLP, {"1536x576": 14, "576x1536": 15}),  # 43/48 = 89.6% of the MLP values
              ("mlp 80%", MLP, {"1536x576": 13, "576x1536": 12}),  # 38/48 = 79.2%
              ("whole -10%", ATTN_MLP, {"*": 14}),  # 87.5% of the 210 matrices' values: -9.9% of the model
              ("whole -20%", ATTN_MLP, {"*": 12}),  # 75.0%: -19.7%
              ("whole -30%", ATTN_MLP, {"*": 10})]  # 62.5%: -29.6%
# the share of the 210 attention and MLP parameters (106,168,320) that leaves the whole model 10/20/30% smaller
WHOLE = {"-10%": 0.8733, "-20%": 0.7466, "-30%": 0.6199}


def stage(method: str, targets: list[str], options: dict, budget: dict | None = None) -> dict:
    out = {"name": "s", "method": method, "targets": targets, "options": options}
    return {**out, "budget": budget} if budget else out


def smollm2_rows() -> list[tuple[str, str, Recipe]]:
    """``(method, budget, recipe)`` of every calibrated SmolLM2 row, most informative first."""
    rows = [("svd-whitened-allocated", f"whole {cut}", stage("lowrank", [ATTN_MLP], {"ratio": keep, "calibration":
                                                                                      "whitened"}, {"ratio": keep}))
            for cut, keep in WHOLE.items()]
    fisher = [("svd-whitened-allocated-fisher", f"whole {cut}", stage(
        "lowrank", [ATTN_MLP], {"ratio": keep, "calibration": "whitened"}, {"ratio": keep, "sensitivity": "fisher"}))
        for cut, keep in WHOLE.items()]
    rows = [fisher[0], rows[0], *fisher[1:], *rows[1:]]  # Fisher at -20/-30%: SVD-LLM V2's comparison
    rows.insert(4, ("svd-whitened", "mlp 80%", stage("lowrank", [MLP], {"ratio": 0.8, "calibration": "whitened"})))
    rows.insert(5, ("kronecker-whitened", "mlp 50%", stage("kronecker", [MLP], {"shapes": KRON,
                                                                                "calibration": "whitened"})))
    for share in (0.9, 0.5):
        rows.append(("svd-whitened", f"mlp {share:.0%}", stage("lowrank", [MLP], {"ratio": share,
                                                                                  "calibration": "whitened"})))
    for share in (0.9, 0.8, 0.5):
        rows.append(("svd-whitened-allocated", f"mlp {share:.0%}",
                     stage("lowrank", [MLP], {"ratio": share, "calibration": "whitened"}, {"ratio": share})))
    rows.append(("kronecker-whitened-permuted", "mlp 50%",
                 stage("kronecker", [MLP], {"shapes": KRON, "calibration": "whitened",
                                            "permute": {"time_budget_s": 5, "max_rounds": 2}})))
    whitened = {"calibration": "whitened", "als_sweeps": 1}
    shapes = {k: {**v, "rank": 1} for k, v in KRON_TERMS.items()}

    b4 = {k: {"a_shape": a, "b_shape": [4, 4], "rank": 1} for k, a in B4_A_SHAPES.items()}

    def kron(method, budget, target, keep, options, sensitivity=None, factors=shapes):
        return (method, budget, stage("kronecker", [target], {"shapes": factors, **options},
                                      {"ratio": keep, **({"sensitivity": sensitivity} if sensitivity else {})}))

    uniform = {k: {**v, "rank": 92} for k, v in KRON_TERMS.items() if k in ("1536x576", "576x1536")}  # 49.9%
    rows += [("kronecker-terms", "mlp 50%", stage("kronecker", [MLP], {"shapes": uniform})),
             ("kronecker-whitened-terms", "mlp 50%", stage("kronecker", [MLP], {"shapes": uniform, **whitened}))]
    rows += [kron("kronecker-whitened-allocated", "mlp 50%", MLP, 0.5, whitened),
             kron("kronecker-whitened-allocated-fisher", "mlp 50%", MLP, 0.5, whitened, "fisher"),
             kron("kronecker-allocated", "mlp 50%", MLP, 0.5, {}),
             kron("kronecker-allocated", "whole -10%", ATTN_MLP, WHOLE["-10%"], {}),
             ("svd", "whole -10%", stage("lowrank", [ATTN_MLP], {"ratio": WHOLE["-10%"]})),
             ("svd-whitened", "whole -10%", stage("lowrank", [ATTN_MLP], {"ratio": WHOLE["-10%"],
                                                                         "calibration": "whitened"})),
             kron("kronecker-whitened-allocated-fisher", "whole -10%", ATTN_MLP, WHOLE["-10%"], whitened, "fisher",
                  b4),
             kron("kronecker-whitened-allocated", "mlp 90%", MLP, 0.9, whitened, factors=b4)]
    for cut in ("-20%", "-30%"):
        rows += [("svd", f"whole {cut}", stage("lowrank", [ATTN_MLP], {"ratio": WHOLE[cut]})),
                 ("svd-whitened", f"whole {cut}", stage("lowrank", [ATTN_MLP], {"ratio": WHOLE[cut],
                                                                              "calibration": "whitened"})),
                 kron("kronecker-allocated", f"whole {cut}", ATTN_MLP, WHOLE[cut], {})]
    rows += [kron("kronecker-allocated", f"mlp {share:.0%}", MLP, share, {}) for share in (0.9, 0.8)]
    for budget, target, terms in B4_BUDGETS:
        shapes = {k: {"a_shape": a, "b_shape": [4, 4], "rank": terms.get(k, terms.get("*"))}
                  for k, a in B4_A_SHAPES.items() if k in terms or "*" in terms}
        rows += [("kronecker", budget, stage("kronecker", [target], {"shapes": shapes})),
                 ("kronecker-whitened", budget, stage("kronecker", [target], {"shapes": shapes,
                                                                              "calibration": "whitened"})),
                 ("kronecker-whitened-permuted", budget, stage("kronecker", [target], {
                     "shapes": shapes, "calibration": "whitened", "permute": {"time_budget_s": 5, "max_rounds": 2,
                                                                              "seed": 0}}))]
    return [(m, b, Recipe.from_dict({"name": f"{m} {b}", "calibration": CALIBRATION, "stages": [s]}))
            for m, b, s in rows]


def data_blind_rows(causal: dict) -> list[dict]:
    """The dense and data-blind SmolLM2 rows of ``causal_lm.json``, renamed into this benchmark's schema."""
    named = {"dense": ("dense", "-"), "smollm2-lowrank-mlp-90": ("svd", "mlp 90%"),
             "smollm2-lowrank-mlp-80": ("svd", "mlp 80%"), "smollm2-lowrank-mlp-50": ("svd", "mlp 50%"),
             "smollm2-kronecker-mlp-50": ("kronecker", "mlp 50%")}
    return [{**r, "model": MODEL, "method": named[r["recipe"]][0], "budget": named[r["recipe"]][1],
             "source": "causal_lm.json"} for r in causal["rows"] if r["recipe"] in named]


def run_smollm2(rows: Rows, data_dir, limit: int | None, names: list[str] | None = None) -> None:
    """Measure the SmolLM2 rows not yet in ``rows``: the first ``limit``, or those named, in the order given."""
    recipes = {recipe.name: (method, budget, recipe) for method, budget, recipe in smollm2_rows()}
    if names:
        unknown = [n for n in names if n not in recipes]
        if unknown:
            raise SystemExit(f"calibrated.py: no SmolLM2 row named {unknown}; rows: {sorted(recipes)}")
    loaded = load_model(MODEL, data_dir=data_dir)
    for method, budget, recipe in [recipes[n] for n in names] if names else smollm2_rows()[:limit]:
        if rows.get(recipe.name) is None:
            log(f"{recipe.name}: calibrating and compressing")
            small, fields = compress_row(loaded, recipe, data_dir)
            log(f"{recipe.name}: {fields['params']:,} params; measuring")
            set_forward_all(small, RECONSTRUCTED)  # the same function at dense speed (a rank-185 sum is 17x dense)
            metrics = measure(small, loaded.model, loaded.tokenizer, data_dir)
            rows.put({"recipe": recipe.name, "model": MODEL, "method": method, "budget": budget, **fields,
                      **metrics, "forward": RECONSTRUCTED})
            log(f"{recipe.name}: wt2-16k {metrics['wikitext2_ppl']:.2f}, LAMBADA {metrics['lambada_acc']:.3f}")


def run_full(rows: Rows, data_dir, names: list[str]) -> None:
    """``wt2-full`` (all of WikiText-2 raw test, same windows) of the named SmolLM2 rows already measured,
    compressed again (the same recipe, calibration cache and parameter count), under the row's ``full``."""
    recipes = {recipe.name: recipe for _, _, recipe in smollm2_rows()}
    missing = [n for n in names if n not in recipes or rows.get(n) is None]
    if missing:
        raise SystemExit(f"calibrated.py: --full needs rows measured first; not in the JSON: {missing}")
    loaded = load_model(MODEL, data_dir=data_dir)
    for name in names:
        row = rows.get(name)
        if "full" in row:
            continue
        log(f"{name}: compressing again for wt2-full")
        small, fields = compress_row(loaded, recipes[name], data_dir)
        assert fields["params"] == row["params"], "the same recipe gives the same model"
        set_forward_all(small, RECONSTRUCTED)
        result = perplexity(small, loaded.tokenizer, load_wikitext2_test(data_dir),
                            name="wt2-full: wikitext-2-raw test")
        rows.put({**row, "full": {"wikitext2_ppl": result["perplexity"],
                                  "protocols": {"wikitext2_ppl": result["protocol"]}, "machine": machine()}})
        log(f"{name}: wt2-full {result['perplexity']:.2f}")


def run_minilm(rows: Rows, data_dir) -> None:
    """all-MiniLM-L6-v2 FFNs at half their parameters: plain and calibrated, STS-B and SICK-R test."""
    loaded = load_model("all-MiniLM-L6-v2")
    ffn = ["re:encoder\\.layer\\.\\d+\\.intermediate\\.dense", "re:encoder\\.layer\\.\\d+\\.output\\.dense"]
    kron = {"1536x384": {"a_shape": [768, 192], "b_shape": [2, 2], "rank": 2},
            "384x1536": {"a_shape": [192, 768], "b_shape": [2, 2], "rank": 2}}
    variants = [("dense", None), ("svd", stage("lowrank", ffn, {"rank": 153})),
                ("svd-whitened", stage("lowrank", ffn, {"rank": 153, "calibration": "whitened"})),
                ("svd-whitened-allocated", stage("lowrank", ffn, {"rank": 153, "calibration": "whitened"},
                                                 {"ratio": 0.498})),
                ("kronecker", stage("kronecker", ffn, {"shapes": kron})),
                ("kronecker-whitened", stage("kronecker", ffn, {"shapes": kron, "calibration": "whitened"})),
                ("kronecker-whitened-permuted", stage("kronecker", ffn, {"shapes": kron, "calibration": "whitened",
                                                                         "permute": {"time_budget_s": 5,
                                                                                     "max_rounds": 2}}))]
    for method, spec in variants:
        name = f"minilm {method}"
        if rows.get(name) is not None:
            continue
        log(f"{name}: compressing and measuring")
        small, fields = loaded.model, {"params": count_parameters(loaded.model)["total"]}
        if spec is not None:
            recipe = Recipe.from_dict({"name": name, "calibration": {"samples": 1024, "length": 128}, "stages": [spec]})
            small, fields = compress_row(loaded, recipe, data_dir, kind="encoder")
        metrics, protocols = evaluate_model(small, loaded.tokenizer, "encoder", data_dir=data_dir)
        rows.put({"recipe": name, "model": "all-MiniLM-L6-v2", "method": method, "budget": "ffn 50%", **fields,
                  "stsb": metrics["stsb_spearman"], "sickr": metrics["sickr_spearman"], "protocols": protocols})


def render(data: dict, causal: dict) -> str:
    rows = data_blind_rows(causal) + data["rows"]
    smol = [r for r in rows if r["model"] == MODEL]
    dense = next(r for r in smol if r["method"] == "dense")
    lines = ["# Data-aware compression, training-free", "", data["protocol"], "", f"Machine: {data['machine']}.", "",
             "## SmolLM2-135M", "",
             "| method | budget | params | wt2-16k ppl | x dense | LAMBADA acc | teacher KL | calibrate s | "
             "decompose s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(smol, key=lambda r: (r["method"] != "dense", -r["params"], r["method"])):
        lines.append(f"| {r['method']} | {r['budget']} | {r['params']:,} | {r['wikitext2_ppl']:,.2f} | "
                     f"{r['wikitext2_ppl'] / dense['wikitext2_ppl']:,.2f} | {r['lambada_acc']:.3f} | "
                     f"{r['teacher_kl']:.3f} | {r.get('calibrate_seconds', 0):.0f} | "
                     f"{r.get('compress_seconds', 0):.0f} |")
    full = [r for r in smol if "wikitext2_ppl" in r.get("full", {})]
    if full:
        scored = dense["full"]["protocols"]["wikitext2_ppl"].split("token-level, ")[-1]
        lines += ["", f"On `wt2-full` (the whole WikiText-2 raw test, {scored}, the same windows): dense "
                  f"{dense['full']['wikitext2_ppl']:.2f} (causal_lm.json); "
                  + "; ".join(f"{r['method']} {r['budget']} {r['full']['wikitext2_ppl']:.2f} "
                              f"({r['full']['wikitext2_ppl'] / dense['full']['wikitext2_ppl']:.2f}x dense)"
                              for r in full if r is not dense) + "."]
    mini = [r for r in rows if r["model"] == "all-MiniLM-L6-v2"]
    if mini:
        lines += ["", "## all-MiniLM-L6-v2, FFNs at half", "", "| method | params | STS-B test | SICK-R test |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['params']:,} | {r['stsb']:.4f} | {r['sickr']:.4f} |" for r in mini]
    return "\n".join(lines) + "\n"


def plot(data: dict, causal: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data_blind_rows(causal) + data["rows"] if r["model"] == MODEL]
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["params"] / 1e6, r["wikitext2_ppl"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="*" if method == "dense" else "o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("WikiText-2 perplexity (wt2-16k, log scale)")
    ax.set_title("SmolLM2-135M, training-free: data-blind vs data-aware")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    parser.add_argument("--limit", type=int, help="measure only the first N SmolLM2 rows")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--rows", nargs="+", help="measure only these SmolLM2 rows (recipe names), in this order")
    parser.add_argument("--full", nargs="+", metavar="NAME",
                        help="add wt2-full to these measured SmolLM2 rows (recipe names), after the other rows")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = RESULTS / "calibrated.json"
    if not args.render_only:
        rows = Rows(path, {"protocol": __doc__.split("Run:")[0].strip(), "machine": machine()})
        if not args.skip_minilm:
            run_minilm(rows, args.data_dir)
        if args.rows or not args.full:
            run_smollm2(rows, args.data_dir, args.limit, args.rows)
        if args.full:
            run_full(rows, args.data_dir, args.full)
    data = json.loads(path.read_text())
    causal = json.loads((RESULTS / "causal_lm.json").read_text())
    (RESULTS / "calibrated.md").write_text(render(data, causal))
    plot(data, causal, RESULTS / "calibrated.png")
    print(render(data, causal))


if __name__ == "__main__":
    main()
