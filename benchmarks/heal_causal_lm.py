"""SmolLM2-135M healed within a CPU budget: training-free, after block-wise reconstruction, after distillation.

Protocol. Each recipe compresses SmolLM2-135M-Instruct (GGUF Q4_1 weights dequantized to float32: the teacher
is itself a 4-bit quantization of the released model) and is measured after three phases:

* ``training-free``: the recipe's compressed model as built (calibration and decomposition are not healing
  and are not counted; their seconds are recorded beside);
* ``reconstruct``: block-wise reconstruction (``tensorlm.heal.reconstruct_blocks``: each of the 30 blocks'
  factors trained by Adam to match the dense block's output on ``lm_text`` calibration blocks, inputs from
  the already-healed prefix, early stopping on held-out calibration batches);
* ``distill``: then end-to-end distillation (``tensorlm.distill.distill``: logit KL against a top-64 teacher
  store computed once, ``trainable: factors``, AdamW, model selection on held-out ``lm_text`` blocks).

All training text is ``lm_text`` (never a test split). ``cpu_minutes`` is the process CPU time of the healing
alone (user + system of this process and its children, ``resource.getrusage``), summed over the phases so
far: the store's teacher pass counts. Wall minutes and load averages are recorded beside, since the 2-core
machine is shared. Evaluation (``tensorlm.evaluate``, the ``sweep`` protocol of ``benchmarks/causal_lm.py``):
``wt2-16k`` = the first 16,384 tokens of WikiText-2 raw test, sliding windows of 1024, stride 512,
token-level perplexity; LAMBADA (OpenAI test) last-word accuracy on the first 1,000 passages; teacher KL =
KL(dense || student) in nats per token on held-out ``lm_text``. Dense is measured by the same harness in the
same script, after the first recipe (a run stopped before it divides by ``causal_lm.json``'s dense row, same
harness and protocol, and says so); dense's ``wt2-full`` is that file's too when their ``wt2-16k`` and LAMBADA
agree (:func:`borrowed_dense_full`; the table marks it). Budgets (issue 11): -10% at most 30 CPU-minutes of
healing, -30% at most 60; targets: wt2-16k perplexity at most 1.2x dense at -10%, at most 3x at -30%.

GPU scale (issue 11: "where the device tool lends a GPU, run the same benchmark at GPU scale too"):
``--device cuda --json results/heal_causal_lm_gpu.json`` runs the same recipes, phases and evaluation with
more calibration blocks in the reconstruction and a live teacher (full-vocabulary logit KL, bf16 autocast)
in the distillation, whose length is set in wall seconds (``--kd-wall-s``) instead of CPU minutes; compression
itself still runs on the CPU. ``--deadline-s`` ends the run in time: a phase that would not fit is left out
and says so.

Run: ``python benchmarks/heal_causal_lm.py [--recipes NAME ...]`` (resumable: every (recipe, phase) row is
written as soon as it is measured and a rerun skips it; the model after each phase is kept under
``~/.cache/tensorlm/heal/<recipe>-<settings digest>/<phase>`` (``$TENSORLM_CACHE``) so the next phase resumes from it).
``--render-only`` rewrites the Markdown and PNG from the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from causal_lm import compress_row, log, measure  # noqa: E402  (the same compression and evaluation calls)

from tensorlm import load_compressed, load_model, save_compressed  # noqa: E402
from tensorlm.calibrate import calibration_batches  # noqa: E402
from tensorlm.distill import DistillConfig, distill  # noqa: E402
from tensorlm.distill.data import default_cache_dir  # noqa: E402
from tensorlm.heal import ReconstructConfig, reconstruct_blocks  # noqa: E402
from tensorlm.layers.base import RECONSTRUCTED, forward_all  # noqa: E402
from tensorlm.pipeline import machine  # noqa: E402
from tensorlm.recipe import CalibrationSettings, Recipe  # noqa: E402

RESULTS = HERE / "results"
MODEL = "smollm2-135m"
PHASES = ("training-free", "reconstruct", "distill")
MINUS_10 = ("smollm2-svd-llm-fisher-10", "smollm2-tq-whitened-mlp-83")  # the SVD and Kronecker paths at -10%
RECIPES = [*MINUS_10, "smollm2-svd-llm-fisher-30", "smollm2-tq-whitened-mlp-50"]  # last two: -30%
BUDGET_CPU_MINUTES = dict.fromkeys(MINUS_10, 30.0)  # the others: 60 (the -30% budget)
TARGET_X_DENSE = dict.fromkeys(MINUS_10, 1.2)  # the others: 3.0 on a CPU
GPU_TARGET_X_DENSE = 1.5  # at -30% where a GPU is lent (TQ: 1.31x, DistilGPT2: 1.48x)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """CPU and wall seconds and load averages over a ``with`` block (the cost of one healing phase)."""

    def __enter__(self) -> Clock:
        self.cpu0, self.wall0, self.load_before = cpu_seconds(), time.perf_counter(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = cpu_seconds() - self.cpu0
        self.wall = time.perf_counter() - self.wall0
        self.load_after = os.getloadavg()[0]

    def to_dict(self) -> dict:
        return {"cpu_s": self.cpu, "wall_s": self.wall, "load_before": self.load_before, "load_after": self.load_after}


class Rows:
    """``heal_causal_lm.json``: rows keyed by ``(recipe, phase)``, rewritten atomically after every row."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        kept = json.loads(path.read_text())["rows"] if path.exists() else []
        self.data = {**header, "rows": kept}

    def get(self, recipe: str, phase: str) -> dict | None:
        return next((r for r in self.data["rows"] if (r["recipe"], r["phase"]) == (recipe, phase)), None)

    def put(self, row: dict) -> None:
        key = (row["recipe"], row["phase"])
        self.data["rows"] = [r for r in self.data["rows"] if (r["recipe"], r["phase"]) != key] + [row]
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, allow_nan=False))
        os.replace(tmp, self.path)


