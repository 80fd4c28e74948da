"""TensorGPT sweep: per-row TT (MPS) compression of embeddings, no training, against truncated SVD.

(a) all-MiniLM-L6-v2: replace ``embeddings.word_embeddings`` (30522 x 384) by a TTEmbedding for a ladder of
    tensorisations and TT-ranks, and by the best rank-k approximation (truncated SVD) at the same compression
    ratios; score STS-B test (every point) and SICK-R test (baseline and the points near 3.3x) Spearman.
(b) real GPT-2 ``wpe`` (1024 x 768): relative reconstruction error ``||E - E~||_F / ||E||_F`` of TT (fixed ranks
    and per-row tolerances) and truncated SVD against the compression ratio.
(c) speed and memory of TTEmbedding against nn.Embedding (MiniLM table, a 32 x 128 batch of token ids) and of
    the tied TT head against a dense ``h @ E.T``.

Compression ratio = dense table entries / stored entries (TT: ``V * sum_k r_{k-1} I_k r_k`` with the stored,
maximum ranks; SVD rank k: ``k (V + d)``). For tolerance runs the ratio a ragged store would reach (each row at
its own ranks) is reported beside it.

Run: ``python benchmarks/tensorgpt_sweep.py [--data-dir DIR] [--threads 2]``; writes
``benchmarks/results/tensorgpt_sweep.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import matplotlib
import torch
from safetensors.torch import load_file
from torch import nn

from tensorlm.data import resolve_data_dir
from tensorlm.decompose.tt import tt_parameter_count, tt_rows_to_full, tt_svd_rows
from tensorlm.evaluate.sts import sts_spearman
from tensorlm.layers.base import TiedHead
from tensorlm.layers.tt import TTEmbedding
from tensorlm.models import load_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MINILM_TT = [((8, 6, 8), 1), ((8, 6, 8), 2), ((8, 6, 8), 3), ((6, 8, 8), 3), ((8, 6, 8), 4), ((8, 6, 8), 6),
             ((6, 8, 8), 6)]
MINILM_SVD_RATIOS = [17.45, 3.37, 2.4, 1.6, 1.23]
WPE_SHAPES = [(8, 8, 12), (4, 4, 4, 12), (24, 32)]
WPE_RANKS = [1, 2, 3, 4, 6, 8, 12, 16]
TOLERANCES = [0.05, 0.1, 0.2, 0.3, 0.5]
STSB_REFERENCE = 0.8197  # all-MiniLM-L6-v2 on STS-B test (DESIGN.md)
NEAR_RATIO = 3.31


def table_ratio(vocab: int, dim: int, stored: int) -> float:
    return vocab * dim / stored


def svd_rank_for(vocab: int, dim: int, ratio: float) -> int:
    """Rank k whose ``k (V + d)`` is nearest ``V d / ratio``."""
    return max(1, round(vocab * dim / (ratio * (vocab + dim))))


def score(model: nn.Module, tokenizer, data_dir: Path, datasets: list[str]) -> dict:
    out = {}
    for name in datasets:
        start = time.perf_counter()
        out[name] = sts_spearman(model, tokenizer, dataset=name, split="test", data_dir=data_dir, progress=False)
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    return out


def minilm_sweep(data_dir: Path, log) -> dict:
    loaded = load_model("all-MiniLM-L6-v2")
    model, tokenizer = loaded.model, loaded.tokenizer
    original = model.embeddings.word_embeddings
    table = original.weight.detach()  # (V, d)
    vocab, dim = table.shape
    baseline = score(model, tokenizer, data_dir, ["stsb", "sick"])
    log(f"baseline {baseline}")
    rows = []

    def run(method: str, layer: nn.Module, stored: int, extra: dict, sick: bool) -> None:
        model.embeddings.word_embeddings = layer
        approx = layer.weight_rows() if isinstance(layer, TTEmbedding) else layer.weight  # (V, d)
        row = {"method": method, "ratio": round(table_ratio(vocab, dim, stored), 3), "stored": stored,
               "rel_error": round(float((approx.detach() - table).norm() / table.norm()), 4), **extra,
               **score(model, tokenizer, data_dir, ["stsb", "sick"] if sick else ["stsb"])}
        model.embeddings.word_embeddings = original
        rows.append(row)
        log(str(row))

    for shape, rank in MINILM_TT:
        start = time.perf_counter()
        tt = TTEmbedding.from_dense(original, shape, ranks=rank)
        seconds = time.perf_counter() - start
        stored = sum(p.numel() for p in tt.parameters())
        near = abs(table_ratio(vocab, dim, stored) - NEAR_RATIO) < 0.1
        run("tt", tt, stored, {"shape": list(shape), "ranks": tt.ranks, "compress_seconds": round(seconds, 2)}, near)
    u, s, vh = torch.linalg.svd(table.double(), full_matrices=False)  # (V, d), (d,), (d, d)
    for target in MINILM_SVD_RATIOS:
        k = svd_rank_for(vocab, dim, target)
        dense = nn.Embedding.from_pretrained(((u[:, :k] * s[:k]) @ vh[:k]).float(), freeze=True,
                                             padding_idx=original.padding_idx)
        stored = k * (vocab + dim)
        run("svd", dense, stored, {"rank": k}, abs(table_ratio(vocab, dim, stored) - NEAR_RATIO) < 0.1)
    tolerance_rows = []
    for eps in TOLERANCES:
        cores, row_ranks = tt_svd_rows(table, (8, 6, 8), eps=eps)
        ragged = sum(tt_parameter_count((8, 6, 8), r[1:-1].tolist()) for r in row_ranks)
        stored = sum(c.numel() for c in cores)
        err = tt_rows_to_full(cores) - table
        tolerance_rows.append({"method": "tt-eps", "eps": eps, "shape": [8, 6, 8],
                               "ranks": [c.shape[-1] for c in cores[:-1]],
                               "ratio": round(table_ratio(vocab, dim, stored), 3),
                               "ragged_ratio": round(table_ratio(vocab, dim, ragged), 3),
                               "rel_error": round(float(err.norm() / table.norm()), 4),
                               "max_row_rel_error": round(float((err.norm(dim=1) / table.norm(dim=1)).max()), 4)})
        log(str(tolerance_rows[-1]))
    return {"baseline": baseline, "rows": rows, "tolerance": tolerance_rows, "vocab": vocab, "dim": dim}


def wpe_sweep(data_dir: Path, log) -> dict:
    path = data_dir / "gpt2-small-partial" / "gpt2-small-partial.safetensors"
    table = load_file(str(path))["transformer.wpe.weight"]  # (1024, 768)
    vocab, dim = table.shape
    rows = []
    for shape in WPE_SHAPES:
        for rank in WPE_RANKS:
            bound = [min(math.prod(shape[: k + 1]), math.prod(shape[k + 1:])) for k in range(len(shape) - 1)]
            ranks = [min(rank, b) for b in bound]
            cores, _ = tt_svd_rows(table, shape, ranks=ranks)
            stored = sum(c.numel() for c in cores)
            err = float((tt_rows_to_full(cores) - table).norm() / table.norm())
            rows.append({"method": "tt", "shape": list(shape), "ranks": ranks,
                         "ratio": round(table_ratio(vocab, dim, stored), 3), "rel_error": round(err, 4)})
            if ranks != [rank] * len(ranks):
                break  # further ranks clip to the same decomposition
    for eps in TOLERANCES:
        cores, row_ranks = tt_svd_rows(table, (8, 8, 12), eps=eps)
        stored = sum(c.numel() for c in cores)
        ragged = sum(tt_parameter_count((8, 8, 12), r[1:-1].tolist()) for r in row_ranks)
        err = float((tt_rows_to_full(cores) - table).norm() / table.norm())
        rows.append({"method": "tt-eps", "eps": eps, "shape": [8, 8, 12], "ranks": [c.shape[-1] for c in cores[:-1]],
                     "ratio": round(table_ratio(vocab, dim, stored), 3),
                     "ragged_ratio": round(table_ratio(vocab, dim, ragged), 3), "rel_error": round(err, 4)})
    s = torch.linalg.svdvals(table.double())
    for k in sorted({svd_rank_for(vocab, dim, r["ratio"]) for r in rows if r["ratio"] > 1}):
        rows.append({"method": "svd", "rank": k, "ratio": round(table_ratio(vocab, dim, k * (vocab + dim)), 3),
                     "rel_error": round(float(s[k:].norm() / s.norm()), 4)})
    for row in rows:
        log(str(row))
    return {"rows": rows, "vocab": vocab, "dim": dim}


def speed_and_memory(repeats: int = 20) -> dict:
    loaded = load_model("all-MiniLM-L6-v2")
    dense = loaded.model.embeddings.word_embeddings
    tt = TTEmbedding.from_dense(dense, (8, 6, 8), ranks=3)
    ids = torch.randint(0, dense.num_embeddings, (32, 128))
    hidden = torch.randn(4, 128, dense.embedding_dim)
    head = TiedHead(tt, "embeddings.word_embeddings")

    def per_call(fn) -> float:
        with torch.inference_mode():
            fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
        return (time.perf_counter() - start) / repeats

    table = dense.weight.detach()
    dense_s, tt_s = per_call(lambda: dense(ids)), per_call(lambda: tt(ids))
    head_dense_s, head_tt_s = per_call(lambda: hidden @ table.T), per_call(lambda: head(hidden))
    return {
        "lookup_batch": [32, 128], "repeats": repeats,
        "dense_lookups_per_s": round(ids.numel() / dense_s), "tt_lookups_per_s": round(ids.numel() / tt_s),
        "dense_bytes": table.numel() * table.element_size(),
        "tt_bytes": sum(p.numel() * p.element_size() for p in tt.parameters()),
        "tt_config": {"shape": [8, 6, 8], "ranks": tt.ranks},
        "head_batch": [4, 128], "dense_head_ms": round(1e3 * head_dense_s, 2), "tt_head_ms": round(1e3 * head_tt_s, 2),
    }


def largest_ratio_keeping(rows: list[dict], method: str, floor: float) -> dict | None:
    kept = [r for r in rows if r["method"] == method and r["stsb"] >= floor]
    return max(kept, key=lambda r: r["ratio"], default=None)


def nearest(rows: list[dict], method: str, ratio: float) -> dict:
    return min((r for r in rows if r["method"] == method), key=lambda r: abs(r["ratio"] - ratio))


def write_markdown(result: dict, path: Path) -> None:
    m, w, sp = result["minilm"], result["wpe"], result["speed"]
    base = m["baseline"]
    lines = [
        "# TensorGPT sweep: per-row TT (MPS) embedding compression, no training",
        "",
        f"Machine: {result['machine']}. Generated by `python benchmarks/tensorgpt_sweep.py` in "
        f"{result['seconds']:.0f} s.",
        "",
        "Protocol: " + result["protocol"],
        "",
        f"## all-MiniLM-L6-v2 word embeddings ({m['vocab']} x {m['dim']}), STS-B / SICK-R test Spearman",
        "",
        f"Uncompressed: STS-B {base['stsb']:.4f}, SICK-R {base['sick']:.4f}. "
        f"99% of STS-B = {result['stsb_floor']:.4f}.",
        "",
        "| method | shape | ranks / rank | ratio | rel. error | STS-B | SICK-R |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(m["rows"], key=lambda r: (r["method"], -r["ratio"])):
        shape = "x".join(map(str, r["shape"])) if "shape" in r else "-"
        rank = r["ranks"] if r["method"] == "tt" else r["rank"]
        sick = f"{r['sick']:.4f}" if "sick" in r else "-"
        lines.append(f"| {r['method']} | {shape} | {rank} | {r['ratio']:.2f}x | {r['rel_error']:.3f} | "
                     f"{r['stsb']:.4f} | {sick} |")
    lines += ["", "Per-row tolerance (8x6x8): stored ranks are the maximum over rows, so the stored ratio is "
              "what a padded tensor holds; 'ragged' is what storing each row at its own ranks would give.", "",
              "| eps | stored ranks | stored ratio | ragged ratio | rel. error | max row rel. error |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in m["tolerance"]:
        lines.append(f"| {r['eps']} | {r['ranks']} | {r['ratio']:.2f}x | {r['ragged_ratio']:.2f}x | "
                     f"{r['rel_error']:.3f} | {r['max_row_rel_error']:.3f} |")
    lines += ["", "Findings:", ""] + [f"- {s}" for s in result["findings"]]
    lines += ["", f"## GPT-2 `wpe` ({w['vocab']} x {w['dim']}), relative reconstruction error", "",
              "| method | shape | ranks / eps | ratio | ragged ratio | rel. error |", "|---|---|---|---:|---:|---:|"]
    for r in sorted(w["rows"], key=lambda r: (r["method"], str(r.get("shape")), -r["ratio"])):
        shape = "x".join(map(str, r["shape"])) if "shape" in r else "-"
        what = r.get("eps", r.get("ranks", r.get("rank")))
        lines.append(f"| {r['method']} | {shape} | {what} | {r['ratio']:.2f}x | {r.get('ragged_ratio', '-')} | "
                     f"{r['rel_error']:.4f} |")
    lines += ["", "## Speed and memory (MiniLM table, TT 8x6x8 ranks "
              f"{sp['tt_config']['ranks']}, inference mode, {sp['repeats']} repeats)", "",
              "| | nn.Embedding | TTEmbedding |", "|---|---:|---:|",
              f"| lookups/s, batch 32x128 | {sp['dense_lookups_per_s']:,} | {sp['tt_lookups_per_s']:,} |",
              f"| bytes held | {sp['dense_bytes']:,} | {sp['tt_bytes']:,} |",
              f"| tied head, 4x128 hidden states -> logits (ms) | {sp['dense_head_ms']} | {sp['tt_head_ms']} |", ""]
    path.write_text("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    m = result["minilm"]
    for method, style in (("tt", "o-"), ("svd", "s--")):
        pts = sorted((r["ratio"], r["stsb"]) for r in m["rows"] if r["method"] == method)
        left.plot(*zip(*pts, strict=True), style, label={"tt": "TT per row (MPS)", "svd": "truncated SVD"}[method])
    left.axhline(m["baseline"]["stsb"], color="k", lw=0.8, label="uncompressed")
    left.axhline(result["stsb_floor"], color="k", ls=":", lw=0.8, label="99% of uncompressed")
    left.set(xscale="log", xlabel="embedding compression ratio", ylabel="STS-B test Spearman",
             title="all-MiniLM-L6-v2, no training")
    left.legend(fontsize=8)
    w = result["wpe"]
    for shape in WPE_SHAPES:
        pts = sorted((r["ratio"], r["rel_error"]) for r in w["rows"]
                     if r["method"] == "tt" and r["shape"] == list(shape))
        right.plot(*zip(*pts, strict=True), "o-", label="TT " + "x".join(map(str, shape)))
    pts = sorted((r["ratio"], r["rel_error"]) for r in w["rows"] if r["method"] == "svd")
    right.plot(*zip(*pts, strict=True), "s--", label="truncated SVD")
    right.set(xscale="log", xlabel="compression ratio", ylabel="relative Frobenius error",
              title="GPT-2 wpe (1024 x 768)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="benchmark data (default: $TENSORLM_DATA, ../shared/data)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(RESULTS), help="folder for tensorgpt_sweep.{json,md,png}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data_dir = resolve_data_dir(args.data_dir or os.environ.get("TENSORLM_DATA") or ROOT.parent / "shared" / "data")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    machine = (f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores visible, "
               f"torch {torch.__version__} with {args.threads} threads, load average at start "
               f"{os.getloadavg()[0]:.1f} (machine shared with other jobs)")
    result = {"machine": machine, "minilm": minilm_sweep(data_dir, log), "wpe": wpe_sweep(data_dir, log)}
    result["speed"] = speed_and_memory()
    log(str(result["speed"]))
    rows = result["minilm"]["rows"]
    floor = 0.99 * result["minilm"]["baseline"]["stsb"]
    result["stsb_floor"] = round(floor, 4)
    findings = []
    for method in ("tt", "svd"):
        best = largest_ratio_keeping(rows, method, floor)
        near = nearest(rows, method, NEAR_RATIO)
        findings.append(
            f"{method}: largest ratio keeping >= 99% of STS-B: "
            + (f"{best['ratio']:.2f}x (STS-B {best['stsb']:.4f})" if best else "none of the ratios tried")
            + f"; at {near['ratio']:.2f}x (nearest to {NEAR_RATIO}x) STS-B {near['stsb']:.4f}"
            + (f", SICK-R {near['sick']:.4f}" if "sick" in near else "")
        )
    result["findings"] = findings
    result["protocol"] = (
        "STS-B test (1,379 pairs) and SICK-R test (4,927 pairs) from the original releases; score = Spearman "
        "correlation (fraction) between gold scores and the cosine of attention-mask mean-pooled last hidden "
        "states (tensorlm.evaluate.sts.sts_spearman, max_length 128); only the word-embedding table is replaced, "
        "no training, no fine-tuning; the reference figure for the uncompressed model is "
        f"{STSB_REFERENCE}. GPT-2 wpe error: relative Frobenius norm over the whole table. Ratios count stored "
        "entries of the table only (TT: padded ranks; SVD: k (V + d))."
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tensorgpt_sweep.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "tensorgpt_sweep.md")
    plot(result, out / "tensorgpt_sweep.png")
    for line in findings:
        log(line)


if __name__ == "__main__":
    main()
