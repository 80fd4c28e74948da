"""Distillation demo: all-MiniLM-L6-v2 with Kronecker-factored FFNs recovers its STS-B quality.

The recipe ``minilm-kronecker-ffn`` replaces the 12 FFN matrices by rank-2 Kronecker sums with 2x2 B
factors (Van Loan-Pitsianis initialisation, no permutations), halving them. The compressed student is
then distilled against the uncompressed teacher (:func:`tensorlm.distill.distill`, loss ``embedding``:
cosine between mask-aware mean-pooled sentence embeddings plus per-block hidden-state MSE, as in
TinyBERT/KnGPT2's intermediate-layer distillation) on sentences of ``lm_text`` and the STS-B/SICK
**train** sentences, within a wall-time budget. Model selection: Spearman on a fixed random subset of
STS-B **dev** pairs, evaluated every ``--eval-every`` steps; STS-B **test** (all 1,379 pairs) is only
scored for the teacher, the student before training and the selected student after.

    python benchmarks/distill_minilm.py [--data-dir DIR] [--threads 2] [--budget-s 1440] [--steps 120]

Writes ``distill_minilm.{json,md,png}`` into ``--out`` (default ``benchmarks/results``); the run folder
(checkpoints, ``metrics.jsonl``) goes to ``--run-dir`` (default ``~/.cache/tensorlm/runs/distill_minilm``),
which is emptied first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from tensorlm import compress, count_parameters, load_model
from tensorlm.data import load_sts, resolve_data_dir
from tensorlm.distill import DistillConfig, distill
from tensorlm.distill.data import default_cache_dir
from tensorlm.evaluate.sts import sentence_embeddings, sts_spearman
from tensorlm.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = "minilm-kronecker-ffn"


def dev_subset(data_dir: Path, n: int, seed: int) -> list[tuple[str, str, float]]:
    """``n`` STS-B dev pairs drawn without replacement by ``seed`` (the same subset on every run)."""
    pairs = load_sts("stsb", "dev", data_dir)
    return random.Random(seed).sample(pairs, n)


def pairs_spearman(model, tokenizer, pairs: list[tuple[str, str, float]]) -> float:
    """Spearman between cosines of mean-pooled embeddings and gold scores (the STS protocol)."""
    n = len(pairs)
    emb = sentence_embeddings(model, tokenizer, [a for a, _, _ in pairs] + [b for _, b, _ in pairs],
                              progress=False)  # (2n, d)
    cos = F.cosine_similarity(emb[:n], emb[n:], dim=-1)  # (n,)
    return float(spearmanr(cos.numpy(), [s for _, _, s in pairs]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=1440.0, help="training wall time incl. validation")
    parser.add_argument("--steps", type=int, default=120, help="schedule length (the budget may stop earlier)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--dev-pairs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--run-dir", default=None, help="default ~/.cache/tensorlm/runs/<results name>")
    parser.add_argument("--recipe", default=RECIPE, help="a MiniLM recipe; results go to distill_minilm[-<recipe>]")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir = resolve_data_dir(args.data_dir)
    load_start = os.getloadavg()
    t0 = time.perf_counter()

    loaded = load_model("all-MiniLM-L6-v2", data_dir=data_dir)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    recipe = Recipe.load(args.recipe)
    name = "distill_minilm" if args.recipe == RECIPE else f"distill_minilm-{args.recipe}"
    student = compress(teacher, recipe, progress=False)
    params_teacher, params_student = count_parameters(teacher), count_parameters(student)
    dev = dev_subset(data_dir, args.dev_pairs, args.seed)

    def test(model) -> float:
        return sts_spearman(model, tokenizer, dataset="stsb", split="test", data_dir=data_dir, progress=False)

    scores = {"teacher": {"test": test(teacher), "dev_subset": pairs_spearman(teacher, tokenizer, dev)},
              "student_before": {"test": test(student)}}
    print(f"teacher test {scores['teacher']['test']:.4f}, student before {scores['student_before']['test']:.4f}",
          flush=True)

    config = DistillConfig(loss="embedding", steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           max_length=args.max_length, warmup=args.warmup, eval_every=args.eval_every,
                           save_every=args.eval_every, log_every=10, val_size=64, seed=args.seed,
                           data_dir=str(data_dir), time_budget_s=args.budget_s)
    run_dir = Path(args.run_dir or default_cache_dir() / "runs" / name)
    shutil.rmtree(run_dir, ignore_errors=True)
    train_start = time.perf_counter()
    result = distill(student, teacher, tokenizer, config, run_dir, kind="encoder",
                     eval_fn=lambda m: pairs_spearman(m, tokenizer, dev), progress=False)
    train_wall = time.perf_counter() - train_start
    scores["student_after"] = {"test": test(student), "dev_subset": result.best_metric}
    scores["student_before"]["dev_subset"] = next(r["val_score"] for r in result.history if r["step"] == 0)
    train_lines = [r for r in result.history if "loss" in r]
    curve = [{"step": r["step"], "dev_spearman": r["val_score"], "val_cosine": r["val_cosine"]}
             for r in result.history if "val_score" in r]
    report = {
        "benchmark": name,
        "model": "all-MiniLM-L6-v2",
        "recipe": recipe.to_dict(),
        "parameters": {"teacher": params_teacher["total"], "student": params_student["total"]},
        "scores": scores,
        "target": {"stsb_test_spearman": 0.80, "met": scores["student_after"]["test"] >= 0.80},
        "training": {
            "config": config.to_dict(),
            "steps_done": result.steps, "stopped": result.stopped, "best_step": result.best_step,
            "selection": f"STS-B dev, {args.dev_pairs} pairs sampled with seed {args.seed}",
            "train_elapsed_s": train_lines[-1]["elapsed_s"] if train_lines else 0.0,
            "wall_s_including_setup": train_wall,
            "mean_tokens_per_s": (sum(r["tokens_per_s"] for r in train_lines) / len(train_lines)
                                  if train_lines else 0.0),
            "final_loss": train_lines[-1]["loss"] if train_lines else None,
        },
        "curve": curve,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "total_wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")
    print(markdown(report))


def markdown(r: dict) -> str:
    """The report as Markdown: scores table, then the protocol."""
    s, t, c, m = r["scores"], r["training"], r["training"]["config"], r["machine"]
    rows = [("teacher (uncompressed)", r["parameters"]["teacher"], s["teacher"]),
            ("student before distillation", r["parameters"]["student"], s["student_before"]),
            (f"student after distillation (step {t['best_step']})", r["parameters"]["student"], s["student_after"])]
    lines = [f"# Distillation: all-MiniLM-L6-v2, `{r['recipe']['name']}`", "",
             "| model | parameters | STS-B test Spearman | STS-B dev subset Spearman |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {p:,} | {v['test']:.4f} | {v['dev_subset']:.4f} |" for name, p, v in rows]
    met = "met" if r["target"]["met"] else "**missed**"
    lines += ["", f"Target: STS-B test Spearman >= 0.80 after distillation: {met}.", "", "## Protocol", "",
              f"- Compression: {' '.join(r['recipe']['description'].split())}",
              "- Training data: sentences of `lm_text` plus STS-B and SICK **train** sentences "
              "(`tensorlm.distill.data.SentencePool`); sentences that occur in any evaluation split are dropped.",
              f"- Loss: `{c['loss']}` preset = 1 - cos(mean-pooled student, teacher) + MSE of every block's "
              "output (identity layer map); teacher in eval mode, no dropout.",
              f"- Optimiser: AdamW, lr {c['lr']}, weight decay {c['weight_decay']}, warm-up {c['warmup']} steps "
              f"then cosine decay over {c['steps']} steps, clipping at {c['max_grad_norm']}; batch {c['batch_size']} "
              f"sentences, max_length {c['max_length']} tokens.",
              f"- Budget: {c['time_budget_s']:.0f} s of training wall time (steps + validations). Done: "
              f"{t['steps_done']} steps ({t['stopped']}), {t['train_elapsed_s']:.0f} s; "
              f"mean {t['mean_tokens_per_s']:.0f} tokens/s.",
              f"- Model selection: {t['selection']}, every {c['eval_every']} steps; best step {t['best_step']}. "
              "STS-B test (1,379 pairs) is scored only for the three rows above.",
              "- Scoring: mean pooling over the attention mask, cosine, Spearman (`tensorlm.evaluate.sts`), "
              "max_length 128.",
              f"- Machine: {m['platform']}, {m['cpu_count']} CPU cores shared with other jobs, torch "
              f"{m['torch']} with {m['torch_threads']} threads; load average at start "
              f"{m['loadavg_start'][0]:.1f}, at end {m['loadavg_end'][0]:.1f}. Total script wall time "
              f"{r['total_wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Dev-subset Spearman against steps, with the teacher's as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in r["curve"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [p["dev_spearman"] for p in r["curve"]], marker="o", label="student")
    ax.axhline(r["scores"]["teacher"]["dev_subset"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("STS-B dev subset Spearman")
    ax.set_title(f"all-MiniLM-L6-v2, {r['recipe']['name']}: student during distillation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
