"""Forward latency of all-MiniLM-L6-v2 compressed by each MiniLM recipe, against the dense model in the same run.

Protocol: ``tensorlm.evaluate.speed.forward_latency`` (median wall-clock seconds per forward of
random token ids, eval mode, no_grad) at batch 32 x 128 tokens (5 repeats after 2 warm-ups) and
1 x 128 (20 repeats after 3 warm-ups), float32, on this machine's CPU with the thread count
given; the compressed models come from ``tensorlm.compress`` (no training, which does not change
latency). Parameters are unique tensors.

Run: ``python benchmarks/model_latency.py [--threads 2]``.
Writes ``benchmarks/results/model_latency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tensorlm import compress, count_parameters, load_model
from tensorlm.evaluate.speed import forward_latency
from tensorlm.pipeline import machine

HERE = Path(__file__).parent
RECIPES = ["minilm-kronecker-ffn", "minilm-lowrank-ffn", "tensorgpt-minilm", "tucker-bank-1x7", "tucker-bank-1x48"]
SHAPES = {"32x128": (32, 128, 5, 2), "1x128": (1, 128, 20, 3)}


def measure(model) -> dict:
    return {label: forward_latency(model, b, t, repeats=r, warmup=w)["median_s"]
            for label, (b, t, r, w) in SHAPES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_model("all-MiniLM-L6-v2").model
    rows = [{"model": "dense", "params": count_parameters(dense)["total"], **measure(dense)}]
    for recipe in RECIPES:
        small = compress(dense, recipe, progress=False)
        rows.append({"model": recipe, "params": count_parameters(small)["total"], **measure(small)})
    results = {"protocol": __doc__.split("Run:")[0].strip(), "machine": machine(), "rows": rows}
    out = HERE / "results"
    (out / "model_latency.json").write_text(json.dumps(results, indent=2))
    base = rows[0]
    lines = ["# Forward latency of the compressed all-MiniLM-L6-v2 models (CPU)", "", results["protocol"], "",
             f"Machine: {results['machine']}.", "",
             "| model | params | 32x128 s | vs dense | 1x128 ms | vs dense |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['32x128']:.3f} | {r['32x128'] / base['32x128']:.2f}x | "
                     f"{1000 * r['1x128']:.1f} | {r['1x128'] / base['1x128']:.2f}x |")
    (out / "model_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
