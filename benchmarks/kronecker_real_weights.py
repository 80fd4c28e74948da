"""Kronecker (Van Loan-Pitsianis) against truncated SVD at half the parameters, on real weights.

Protocol: each matrix ``W (out, in)`` of the 48 GPT-2 small attention matrices and the 36
all-MiniLM-L6-v2 linear weights is approximated with at most half its parameters (+8): Kronecker
with ``(m/2, n/2) x (2, 2)`` at rank 2 and with ``(m/2, n) x (2, 1)`` at rank 1, and truncated SVD
at rank ``floor(m*n/2 / (m+n))``. Reported: relative Frobenius error ``||W - W~||_F / ||W||_F``
and the wall time of each decomposition (float32 in, float64 SVD, one thread).

Run: ``python benchmarks/kronecker_real_weights.py [--data-dir ../shared/data]``.
Writes ``benchmarks/results/kronecker_real_weights.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from tensorlm.decompose.kronecker import nearest_kronecker
from tensorlm.decompose.lowrank import truncated_svd
from tensorlm.pipeline import machine

HERE = Path(__file__).parent
SHAPES = {"kron (m/2,n/2)x(2,2) r2": lambda m, n: ((m // 2, n // 2), (2, 2), 2),
          "kron (m/2,n)x(2,1) r1": lambda m, n: ((m // 2, n), (2, 1), 1)}


def timed(fn, *args):
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def measure(weights: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name, w in weights.items():
        m, n = w.shape
        row = {"matrix": name, "shape": [m, n], "dense_params": m * n}
        for label, shape in SHAPES.items():
            a_shape, b_shape, rank = shape(m, n)
            factors, seconds = timed(nearest_kronecker, w, a_shape, b_shape, rank)
            row[label] = {"rel_error": factors.rel_error, "seconds": seconds,
                          "params": rank * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])}
        rank = (m * n // 2) // (m + n)
        factors, seconds = timed(truncated_svd, w, rank)
        row["svd"] = {"rel_error": factors.rel_error, "seconds": seconds, "params": rank * (m + n), "rank": rank}
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    methods = [*SHAPES, "svd"]
    return {method: {"mean_rel_error": statistics.mean(r[method]["rel_error"] for r in rows),
                     "mean_seconds": statistics.mean(r[method]["seconds"] for r in rows),
                     "mean_params_fraction": statistics.mean(r[method]["params"] / r["dense_params"] for r in rows)}
            for method in methods}


def main() -> None:
    from real_weights import gpt2_attention, minilm_linears  # beside this script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = {"gpt2-small attention (48 x 768x768)": gpt2_attention(args.data_dir),
            "all-MiniLM-L6-v2 linears (36)": minilm_linears()}
    results = {"protocol": __doc__.split("Run:")[0].strip(), "machine": machine() + " (timed with 1 thread)",
               "sets": {}}
    for label, weights in sets.items():
        rows = measure(weights)
        results["sets"][label] = {"summary": summarise(rows), "matrices": rows}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "kronecker_real_weights.json").write_text(json.dumps(results, indent=2))
    lines = ["# Kronecker vs truncated SVD at half the parameters, real weights", "",
             results["protocol"], "", f"Machine: {results['machine']}.", "",
             "| weights | method | params / dense | mean rel. Frobenius error | mean seconds |",
             "|---|---|---:|---:|---:|"]
    for label, block in results["sets"].items():
        for method, s in block["summary"].items():
            lines.append(f"| {label} | {method} | {s['mean_params_fraction']:.4f} | {s['mean_rel_error']:.4f} | "
                         f"{s['mean_seconds']:.3f} |")
    (out / "kronecker_real_weights.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
