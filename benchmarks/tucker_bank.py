"""Tucker matrix bank on all-MiniLM-L6-v2, without training: STS quality, compression and CPU latency.

Ren, Wang et al., "Exploring Extreme Parameter Compression for Pre-trained Language Models" (ICLR 2022)
compress BERT's encoder with one Tucker decomposition shared by all weight blocks and then *train*
(distil) the factors. This script measures the starting point: the bank fitted by HOOI alone.

For each (ops, l, d) of a ladder it fits the bank to the targeted weights of all 6 layers (D = 384:
Q, K, V, O are one block each, the FFN matrices 4 each), swaps the :class:`BankLinear` layers in, and
records the relative weight error, STS-B and SICK-R test Spearman (mean pooling, cosine), the
compression ratio, and, for some rungs, forward latency against the dense model.

    python benchmarks/tucker_bank.py [--data-dir DIR] [--threads 2] [--out benchmarks/results]

Writes ``tucker_bank.json``, ``tucker_bank.md`` and ``tucker_bank.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from tensorlm.decompose.tucker import bank_parameter_count
from tensorlm.evaluate.speed import forward_latency
from tensorlm.evaluate.sts import sts_spearman
from tensorlm.layers.tucker import bank_from_dense, bank_parameters
from tensorlm.models import load_model
from tensorlm.params import count_parameters

REPO = Path(__file__).resolve().parents[1]
OPS = {
    "attention": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "ffn": ("intermediate.dense", "output.dense"),
}
OPS["both"] = OPS["attention"] + OPS["ffn"]
# (ops, l, d, measure latency). The recipes' ranks: among the (l, d) within 4% of 7x / 48x of the targeted
# weights (d on a grid of 16), the one with the lowest one-sweep HOOI weight error on MiniLM.
LADDER = [
    ("both", 72, 320, False),
    ("both", 27, 224, True),  # tucker-bank-1x7
    ("attention", 15, 160, False),  # tucker-bank-1x7, attention only
    ("ffn", 20, 208, False),  # tucker-bank-1x7, FFN only
    ("both", 24, 80, True),  # tucker-bank-1x48
]
LATENCY_SHAPES = ((32, 128, 3, 1), (1, 128, 20, 3))  # (batch, tokens, repeats, warmup)


def targets(model: torch.nn.Module, ops: str) -> dict[str, torch.nn.Module]:
    """Module path -> nn.Linear for the chosen ops of every encoder layer, in layer order."""
    n_layers = model.config.num_hidden_layers
    return {f"encoder.layer.{i}.{p}": model.get_submodule(f"encoder.layer.{i}.{p}")
            for i in range(n_layers) for p in OPS[ops]}


def quality(model, tokenizer, data_dir: Path) -> dict:
    return {name: sts_spearman(model, tokenizer, dataset=name, split="test", data_dir=data_dir, progress=False)
            for name in ("stsb", "sick")}


def latency(model) -> dict:
    return {f"{b}x{t}": forward_latency(model, b, t, repeats=r, warmup=w)["median_s"]
            for b, t, r, w in LATENCY_SHAPES}


def linear_macs(layers: dict[str, torch.nn.Module], block_size: int | None = None,
                ranks: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates per token of the targeted maps: dense ``out*in``, or the bank's blockwise
    ``d D (rows + cols) + rows cols d^2`` (the per-call cost of forming the cores is not per token)."""
    total = 0
    for layer in layers.values():
        if ranks is None:
            total += layer.in_features * layer.out_features
        else:
            rows, cols = layer.out_features // block_size, layer.in_features // block_size
            total += ranks[1] * block_size * (rows + cols) + rows * cols * ranks[1] ** 2
    return total