SETTINGS: dict = {}  # the healing settings of this run (main fills them); they key the phase folders
DEADLINE = [float("inf")]  # perf_counter time by which the run must end (--deadline-s)


def seconds_left() -> float:
    """Wall seconds until the run's deadline (infinite without ``--deadline-s``)."""
    return DEADLINE[0] - time.perf_counter()


def settings_digest(settings: dict) -> str:
    """8 hex digits of the sha256 of ``settings`` (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def phase_key(recipe: str, settings: dict | None = None, prefix: str = "") -> str:
    """The recipe's folder under ``<cache>/heal``: ``<prefix><recipe>-<digest of the healing settings>`` (this
    run's :data:`SETTINGS` unless ``settings``), so that a run with other settings (a smoke run) never resumes
    from another run's phases."""
    return f"{prefix}{recipe}-{settings_digest(SETTINGS if settings is None else settings)}"


def phase_folder(key: str, phase: str) -> Path:
    return default_cache_dir() / "heal" / key / phase


def save_phase(model, loaded, key: str, phase: str, record: dict) -> None:
    """The model after ``phase`` and what the phase cost (``heal.json``), written as one folder."""
    folder = phase_folder(key, phase)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_compressed(model, tmp, tokenizer=loaded.tokenizer, kind=loaded.kind)
    (tmp / "heal.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)  # a folder without heal.json: a phase cut short
    os.replace(tmp, folder)


def load_phase(key: str, phase: str):
    """``(model, record)`` of a finished phase, or None when its folder is not there."""
    folder = phase_folder(key, phase)
    if not (folder / "heal.json").exists():
        return None
    return load_compressed(folder).model, json.loads((folder / "heal.json").read_text())


def reconstruct(student, loaded, data_dir, args) -> dict:
    """Block-wise reconstruction of ``student`` in place; the phase's record (cost, per-block MSE)."""
    config = ReconstructConfig(lr=args.rec_lr, max_steps=args.rec_steps, batch_size=args.rec_batch,
                               eval_every=args.rec_eval_every, patience=3, time_budget_s=args.rec_block_s)
    settings = CalibrationSettings(samples=args.rec_samples, length=args.rec_length, seed=1)
    with Clock() as clock:
        batches, _ = calibration_batches(settings, loaded.tokenizer, "causal-lm", data_dir,
                                         batch_size=config.batch_size)
        result = reconstruct_blocks(student, loaded.model, batches, config=config, progress=False, log=log)
    blocks = [{"block": b.index, "val_mse_before": b.val_mse_before, "val_mse_after": b.val_mse_after,
               "steps": b.steps, "best_step": b.best_step, "stopped": b.stopped} for b in result.blocks]
    return {**clock.to_dict(), "config": config.to_dict(),
            "calibration": {"samples": settings.samples, "length": settings.length, "seed": settings.seed,
                            "text": "lm_text training blocks"},
            "storage": result.storage, "activation_mb": result.activation_mb, "blocks": blocks}


def distill_config(spent_cpu_s: float, budget_cpu_s: float, data_dir, args) -> DistillConfig:
    """The distillation of a phase: on a CPU, as many steps as the CPU budget left pays for; on any other
    device, ``--kd-steps`` at most within ``--kd-wall-s`` and what the deadline leaves after ``--eval-reserve-s``
    (30 s at least). The teacher is a top-``--kd-topk`` store, or live with ``--kd-topk 0``."""
    if args.device != "cpu":
        wall = min(args.kd_wall_s, seconds_left() - args.eval_reserve_s)
        every = min(args.kd_eval_every, args.kd_steps)
        return DistillConfig(loss="logits", teacher_topk=args.kd_topk, trainable="factors", steps=args.kd_steps,
                             lr=args.kd_lr, batch_size=args.kd_batch, seq_len=args.kd_seq_len,
                             warmup=max(1, args.kd_steps // 20), eval_every=every, save_every=every, log_every=50,
                             val_size=args.kd_val_blocks, data_dir=str(data_dir), time_budget_s=max(30.0, wall))
    # the trainer's budget counts its validations, and one more may follow the step that spends it: reserve
    # that one (the -10% Kronecker phase overran by 1.7 CPU-minutes before validations were counted)
    left = budget_cpu_s - spent_cpu_s - args.kd_val_blocks * args.kd_seq_len * args.teacher_cpu_s_per_token
    # the store's teacher pass (one teacher token per training token) comes first, outside the trainer's
    # budget: as many steps as the CPU left pays for both (a store sized for --kd-steps ate a whole budget
    # once, leaving 8 steps), then the trainer's wall budget is the CPU left after the store, per thread
    tokens = args.kd_batch * args.kd_seq_len
    per_step = tokens * (args.teacher_cpu_s_per_token + args.student_cpu_s_per_token)
    steps = max(1, min(args.kd_steps, int(left / per_step)))
    store_cpu = steps * tokens * args.teacher_cpu_s_per_token
    wall_budget = max(60.0, (left - store_cpu) / max(1, torch.get_num_threads()))
    every = min(args.kd_eval_every, steps)  # at least one evaluation after training
    return DistillConfig(loss="logits", teacher_topk=args.kd_topk, trainable="factors", steps=steps, lr=args.kd_lr,
                         batch_size=args.kd_batch, seq_len=args.kd_seq_len, warmup=max(1, steps // 10),
                         eval_every=every, save_every=every, log_every=5,
                         val_size=args.kd_val_blocks, data_dir=str(data_dir), time_budget_s=wall_budget)


def distill_phase(student, loaded, recipe: str, data_dir, spent_cpu_s: float, budget_cpu_s: float, args) -> dict:
    """End-to-end distillation of ``student`` in place, within what is left of its budget
    (:func:`distill_config`)."""
    config = distill_config(spent_cpu_s, budget_cpu_s, data_dir, args)
    run_dir = phase_folder(phase_key(recipe), "distill-run")
    with Clock() as clock:
        result = distill(student, loaded.model, loaded.tokenizer, config, run_dir, kind="causal-lm", resume=True,
                         progress=False)
    curve = [{"step": r["step"], "val_ppl": r["val_ppl"]} for r in result.history if "val_ppl" in r]
    return {**clock.to_dict(), "config": config.to_dict(), "steps": result.steps, "stopped": result.stopped,
            "best_step": result.best_step, "best_val_nll": result.best_metric,
            "teacher_val": result.teacher_metrics, "val_curve": curve}


def run_phase(loaded, folder: str, name: str, phase: str, previous, budget_s: float, compress: Callable[[], tuple],
              heal: Callable[[str, nn.Module, float], dict]) -> tuple:
    """``(model, record)`` after ``phase`` of ``name``: reloaded from ``phase_folder(folder, phase)``, or made
    and saved there: ``compress()`` -> ``(model, fields)`` for ``training-free``; else ``heal(phase, student,
    CPU seconds spent so far)`` -> the phase's record, healing ``previous`` (the phase before's ``(model,
    record)``) in place."""
    done = load_phase(folder, phase)
    if done is not None:
        return done
    if phase == "training-free":
        log(f"{name}: compressing")
        small, fields = compress()
        done = small, {"fields": fields, "cpu_s": 0.0, "wall_s": 0.0, "heal": {}}
    else:
        student, before = previous
        spent = before["cpu_s"]
        log(f"{name}: {phase} (healing CPU so far {spent / 60:.1f} min of {budget_s / 60:.0f})")
        record = heal(phase, student, spent)
        done = student, {"fields": before["fields"], "cpu_s": spent + record["cpu_s"],
                         "wall_s": before["wall_s"] + record["wall_s"], "heal": {**before["heal"], phase: record}}
    save_phase(done[0], loaded, folder, phase, done[1])
    return done


def heal_phase(loaded, data_dir, name: str, phase: str, previous, budget_s: float, args) -> tuple:
    """:func:`run_phase` with SmolLM2's compression, reconstruction and distillation."""
    def heal(phase: str, student, spent: float) -> dict:
        if phase == "reconstruct":
            return reconstruct(student, loaded, data_dir, args)
        return distill_phase(student, loaded, name, data_dir, spent, budget_s, args)

    def compress() -> tuple:  # on the CPU (the decompositions' own device); healed and measured on args.device
        loaded.model.cpu()
        small, fields = compress_row(loaded, Recipe.load(name), data_dir)
        loaded.model.to(args.device)
        return small, fields

    model, record = run_phase(loaded, phase_key(name), name, phase, previous, budget_s, compress, heal)
    return model.to(args.device), record


def measure_full(model, loaded, data_dir) -> dict:
    """:func:`causal_lm.measure` of ``model`` on the ``full`` protocol (``wt2-full``, every LAMBADA passage; no
    generation sample), with its wall seconds. Every factored layer runs through its cached dense
    reconstruction (the same function at dense speed: the full protocol is 18x the sweep's WikiText-2 tokens);
    the layers' forward choices are restored after."""
    t0 = time.perf_counter()
    with forward_all(model, RECONSTRUCTED):
        metrics = measure(model, loaded.model, loaded.tokenizer, data_dir, "full")
    return {**{k: v for k, v in metrics.items() if k != "sample"}, "eval_wall_s": time.perf_counter() - t0,
            "forward": RECONSTRUCTED}


def measure_with_full(model, loaded, data_dir, full: bool) -> dict:
    """:func:`causal_lm.measure` of ``model`` against the dense teacher (``sweep``), through every factored
    layer's cached dense reconstruction (through the factored forward, a Kronecker phase took 16 minutes against
    the SVD path's 4); with ``full`` also :func:`measure_full`, under ``full``."""
    with forward_all(model, RECONSTRUCTED):
        metrics = {**measure(model, loaded.model, loaded.tokenizer, data_dir), "forward": RECONSTRUCTED}
    return {**metrics, "full": measure_full(model, loaded, data_dir)} if full else metrics


def add_full(rows: Rows, row: dict, model, loaded, data_dir) -> None:
    """Measure an already written ``row`` on the ``full`` protocol too (a rerun with ``--full-final`` after a run
    without it), and rewrite it with ``full`` added."""
    log(f"{row['recipe']} {row['phase']}: measuring on the full protocol")
    full = measure_full(model, loaded, data_dir)
    rows.put({**row, "full": full})
    log(f"{row['recipe']} {row['phase']}: wt2-full {full['wikitext2_ppl']:.2f}, LAMBADA {full['lambada_acc']:.3f}")


def measure_phase(rows: Rows, loaded, data_dir, name: str, phase: str, done: tuple, budget_s: float,
                  full: bool = False) -> None:
    """Measure the model after ``phase`` (unless its row is in ``rows``) and write its row at once; ``full``:
    also on the ``full`` protocol (``wt2-full``, every LAMBADA passage), as ``full`` (added to a row written
    without it)."""
    model, record = done
    row = rows.get(name, phase)
    if row is not None:
        if full and "full" not in row:
            add_full(rows, row, model, loaded, data_dir)
        return
    log(f"{name}: measuring after {phase} ({record['cpu_s'] / 60:.1f} CPU-min of healing)")
    t0 = time.perf_counter()
    metrics = measure_with_full(model, loaded, data_dir, full)
    rows.put({"recipe": name, "phase": phase, "params": record["fields"]["params"],
              "cpu_minutes": record["cpu_s"] / 60, "wall_minutes": record["wall_s"] / 60,
              "budget_cpu_minutes": budget_s / 60, **metrics, "eval_wall_s": time.perf_counter() - t0,
              "machine": machine(), "compress": record["fields"], "heal": record["heal"]})
    log(f"{name} {phase}: wt2-16k {metrics['wikitext2_ppl']:.2f}, LAMBADA {metrics['lambada_acc']:.3f}")


def run_recipe(rows: Rows, loaded, data_dir, name: str, args) -> None:
    """The phases of ``name`` up to ``args.until``, in order, not yet in ``rows``: heal (or reload), measure, write.

    With ``args.heal_first`` every phase is healed before any is measured, and the last phase is measured
    first (when the machine is slow, the healed rows land before the training-free one). Healing works in
    place, so the model object then holds the last phase's weights: each phase is measured as its folder
    saved it.
    """
    budget_s = 60.0 * BUDGET_CPU_MINUTES.get(name, 60.0)
    done = None
    phases = PHASES[:PHASES.index(args.until) + 1]
    for phase in phases:
        if rows.get(name, phase) is None and seconds_left() < args.phase_reserve_s:
            log(f"{name}: {phase} left out: {seconds_left():.0f} s to the deadline, a phase needs "
                f"{args.phase_reserve_s:.0f}")
            return
        done = heal_phase(loaded, data_dir, name, phase, done, budget_s, args)
        if not args.heal_first:
            measure_phase(rows, loaded, data_dir, name, phase, done, budget_s, args.full_final and phase == phases[-1])
    for phase in reversed(phases if args.heal_first else ()):
        full, row = args.full_final and phase == phases[-1], rows.get(name, phase)
        if row is None or (full and "full" not in row):
            model, record = load_phase(phase_key(name), phase)
            measure_phase(rows, loaded, data_dir, name, phase, (model.to(args.device), record), budget_s, full)


def run_dense(rows: Rows, loaded, data_dir, full: bool = False) -> None:
    """The dense row, measured by the same harness in the same script (``full``: also on ``wt2-full``, added to
    a row written without it)."""
    row = rows.get("dense", "dense")
    if row is not None:
        if full and "full" not in row and borrowed_dense_full(row) is None:
            add_full(rows, row, loaded.model, loaded, data_dir)
        return
    log("dense: measuring")
    t0 = time.perf_counter()
    metrics = measure_with_full(loaded.model, loaded, data_dir, full)
    rows.put({"recipe": "dense", "phase": "dense", "params": sum(p.numel() for p in loaded.model.parameters()),
              "cpu_minutes": 0.0, "wall_minutes": 0.0, **metrics, "eval_wall_s": time.perf_counter() - t0,
              "machine": machine()})


def causal_lm_dense() -> dict | None:
    """The dense row of ``causal_lm.json`` (the same harness and protocols, another run), or None."""
    path = RESULTS / "causal_lm.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return next((r for r in rows if r["recipe"] == "dense"), None)


def dense_reference(data: dict) -> tuple[dict | None, bool]:
    """The dense row of ``data``, else ``causal_lm.json``'s (same harness and protocol; ``True``: borrowed)."""
    dense = next((r for r in data["rows"] if r["recipe"] == "dense"), None)
    if dense is not None:
        return dense, False
    other = causal_lm_dense()
    return other, other is not None


def borrowed_dense_full(row: dict) -> dict | None:
    """``causal_lm.json``'s dense ``full`` metrics when its ``wt2-16k`` perplexity (within 1e-4 relative) and
    LAMBADA accuracy (exactly) agree with the dense ``row``: the same weights on the same harness and machine,
    where measuring the full protocol again (about 35 CPU-bound minutes here) would repeat it; else None."""
    other = causal_lm_dense()
    if (other is None or "full" not in other or other["lambada_acc"] != row["lambada_acc"]
            or abs(other["wikitext2_ppl"] / row["wikitext2_ppl"] - 1) > 1e-4):
        return None
    return other["full"]


def on_gpu(data: dict) -> bool:
    """The JSON was measured at GPU scale (``--device cuda``): costs are wall minutes, the -30% target 1.5x."""
    return data.get("device", "cpu") != "cpu"


def target_x_dense(recipe: str, gpu: bool) -> float:
    """The issue's perplexity target of ``recipe``, as a multiple of dense."""
    return TARGET_X_DENSE.get(recipe, GPU_TARGET_X_DENSE if gpu else 3.0)


def render(data: dict) -> str:
    """The Markdown table of the JSON."""
    dense, borrowed = dense_reference(data)
    dense_full = borrowed_dense_full(dense) if dense and not borrowed and "full" not in dense else None
    gpu = on_gpu(data)
    lines = ["# SmolLM2-135M healed within a CPU budget", "", data["protocol"], "", f"Machine: {data['machine']}.", ""]
    if borrowed:
        lines += [f"Dense is not measured in this file; `x dense` divides by the dense row of `causal_lm.json` (the "
                  f"same harness and protocol, another run on this machine): wt2-16k {dense['wikitext2_ppl']:.2f}, "
                  f"LAMBADA {dense['lambada_acc']:.3f}.", ""]
    cost = "healing CPU-min (process time)" if gpu else "healing CPU-min (budget)"
    lines += [f"| recipe | params | phase | {cost} | wall min | load avg | wt2-16k ppl | x dense | target | "
              "LAMBADA acc | teacher KL | wt2-full ppl |", "|---|---:|---|" + "---:|" * 9]
    order = list(dict.fromkeys(r["recipe"] for r in data["rows"]))  # dense first, then recipes, phases in order
    for r in sorted(data["rows"], key=lambda r: (r["recipe"] != "dense", order.index(r["recipe"]),
                                                 PHASES.index(r["phase"]) if r["phase"] in PHASES else 0)):
        ratio = r["wikitext2_ppl"] / dense["wikitext2_ppl"] if dense else None
        if r["recipe"] == "dense":
            budget = load = target = "-"
        else:
            heal = r["heal"].get(r["phase"], {})
            budget = f"{r['cpu_minutes']:.1f} ({r['budget_cpu_minutes']:.0f})"
            load = f"{heal['load_before']:.1f}-{heal['load_after']:.1f}" if heal else "-"
            limit = target_x_dense(r["recipe"], gpu)
            target = f"<= {limit}x: {'met' if ratio is not None and ratio <= limit else 'missed'}"
            budget = f"{r['cpu_minutes']:.1f}" if gpu else budget
            budget = budget if r["phase"] != "training-free" else "0"
        full = (f"{r['full']['wikitext2_ppl']:,.2f}" if "full" in r else
                f"{dense_full['wikitext2_ppl']:,.2f} (causal_lm.json)" if r is dense and dense_full else "-")
        lines.append(f"| {r['recipe']} | {r['params']:,} | {r['phase']} | {budget} | {r['wall_minutes']:.1f} | "
                     f"{load} | {r['wikitext2_ppl']:,.2f} | {'-' if ratio is None else f'{ratio:,.2f}'} | {target} | "
                     f"{r['lambada_acc']:.3f} | {r['teacher_kl']:.3f} | {full} |")
    if dense_full:
        lines += ["", "Dense `wt2-full` marked (causal_lm.json) is that file's dense row: the same weights, harness "
                  "and machine, whose `wt2-16k` perplexity and LAMBADA accuracy agree with this file's dense row "
                  "within 1e-4 relative (so the full protocol was not measured a second time)."]
    lines += ["", "Healing settings and per-phase costs are in the JSON (`heal`: reconstruction config, per-block "
              "held-out MSE before and after, distillation config, steps and held-out curve).", "",
              "Greedy continuations of 'The capital of France is':", ""]
    lines += [f"- {r['recipe']} ({r['phase']}): {r['sample']!r}" for r in data["rows"] if "sample" in r]
    return "\n".join(lines) + "\n"


def plot_phases(data: dict, path: Path, metric: str, fmt: str, ylabel: str, title: str, *, dense: dict | None = None,
                log_scale: bool = False, targets: tuple[float, ...] = (), budget: float | None = None,
                cost: str = "cpu_minutes") -> None:
    """``metric`` of every phase against healing minutes (the rows' ``cost``: ``cpu_minutes``, or
    ``wall_minutes`` at GPU scale), one line per recipe (points labelled with ``fmt``), ``dense`` (a row) as a
    dashed line, each of ``targets`` as a dotted line, ``budget`` (CPU minutes) as a red one."""
    import matplotlib  # noqa: PLC0415  (only to draw)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    recipes = list(dict.fromkeys(r["recipe"] for r in data["rows"] if r["recipe"] != "dense"))
    for name in recipes:
        points = sorted((PHASES.index(r["phase"]), r[cost], r[metric])
                        for r in data["rows"] if r["recipe"] == name)
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=name.replace("smollm2-", ""))
        for _, x, y in points:
            ax.annotate(format(y, fmt), (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    if dense is not None:
        ax.axhline(dense[metric], color="gray", linestyle="--", label=f"dense {dense[metric]:.4g}")
    for value in sorted(set(targets)):
        ax.axhline(value, color="gray", linestyle=":", linewidth=0.8)
        ax.annotate(f"target {value}", (0, value), fontsize=7, xytext=(2, 2), textcoords="offset points")
    if budget is not None:
        ax.axvline(budget, color="red", linestyle=":", linewidth=0.8, label="CPU budget")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("healing CPU minutes (process time; reconstruction, then distillation)" if cost == "cpu_minutes"
                  else "healing wall minutes on the GPU (reconstruction, then distillation)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(data: dict, path: Path) -> None:
    """wt2-16k perplexity (log scale) against healing CPU minutes, one line per recipe, dense as a line
    (:func:`dense_reference`)."""
    gpu = on_gpu(data)
    plot_phases(data, path, "wikitext2_ppl", ",.1f", "WikiText-2 perplexity (wt2-16k, log scale)",
                f"SmolLM2-135M{' at GPU scale' if gpu else ''}: training-free -> reconstruction -> distillation",
                dense=dense_reference(data)[0], log_scale=True, cost="wall_minutes" if gpu else "cpu_minutes")


def write_outputs(path: Path, render=render, plot=plot) -> str:
    """The Markdown (``render(data)``) and PNG (``plot(data, path)``) of the JSON ``path``, each written to a
    temporary name, then renamed; returns the Markdown."""
    data = json.loads(path.read_text())
    text = render(data)
    md, png = path.with_suffix(".md"), path.with_suffix(".png")
    md.with_suffix(".md.tmp").write_text(text)
    os.replace(md.with_suffix(".md.tmp"), md)
    plot(data, png.with_suffix(".tmp.png"))
    os.replace(png.with_suffix(".tmp.png"), png)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", "../shared/data"))
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rec-samples", type=int, default=64, help="calibration blocks of reconstruction")
    parser.add_argument("--rec-length", type=int, default=256, help="tokens per calibration block")
    parser.add_argument("--rec-batch", type=int, default=4)
    parser.add_argument("--rec-steps", type=int, default=150, help="Adam steps per block at most")
    parser.add_argument("--rec-eval-every", type=int, default=10)
    parser.add_argument("--rec-lr", type=float, default=1e-3)
    parser.add_argument("--rec-block-s", type=float, default=20.0, help="wall seconds per block at most")
    parser.add_argument("--kd-steps", type=int, default=100)
    parser.add_argument("--kd-batch", type=int, default=4)
    parser.add_argument("--kd-seq-len", type=int, default=256)
    parser.add_argument("--kd-lr", type=float, default=2e-4)
    parser.add_argument("--kd-eval-every", type=int, default=25)
    parser.add_argument("--kd-val-blocks", type=int, default=16)
    parser.add_argument("--kd-topk", type=int, default=64, help="teacher store's k (0: the live teacher)")
    parser.add_argument("--kd-wall-s", type=float, default=600.0,
                        help="on a GPU: wall seconds of distillation at most (a CPU sizes it by CPU minutes)")
    parser.add_argument("--teacher-cpu-s-per-token", type=float, default=0.01,
                        help="estimated CPU seconds of one teacher token (the store's pass), to size the budget")
    parser.add_argument("--student-cpu-s-per-token", type=float, default=0.015,
                        help="estimated CPU seconds of one training token (student forward and backward)")
    parser.add_argument("--until", default=PHASES[-1], choices=PHASES,
                        help="the last phase to reach (with every phase before it)")
    parser.add_argument("--heal-first", action="store_true",
                        help="heal every phase before measuring any; measure the last phase first")
    parser.add_argument("--device", default="cpu", help="where healing and evaluation run (cpu, cuda)")
    parser.add_argument("--json", type=Path, default=RESULTS / "heal_causal_lm.json", help="the results file")
    parser.add_argument("--full-final", action="store_true",
                        help="also measure the last phase (and dense) on wt2-full and every LAMBADA passage")
    parser.add_argument("--deadline-s", type=float, default=None, help="wall seconds the whole run may take")
    parser.add_argument("--phase-reserve-s", type=float, default=0.0,
                        help="with --deadline-s: a phase starts only with this many seconds left")
    parser.add_argument("--eval-reserve-s", type=float, default=60.0,
                        help="on a GPU: seconds kept for measuring after distillation")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = args.json
    if args.deadline_s is not None:
        DEADLINE[0] = time.perf_counter() + args.deadline_s
    SETTINGS.update({k: v for k, v in vars(args).items() if k.startswith(("rec_", "kd_", "teacher_", "student_"))
                     or k in ("threads", "device")})
    if not args.render_only:
        torch.set_num_threads(args.threads)
        loaded = load_model(MODEL, data_dir=args.data_dir)
        loaded.model.to(args.device)
        rows = Rows(path, {"protocol": __doc__.split("Run:")[0].strip(), "model": loaded.notes[0],
                           "machine": machine(), "device": args.device, "threads": args.threads,
                           "settings": SETTINGS})
        for n, name in enumerate(args.recipes):
            run_recipe(rows, loaded, args.data_dir, name, args)
            write_outputs(path)
            if n == 0:
                run_dense(rows, loaded, args.data_dir, args.full_final)
                write_outputs(path)
    print(write_outputs(path))


if __name__ == "__main__":
    main()
