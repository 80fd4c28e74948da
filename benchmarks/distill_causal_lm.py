"""Distillation demo on a causal LM: a small GPT-2 we pretrain ourselves, Kronecker-compressed, distilled.

No complete pretrained GPT-2 exists offline, so the teacher is a small GPT-2-architecture model (4 blocks,
n_embd 256, 4 heads, 256 positions, the real GPT-2 tokenizer) trained from scratch by our own loop
(:func:`tensorlm.distill.distill` with ``teacher=None``: next-token cross-entropy on ``lm_text``) for a
fixed wall-time budget. It is cached under ``~/.cache/tensorlm/causal_teacher/<key>`` (``$TENSORLM_CACHE``)
and rebuilt when absent. The student is the teacher compressed KnGPT2-style, scaled to its shapes: the
token embedding as ``A (x) b`` with ``b: 1x2`` and the LM head tied to the factors, and the MLP matrices of
the odd blocks (1, 3) as one Kronecker product with ``B: 2x1`` (half their weights), all initialised by
the nearest Kronecker product. It is distilled on ``lm_text`` (loss ``logits``: KL(teacher || student)
of the next-token distributions), model selection on held-out ``lm_text`` blocks. WikiText-2 raw test
perplexity (sliding windows, context = n_positions = 256, stride 128, the first ``--eval-tokens`` tokens)
of the teacher, the student before and after.

    python benchmarks/distill_causal_lm.py [--data-dir DIR] [--threads 2] [--pretrain-s 600] [--distill-s 600]

Writes ``distill_causal_lm.{json,md,png}`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tensorlm import compress, count_parameters
from tensorlm.data import load_wikitext2_test, resolve_data_dir
from tensorlm.distill import DistillConfig, distill
from tensorlm.distill.data import default_cache_dir
from tensorlm.evaluate.perplexity import perplexity
from tensorlm.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
TEACHER = dict(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=50257, bos_token_id=50256,
               eos_token_id=50256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
RECIPE = {
    "name": "small-gpt2-kronecker",
    "description": "KnGPT2 scaled to a 4-block, 256-wide GPT-2: embedding A (x) b (b 1x2, head tied); "
                   "odd blocks' MLPs as one Kronecker product with B 2x1 (half their weights).",
    "stages": [
        {"name": "embedding", "method": "kronecker_embedding", "targets": ["transformer.wte"],
         "options": {"factor": 2, "head": "tie"}},
        {"name": "odd-mlp", "method": "kronecker",
         "targets": [{"match": "re:transformer\\.h\\.\\d+\\.mlp\\.(c_fc|c_proj)", "layers": "odd"}],
         "options": {"shapes": {"1024x256": {"a_shape": [512, 256], "b_shape": [2, 1], "rank": 1},
                                "256x1024": {"a_shape": [128, 1024], "b_shape": [2, 1], "rank": 1}}}},
    ],
}


def pretrained_teacher(tokenizer, data_dir: Path, cfg: DistillConfig) -> tuple[GPT2LMHeadModel, dict]:
    """The cached teacher for ``cfg`` (trained now when absent) and its pretraining record."""
    key = hashlib.sha256(json.dumps([TEACHER, cfg.to_dict() | {"data_dir": None}], sort_keys=True).encode())
    folder = default_cache_dir() / "causal_teacher" / key.hexdigest()[:16]
    if (folder / "pretrain.json").exists():
        return GPT2LMHeadModel.from_pretrained(folder).eval(), json.loads((folder / "pretrain.json").read_text())
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(**TEACHER))
    run_dir = folder.with_name(folder.name + "-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = distill(model, None, tokenizer, cfg, run_dir, kind="causal-lm", progress=False)
    record = {"steps": result.steps, "stopped": result.stopped, "best_step": result.best_step,
              "best_val_nll": result.best_metric, "wall_s": time.perf_counter() - start,
              "config": cfg.to_dict(), "history": result.history}
    model.save_pretrained(folder)
    (folder / "pretrain.json").write_text(json.dumps(record))
    shutil.rmtree(run_dir, ignore_errors=True)
    return model.eval(), record


def train_summary(history: list[dict]) -> dict:
    """Steps, training seconds and mean throughput of a run's log lines."""
    lines = [r for r in history if "loss" in r]
    if not lines:
        return {"train_elapsed_s": 0.0, "mean_tokens_per_s": 0.0, "final_loss": None}
    return {"train_elapsed_s": lines[-1]["elapsed_s"], "final_loss": lines[-1]["loss"],
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in lines) / len(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretrain-s", type=float, default=600.0)
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--distill-s", type=float, default=600.0)
    parser.add_argument("--distill-steps", type=int, default=80)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--val-blocks", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--run-dir", default=str(default_cache_dir() / "runs" / "distill_causal_lm"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "gpt2-tokenizer")
    common = dict(batch_size=args.batch_size, seq_len=TEACHER["n_positions"], eval_every=args.eval_every,
                  save_every=args.eval_every, log_every=1, val_size=args.val_blocks, seed=args.seed,
                  data_dir=str(data_dir))
    pre_cfg = DistillConfig(loss="logits", weights={"logit_kl": 0.0, "ce": 1.0}, steps=args.pretrain_steps,
                            lr=args.pretrain_lr, warmup=max(1, args.pretrain_steps // 20),
                            time_budget_s=args.pretrain_s, **common)
    teacher, pretrain = pretrained_teacher(tokenizer, data_dir, pre_cfg)

    recipe = Recipe.from_dict(RECIPE)
    student = compress(teacher, recipe, progress=False)
    text = load_wikitext2_test(data_dir)
    context = TEACHER["n_positions"]

    def ppl(model) -> dict:
        return perplexity(model, tokenizer, text, protocol="sliding", context=context, stride=context // 2,
                          max_tokens=args.eval_tokens, name="wikitext-2-raw test", progress=False)

    scores = {"teacher": ppl(teacher), "student_before": ppl(student)}
    print(f"teacher ppl {scores['teacher']['perplexity']:.2f}, student before "
          f"{scores['student_before']['perplexity']:.2f}", flush=True)

    dist_cfg = DistillConfig(loss="logits", steps=args.distill_steps, lr=args.distill_lr,
                             warmup=max(1, args.distill_steps // 20), time_budget_s=args.distill_s, **common)
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    result = distill(student, teacher, tokenizer, dist_cfg, run_dir, kind="causal-lm", progress=False)
    scores["student_after"] = ppl(student)
    gap_before = scores["student_before"]["perplexity"] - scores["teacher"]["perplexity"]
    gap_after = scores["student_after"]["perplexity"] - scores["teacher"]["perplexity"]
    closed = 1.0 - gap_after / gap_before if gap_before > 0 else float("nan")
    report = {
        "benchmark": "distill_causal_lm",
        "teacher_config": TEACHER,
        "recipe": recipe.to_dict(),
        "parameters": {"teacher": count_parameters(teacher)["total"], "student": count_parameters(student)["total"]},
        "wikitext2_perplexity": scores,
        "gap_closed": closed,
        "target": {"gap_closed_at_least": 0.5, "met": closed >= 0.5},
        "pretraining": {k: v for k, v in pretrain.items() if k != "history"} | train_summary(pretrain["history"]),
        "distillation": {"config": dist_cfg.to_dict(), "steps_done": result.steps, "stopped": result.stopped,
                         "best_step": result.best_step, "best_val_nll": result.best_metric,
                         "teacher_val": result.teacher_metrics, **train_summary(result.history)},
        "curves": {
            "pretrain": [{"step": r["step"], "val_ppl": r["val_ppl"]} for r in pretrain["history"] if "val_ppl" in r],
            "distill": [{"step": r["step"], "val_ppl": r["val_ppl"]} for r in result.history if "val_ppl" in r],
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "total_wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_causal_lm.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "distill_causal_lm.md").write_text(markdown(report))
    plot(report, out / "distill_causal_lm.png")
    print(markdown(report))


def markdown(r: dict) -> str:
    """The report as Markdown: perplexity table, then the protocol."""
    s, p, d, m = r["wikitext2_perplexity"], r["pretraining"], r["distillation"], r["machine"]
    pc, dc = p["config"], d["config"]
    rows = [("teacher (pretrained here)", r["parameters"]["teacher"], s["teacher"]),
            ("student before distillation", r["parameters"]["student"], s["student_before"]),
            (f"student after distillation (step {d['best_step']})", r["parameters"]["student"], s["student_after"])]
    lines = ["# Distillation: a small GPT-2 (4x256) with KnGPT2-style Kronecker factors", "",
             "| model | parameters | WikiText-2 test perplexity |", "|---|---:|---:|"]
    lines += [f"| {name} | {n:,} | {v['perplexity']:.2f} |" for name, n, v in rows]
    met = "met" if r["target"]["met"] else "**missed**"
    lines += ["", f"Gap closed by distillation: {100 * r['gap_closed']:.1f}% (target >= 50%: {met}).", "",
              "## Protocol", "",
              f"- Perplexity: {s['teacher']['protocol']} (`tensorlm.evaluate.perplexity`, capped to the first "
              "tokens of the test text to keep the evaluation affordable on a shared CPU).",
              f"- Teacher: GPT-2 architecture, {r['teacher_config']['n_layer']} blocks, n_embd "
              f"{r['teacher_config']['n_embd']}, {r['teacher_config']['n_head']} heads, "
              f"{r['teacher_config']['n_positions']} positions, GPT-2 tokenizer (50,257), no dropout; trained from "
              f"scratch by `tensorlm.distill.distill(teacher=None)` on next-token cross-entropy over packed "
              f"{pc['seq_len']}-token blocks of `lm_text`: AdamW lr {pc['lr']}, warm-up {pc['warmup']} then cosine "
              f"over {pc['steps']} steps, batch {pc['batch_size']} blocks, budget {pc['time_budget_s']:.0f} s; done "
              f"{p['steps']} steps ({p['stopped']}, {p['train_elapsed_s']:.0f} s, "
              f"{p['mean_tokens_per_s']:.0f} tokens/s). Cached outside the repository.",
              f"- Compression (`{r['recipe']['name']}`): {r['recipe']['description']} Nearest-Kronecker "
              "(Van Loan-Pitsianis) initialisation.",
              f"- Distillation: loss `{dc['loss']}` = KL(teacher || student) of next-token distributions at "
              f"T = {dc['temperature']}; AdamW lr {dc['lr']}, warm-up {dc['warmup']} then cosine over {dc['steps']} "
              f"steps, batch {dc['batch_size']} x {dc['seq_len']} tokens, clipping {dc['max_grad_norm']}; budget "
              f"{dc['time_budget_s']:.0f} s; done {d['steps_done']} steps ({d['stopped']}, "
              f"{d['train_elapsed_s']:.0f} s, {d['mean_tokens_per_s']:.0f} tokens/s).",
              f"- Model selection: next-token NLL of {dc['val_size']} held-out `lm_text` blocks, every "
              f"{dc['eval_every']} steps; best step {d['best_step']} (teacher on the same blocks: perplexity "
              f"{d['teacher_val'].get('val_ppl', float('nan')):.1f}). WikiText-2 is scored only for the rows above.",
              f"- Machine: {m['platform']}, {m['cpu_count']} CPU cores shared with other jobs, torch {m['torch']} "
              f"with {m['torch_threads']} threads; load average at start {m['loadavg_start'][0]:.1f}, at end "
              f"{m['loadavg_end'][0]:.1f}. Script wall time {r['total_wall_s']:.0f} s (a cached teacher skips "
              "pretraining).", "",
              "Caveat: the teacher is weak (about 200k training tokens in its budget, far from converged), so "
              "recovering it is easier than recovering a real GPT-2; the student's distillation steps also act as "
              "further training, which is how it can end level with or below the teacher. The figure shows the "
              "mechanism on a shared CPU, not the quality of a full-size run.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Held-out lm_text perplexity against steps: pretraining (teacher) and distillation (student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, title in ((axes[0], "pretrain", "teacher pretraining (CE)"),
                            (axes[1], "distill", "student distillation (logit KL)")):
        curve = r["curves"][name]
        ax.plot([c["step"] for c in curve], [c["val_ppl"] for c in curve], marker="o")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out lm_text perplexity")
        ax.set_title(title)
    teacher_val = r["distillation"]["teacher_val"].get("val_ppl")
    if teacher_val:
        axes[1].axhline(teacher_val, color="gray", linestyle="--", label="teacher")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
