"""What the TQCompressor permutation search buys on real weights, at half the parameters.

For the 48 GPT-2 small attention matrices and the 36 linear weights of all-MiniLM-L6-v2, at two small-B
shapes with half the dense parameters (``(m/2, n/2) x (2, 2)`` rank 2 and ``(m/2, n) x (2, 1)`` rank 1):
relative Frobenius error of plain Van Loan-Pitsianis, of the permutation search, and of truncated SVD at
the same parameter count (``rank = params // (m + n)``), with the search time per matrix. Then STS-B test
Spearman of all-MiniLM-L6-v2 after the ``minilm-kronecker-ffn`` recipe with and without permutations
(no training).

Usage: ``python benchmarks/permutation_gain.py [--data-dir D] [--time-budget S] [--threads T]``.
Writes ``benchmarks/results/permutation_gain.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_weights import gpt2_attention, minilm_linears  # noqa: E402
from tensorlm.decompose.kronecker import KroneckerShape  # noqa: E402
from tensorlm.decompose.lowrank import truncated_svd  # noqa: E402
from tensorlm.decompose.permutation import search_permutations  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"B(2,2) r2": ((2, 2), 2), "B(2,1) r1": ((2, 1), 1)}


def shape_for(w: torch.Tensor, b_shape: tuple[int, int], rank: int) -> KroneckerShape:
    m, n = w.shape
    return KroneckerShape((m // b_shape[0], n // b_shape[1]), b_shape, rank)


def matrix_rows(family: str, weights: dict[str, torch.Tensor], budget: float) -> list[dict]:
    rows = []
    for name, w in weights.items():
        svd_errors = {}  # rank -> error: both shapes have the same budget, so one SVD per matrix
        for label, (b_shape, rank) in SHAPES.items():
            shape = shape_for(w, b_shape, rank)
            found = search_permutations(w, shape.a_shape, b_shape, rank, seed=0, time_budget_s=budget, name=name)
            svd_rank = shape.params // (w.shape[0] + w.shape[1])
            if svd_rank not in svd_errors:
                svd_errors[svd_rank] = truncated_svd(w, svd_rank).rel_error
            rows.append({
                "family": family, "matrix": name, "shape": list(w.shape), "kronecker": label,
                "a_shape": list(shape.a_shape), "b_shape": list(b_shape), "rank": rank, "params": shape.params,
                "vlp_error": found.baseline_error, "search_error": found.rel_error,
                "svd_rank": svd_rank, "svd_params": svd_rank * (w.shape[0] + w.shape[1]),
                "svd_error": svd_errors[svd_rank],
                "search_seconds": found.seconds, "rounds": len(found.history),
            })
            print(f"{family} {name} {label}: VLP {found.baseline_error:.4f} search {found.rel_error:.4f} "
                  f"SVD {rows[-1]['svd_error']:.4f} ({found.seconds:.1f} s, {len(found.history)} rounds)",
                  flush=True)
    return rows


def sts_effect(data_dir: str | None, budget: float) -> dict:
    from tensorlm import Recipe, compress, load_model
    from tensorlm.evaluate.sts import sts_spearman

    loaded = load_model("all-MiniLM-L6-v2")
    plain = Recipe.load("minilm-kronecker-ffn")
    spec = plain.to_dict()
    for stage in spec["stages"]:
        stage.setdefault("options", {})["permute"] = {"time_budget_s": budget, "seed": 0}
    permuted = Recipe.from_dict(spec)
    out = {"dense": sts_spearman(loaded.model, loaded.tokenizer, data_dir=data_dir, progress=False)}
    for label, recipe in (("kronecker", plain), ("kronecker+permutations", permuted)):
        started = time.perf_counter()
        model = compress(loaded.model, recipe, progress=False)
        seconds = time.perf_counter() - started
        out[label] = sts_spearman(model, loaded.tokenizer, data_dir=data_dir, progress=False)
        out[f"{label} compress seconds"] = seconds
        print(f"STS-B test Spearman {label}: {out[label]:.4f} (compress {seconds:.0f} s)", flush=True)
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for family in ("gpt2", "minilm"):
        for label in SHAPES:
            sel = [r for r in rows if r["family"] == family and r["kronecker"] == label]
            vlp, srch = mean(r["vlp_error"] for r in sel), mean(r["search_error"] for r in sel)
            out.append({"family": family, "kronecker": label, "n": len(sel), "vlp": vlp, "search": srch,
                        "gain": 1 - srch / vlp, "svd": mean(r["svd_error"] for r in sel),
                        "seconds": mean(r["search_seconds"] for r in sel),
                        "max_seconds": max(r["search_seconds"] for r in sel)})
    return out


def markdown(protocol: dict, table: list[dict], sts: dict) -> str:
    lines = ["# Permutation search (TQCompressor) on real weights", "",
             "Protocol: " + "; ".join(f"{k}: {v}" for k, v in protocol.items()) + ".", "",
             "| weights | Kronecker (half the parameters) | n | Van Loan-Pitsianis | + permutation search | gain "
             "| truncated SVD, same params | search s (mean / max) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['family']} | {t['kronecker']} | {t['n']} | {t['vlp']:.4f} | {t['search']:.4f} "
                     f"| {100 * t['gain']:.1f}% | {t['svd']:.4f} | {t['seconds']:.1f} / {t['max_seconds']:.1f} |")
    lines += ["", "Mean relative Frobenius error ||W - W_hat||_F / ||W||_F; gain = 1 - search / VLP.", "",
              "STS-B test Spearman of all-MiniLM-L6-v2 (mean pooling, cosine), `minilm-kronecker-ffn` "
              "(12 FFN matrices as rank-2 sums with B (2, 2)), no training:", "",
              "| model | Spearman |", "|---|---|"]
    for key in ("dense", "kronecker", "kronecker+permutations"):
        lines.append(f"| {key} | {sts[key]:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharey=True)
    for ax, (family, label) in zip(axes.flat, [(f, s) for f in ("gpt2", "minilm") for s in SHAPES], strict=True):
        sel = [r for r in rows if r["family"] == family and r["kronecker"] == label]
        x = range(len(sel))
        for key, name in (("vlp_error", "Van Loan-Pitsianis"), ("search_error", "+ permutation search"),
                          ("svd_error", "truncated SVD (same params)")):
            ax.plot(x, [r[key] for r in sel], ".-", label=name)
        ax.set_title(f"{family}: {label}, half the parameters")
        ax.set_xticks(list(x)[::4], [r["matrix"] for r in sel][::4], rotation=60, fontsize=7)
        ax.set_ylabel("relative Frobenius error")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    parser.add_argument("--time-budget", type=float, default=3.0, help="search seconds per matrix")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = matrix_rows("gpt2", gpt2_attention(args.data_dir), args.time_budget)
    rows += matrix_rows("minilm", minilm_linears(), args.time_budget)
    sts = sts_effect(args.data_dir, args.time_budget)
    load = os.getloadavg()
    protocol = {
        "weights": "GPT-2 small attention Q, K, V, O of 12 blocks (768 x 768, out x in); all-MiniLM-L6-v2 "
                   "Q, K, V, O (384 x 384), FFN in (1536 x 384), FFN out (384 x 1536) of 6 layers",
        "shapes": "A (m/2, n/2) x B (2, 2) rank 2 and A (m/2, n) x B (2, 1) rank 1",
        "search": f"search_permutations, seed 0, time budget {args.time_budget} s per matrix",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {load[0]:.1f} at the end (shared machine)",
        "threads": f"torch {args.threads}",
        "total seconds": f"{time.perf_counter() - started:.0f}",
    }
    table = summary(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "permutation_gain.json").write_text(json.dumps(
        {"protocol": protocol, "summary": table, "sts_b_test_spearman": sts, "matrices": rows}, indent=2))
    (RESULTS / "permutation_gain.md").write_text(markdown(protocol, table, sts))
    plot(rows, RESULTS / "permutation_gain.png")
    print(markdown(protocol, table, sts))


if __name__ == "__main__":
    main()
