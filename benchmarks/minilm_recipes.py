"""The main job on all-MiniLM-L6-v2 for each MiniLM recipe, side by side, no training.

Protocol: ``tensorlm.pipeline.run`` (the same code as ``tensorlm run``) with full evaluation: STS-B
test (1,379 pairs) and SICK-R test (4,927 pairs) Spearman of mean-pooled last hidden states, cosine,
as a fraction; the uncompressed model is measured in the same run; no training.

Run: ``python benchmarks/minilm_recipes.py [--data-dir ../shared/data] [--recipes a b ...]``.
Writes ``benchmarks/results/minilm_recipes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from tensorlm.pipeline import machine, run

HERE = Path(__file__).parent
RECIPES = ["minilm-kronecker-ffn", "minilm-lowrank-ffn", "tensorgpt-minilm", "tucker-bank-1x7", "tucker-bank-1x48"]


def render(results: dict) -> str:
    """The Markdown table of a results dictionary (as written to ``minilm_recipes.json``)."""
    rows = results["runs"]
    base = rows[0]["metrics"]["before"]
    lines = ["# all-MiniLM-L6-v2: recipes side by side (no training)", "", results["protocol"], "",
             f"Machine: {results['machine']}.", "",
             "| model | params (total) | targeted params (before -> after) | STS-B test | SICK-R test | "
             "teacher cosine | compress s |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| uncompressed | {rows[0]['params_before']['total']:,} | - | {base['stsb_spearman']:.4f} | "
             f"{base['sickr_spearman']:.4f} | 1 | - |"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['recipe']} | {r['params_after']['total']:,} | {r['params_before']['targeted']:,} -> "
                     f"{r['params_after']['targeted']:,} | {m['after']['stsb_spearman']:.4f} | "
                     f"{m['after']['sickr_spearman']:.4f} | {m['agreement']['teacher_cosine']:.4f} | "
                     f"{r['seconds']['compress']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    out = HERE / "results"
    if not args.render_only:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for recipe in args.recipes:
                res = run("all-MiniLM-L6-v2", recipe, Path(tmp) / recipe, data_dir=args.data_dir).to_dict()
                rows.append({"recipe": recipe, "params_before": res["params"]["before"],
                             "params_after": res["params"]["after"], "compression": res["compression"],
                             "metrics": res["metrics"], "protocols": res["protocols"], "seconds": res["seconds"]})
        results = {"protocol": __doc__.split("Run:")[0].strip(), "machine": machine(), "runs": rows}
        (out / "minilm_recipes.json").write_text(json.dumps(results, indent=2))
    results = json.loads((out / "minilm_recipes.json").read_text())
    (out / "minilm_recipes.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