def run(data_dir: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    loaded = load_model("all-MiniLM-L6-v2")
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    all_linear = targets(dense, "both")
    encoder_linear = sum(m.weight.numel() for m in all_linear.values())
    before = count_parameters(dense)
    start = time.perf_counter()
    result = {
        "model": "all-MiniLM-L6-v2", "block_size": 384, "encoder_linear_weights": encoder_linear,
        "dense": {**quality(dense, tokenizer, data_dir), **latency(dense), "parameters": before["total"],
                  "linear_macs_per_token": linear_macs(all_linear)},
        "rungs": [],
    }
    print(f"dense  STS-B {result['dense']['stsb']:.4f}  SICK-R {result['dense']['sick']:.4f}  "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    for ops, rank_blocks, rank, timed in LADDER:
        layers = targets(dense, ops)
        fit_start = time.perf_counter()
        bank = bank_from_dense(layers, ranks=(rank_blocks, rank), block_size=384)
        fit_s = time.perf_counter() - fit_start
        model = copy.deepcopy(dense)
        for name, layer in bank.items():
            model.set_submodule(name, layer)
        targeted = sum(m.weight.numel() for m in layers.values())
        stored = bank_parameters(bank)["weights"]
        n_blocks = targeted // 384**2
        assert stored == bank_parameter_count(n_blocks, 384, rank_blocks, rank)
        errors = {}
        for name, layer in bank.items():
            w = layers[name].weight.detach()
            errors[name] = ((layer.weight_matrix().detach() - w).norm() ** 2).item(), (w.norm() ** 2).item()
        rung = {
            "ops": ops, "l": rank_blocks, "d": rank, "blocks": n_blocks, "targeted_weights": targeted,
            "bank_weights": stored, "targeted_ratio": targeted / stored,
            "encoder_linear_ratio": encoder_linear / (encoder_linear - targeted + stored),
            "model_ratio": before["total"] / count_parameters(model)["total"],
            "relative_error": (sum(e for e, _ in errors.values()) / sum(n for _, n in errors.values())) ** 0.5,
            "worst_weight_error": max((e / n) ** 0.5 for e, n in errors.values()),
            "fit_s": fit_s,
            "linear_macs_per_token": linear_macs(all_linear) - linear_macs(layers)
            + linear_macs(layers, 384, (rank_blocks, rank)),
            **quality(model, tokenizer, data_dir),
        }
        if timed:
            rung.update(latency(model))
        result["rungs"].append(rung)
        print(f"{ops:9s} l={rank_blocks:3d} d={rank:3d}  x{rung['targeted_ratio']:.2f}  "
              f"err {rung['relative_error']:.3f}  STS-B {rung['stsb']:.4f}  SICK-R {rung['sick']:.4f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    result["protocol"] = {
        "datasets": "STS-B test (1,379 pairs, original release) and SICK-R test (4,927 pairs, SemEval-2014 split)",
        "metric": "Spearman of the cosine of mask-aware mean-pooled last hidden states vs gold (fraction)",
        "training": "none: bank fitted by HOOI (tensorly, SVD init, float64) to the pretrained weights",
        "ratios": "targeted = dense targeted weights / (U + V + C + all P rows); encoder_linear = all 36 "
                  "encoder weight matrices (biases excluded); model = all parameters incl. embeddings",
        "latency": "median wall-clock seconds per forward of random ids, eval mode, no_grad; 32x128: "
                   "3 repeats after 1 warmup, 1x128: 20 repeats after 3 warmup",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
                   f"jobs, torch {torch.__version__}, {threads} threads",
        "run_s": time.perf_counter() - start,
    }
    return result


def markdown(result: dict) -> str:
    p, dense = result["protocol"], result["dense"]
    lines = [
        "# Tucker matrix bank on all-MiniLM-L6-v2, no training",
        "",
        "Ren, Wang et al. (ICLR 2022): every targeted weight is cut into 384 x 384 blocks, and all blocks share",
        "one Tucker decomposition `W_i ~ U (sum_j P[i,j] C_j) V^T`, `U, V: (384, d)`, `C: (l, d, d)`, `P: (M, l)`.",
        "",
        f"- Datasets: {p['datasets']}.",
        f"- Metric: {p['metric']}.",
        f"- Training: {p['training']}.",
        f"- Ratios: {p['ratios']}.",
        f"- Latency: {p['latency']}.",
        f"- Machine: {p['machine']}. Whole run: {p['run_s'] / 60:.1f} min.",
        "",
        "| ops | l | d | blocks | targeted x | encoder linear x | model x | weight rel. error (worst) "
        "| STS-B | SICK-R | linear MMACs/token | fit s | 32x128 s | 1x128 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | | | | 1 | 1 | 1 | 0 | {dense['stsb']:.4f} | {dense['sick']:.4f} | "
        f"{dense['linear_macs_per_token'] / 1e6:.2f} | | {dense['32x128']:.3f} | {dense['1x128'] * 1e3:.1f} |",
    ]
    for r in result["rungs"]:
        timing = (f"{r['32x128']:.3f} | {r['1x128'] * 1e3:.1f}" if "32x128" in r else " | ")
        lines.append(
            f"| {r['ops']} | {r['l']} | {r['d']} | {r['blocks']} | {r['targeted_ratio']:.2f} | "
            f"{r['encoder_linear_ratio']:.2f} | {r['model_ratio']:.2f} | {r['relative_error']:.3f} "
            f"({r['worst_weight_error']:.3f}) | {r['stsb']:.4f} | {r['sick']:.4f} | "
            f"{r['linear_macs_per_token'] / 1e6:.2f} | {r['fit_s']:.0f} | {timing} |")
    rungs = result["rungs"]
    errors = [r["relative_error"] for r in rungs]
    faster = [f"{r['ops']} ({r['l']}, {r['d']})" for r in rungs if r.get("32x128", float("inf")) < dense["32x128"]]
    lines += [
        "",
        "Reading:",
        "",
        f"- Without training the bank keeps little of the weights: relative error {min(errors):.2f} to "
        f"{max(errors):.2f} over the ladder. HOOI minimises the total error, so a weight of small norm can be "
        f"dropped almost entirely (worst single weight {max(r['worst_weight_error'] for r in rungs):.3f}).",
        "- The paper's quality figures come after distillation, which this benchmark does not run; these rows are",
        "  the starting point that distillation would recover from.",
        "- Latency follows the multiply-adds per token of the factored maps (`d D (rows + cols) + rows cols d^2`",
        "  per weight) plus forming the `(n, d, d)` cores once per call; among the timed rungs the bank was faster "
        f"than dense at 32x128 for: {', '.join(faster) or 'none'}.",
        "",
        "![Spearman vs compression](tucker_bank.png)",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = {"stsb": "tab:blue", "sick": "tab:orange"}
    markers = {"both": "o", "attention": "^", "ffn": "s"}
    for metric, label in (("stsb", "STS-B"), ("sick", "SICK-R")):
        ax.axhline(result["dense"][metric], color=colours[metric], ls="--", lw=1, label=f"dense {label}")
        for ops, marker in markers.items():
            rungs = [r for r in result["rungs"] if r["ops"] == ops]
            if rungs:
                ax.plot([r["encoder_linear_ratio"] for r in rungs], [r[metric] for r in rungs], marker=marker,
                        color=colours[metric], ls="-" if ops == "both" else "none", label=f"{label}, {ops}")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50], labels=["1", "2", "5", "10", "20", "50"])
    ax.minorticks_off()
    ax.set_xlabel("compression of the encoder's linear weights (x, log scale)")
    ax.set_ylabel("test Spearman")
    ax.set_title("all-MiniLM-L6-v2, Tucker bank from HOOI, no training")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the Markdown and PNG from the existing JSON, measure nothing")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        result = json.loads((out / "tucker_bank.json").read_text())
    else:
        result = run(Path(args.data_dir), args.threads)
        (out / "tucker_bank.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "tucker_bank.md").write_text(markdown(result))
    plot(result, out / "tucker_bank.png")


if __name__ == "__main__":
    main()
