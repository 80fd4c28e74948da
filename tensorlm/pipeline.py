"""The main job: load, evaluate, compress (stage by stage), evaluate again, save, report.

Each step is one function; :func:`run` strings them together and :class:`RunResults` is what they
produce, written to ``results.json`` and rendered to ``report.md``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tensorlm.allocate import allocate
from tensorlm.data import load_sts
from tensorlm.distill import DistillConfig, distill
from tensorlm.errors import TensorLMError
from tensorlm.evaluate import MODES, agreement, evaluate_model
from tensorlm.evaluate.generation import SAMPLE_PROMPT, greedy_sample
from tensorlm.files import refuse_existing
from tensorlm.heal.schedule import PhaseLog
from tensorlm.heal.stage import check_heal_plan, reconstruct_stage
from tensorlm.io import add_results_to_card, atomic_folder, write_compressed
from tensorlm.models import LoadedModel, load_model
from tensorlm.params import compression_summary, count_parameters
from tensorlm.preflight import check_run
from tensorlm.recipe import Recipe
from tensorlm.report import render, results_dict, results_json
from tensorlm.surgery import calibrate, compress, plan_recipe
from tensorlm.version import __version__

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_RECIPE = "smollm2-svd-llm-10"
EVAL_MODES = (*MODES, "none")
AGREEMENT_SENTENCES = 500


def machine(load: bool = True) -> str:
    """A one-line description of where the numbers were measured; with ``load`` False, for rows measured over
    hours that carry their own load average and torch threads, it says so instead of giving them now."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    now = (f"load average {os.getloadavg()[0]:.1f} at the time" if load
           else "the load average and torch threads of each row are stored with it")
    threads = f" with {torch.get_num_threads()} threads" if load else ""
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores ({now}){gpu}, "
            f"torch {torch.__version__}{threads}, Python {platform.python_version()}")


def log(message: str) -> None:
    print(f"[tensorlm] {message}", file=sys.stderr, flush=True)


@dataclass
class RunResults:
    """What a run measured; ``results.json`` is :meth:`to_dict`, ``report.md`` is its rendering.

    ``metrics`` holds ``before``, ``after`` (same keys) and ``agreement``; ``protocols`` names the
    protocol of every metric; ``samples`` holds the greedy generation of both models (causal LMs);
    ``seconds`` the wall time of each step; ``params`` the accounting of both models
    (:func:`tensorlm.params.count_parameters`); ``plan`` the plan that was built (after any budget
    allocation); ``calibration`` the cost of the calibration pass (tokens, seconds, memory), if any.
    """

    model: str
    kind: str
    recipe: dict
    eval_mode: str
    params: dict = field(default_factory=dict)
    compression: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=lambda: {"before": {}, "after": {}, "agreement": {}})
    protocols: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    replaced: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    random_weights: bool = False
    metrics_notes: dict = field(default_factory=dict)
    machine: str = ""
    tensorlm_version: str = ""
    out: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(loaded: LoadedModel, model, data_dir, mode: str) -> tuple[dict, dict]:
    """Standard metrics of ``model`` (``mode``: one of :data:`EVAL_MODES`)."""
    if mode == "none":
        return {}, {}
    return evaluate_model(model, loaded.tokenizer, loaded.kind, data_dir=data_dir, mode=mode)


def measure_agreement(loaded: LoadedModel, student, data_dir, mode: str) -> tuple[dict, dict]:
    """Student-teacher agreement: mean embedding cosine (encoders, STS-B dev sentences) or per-token KL
    (causal LMs, held-out ``lm_text``)."""
    if mode == "none":
        return {}, {}
    sentences = None
    if loaded.kind == "encoder":
        pairs = load_sts("stsb", "dev", data_dir)
        sentences = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))[:AGREEMENT_SENTENCES]
    return agreement(student, loaded.model, loaded.tokenizer, loaded.kind, data_dir=data_dir, mode=mode,
                     sentences=sentences)


def sample(loaded: LoadedModel, model, mode: str) -> str | None:
    """The greedy continuation of :data:`~tensorlm.evaluate.generation.SAMPLE_PROMPT` (causal LMs only)."""
    if mode == "none" or loaded.kind != "causal-lm":
        return None
    return greedy_sample(model, loaded.tokenizer)


def distill_stage(loaded: LoadedModel, student, stage, work: Path, data_dir, resume: bool) -> dict:
    """Run a stage's ``distill:`` block on ``student`` against the uncompressed model (TQ's iterative scheme).

    Checkpoints live in ``work/distill-<stage>`` so an interrupted run continues with ``resume``.
    Model selection uses the trainer's held-out validation (never a test split).
    """
    config = DistillConfig.from_dict({"data_dir": str(data_dir) if data_dir else None, **stage.distill})
    log(f"stage {stage.name}: distilling ({config.steps} steps at most)")
    result = distill(student, loaded.model, loaded.tokenizer, config, work / f"distill-{stage.name}",
                     kind=loaded.kind, resume=resume)
    return {"steps": result.steps, "best_step": result.best_step, "metric": result.metric,
            "best_metric": result.best_metric, "stopped": result.stopped}


def output_folder(out, recipe: Recipe, model: str, overwrite: bool) -> Path:
    """The run folder: ``out``, or ``runs/<recipe>-<model>-<time>``, checked before any model is loaded.

    Raises:
        TensorLMError: what :func:`tensorlm.files.refuse_existing` raises (an existing folder without
            ``overwrite``, one tensorlm did not write, the input model or a parent of it, the current directory).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out else Path("runs") / f"{recipe.name}-{Path(model).name}-{stamp}"
    refuse_existing(out, overwrite, inputs=[model])
    return out


def plan_and_calibrate(loaded: LoadedModel, recipe: Recipe, results: RunResults, data_dir):
    """The recipe's plan on the model, after the calibration pass and budget allocation; printed before any
    decomposition. Returns ``(plan, stats)``; fills ``results.plan``, ``results.calibration`` and the
    ``calibrate`` / ``allocate`` seconds."""
    plan = plan_recipe(loaded.model, recipe)
    check_heal_plan(loaded.model, recipe, plan, loaded.kind)  # a bad heal block is refused before calibration
    stats = None
    if recipe.calibrated:
        log("calibration pass (input second moments on training text)")
        t0 = time.perf_counter()
        stats = calibrate(loaded.model, recipe, plan, loaded.tokenizer, loaded.kind, data_dir)
        results.seconds["calibrate"] = time.perf_counter() - t0
        results.calibration = {"tokens": stats.tokens, "seconds": stats.seconds, "cached": stats.cached,
                               "peak_rss_mb": stats.peak_rss_mb, "accumulator_mb": stats.accumulator_mb}
    if any(s.budget is not None for s in recipe.stages):
        t0 = time.perf_counter()
        plan = allocate(loaded.model, plan, recipe, stats)
        results.seconds["allocate"] = time.perf_counter() - t0
    log("plan:\n" + plan.table())
    results.plan = plan.to_dict()
    return plan, stats


def compress_and_heal(loaded: LoadedModel, recipe: Recipe, results: RunResults, work: Path, data_dir,
                      resume: bool):
    """Compress ``loaded.model`` by ``recipe`` (a copy), distilling after each stage with a ``distill:`` block.

    An iterative (distilled) recipe is evaluated after each stage on the quick protocol. Each finished heal
    phase (reconstruct, distill) is recorded in ``work`` (:class:`tensorlm.heal.schedule.PhaseLog`); with
    ``resume`` the recorded ones are restored instead of run, so a killed run resumes to the same weights. Fills
    ``results.stages``, ``results.replaced`` and the ``compress`` / ``distill_and_stage_evaluation``
    seconds (the decompositions alone count as compression; calibration and allocation are timed apart).
    """
    plan, stats = plan_and_calibrate(loaded, recipe, results, data_dir)
    per_stage = any(s.distill is not None for s in recipe.stages) and results.eval_mode != "none"
    results.seconds["distill_and_stage_evaluation"] = 0.0
    phases = PhaseLog(work, recipe.to_dict(), resume=resume)

    def after_stage(student, stage, names):
        t_stage = time.perf_counter()
        record = {"name": stage.name, "method": stage.method, "replaced": names}
        if stage.heal is not None and stage.heal.reconstruct is not None:
            log(f"stage {stage.name}: reconstruction against the uncompressed model (token table, then blocks)")
            record["reconstruct"] = phases.run(stage.name, "reconstruct", student, lambda: reconstruct_stage(
                student, loaded.model, loaded.tokenizer, loaded.kind, stage, recipe.calibration, data_dir, log=log))
        if stage.distill is not None:
            record["distill"] = phases.run(stage.name, "distill", student, lambda: distill_stage(
                loaded, student, stage, work, data_dir, resume))
        if per_stage:
            record["metrics"] = evaluate(loaded, student, data_dir, "quick")[0]
        results.stages.append(record)
        results.seconds["distill_and_stage_evaluation"] += time.perf_counter() - t_stage

    t0 = time.perf_counter()
    small = compress(loaded.model, recipe, after_stage=after_stage, plan=plan, stats=stats,
                     progress=sys.stderr.isatty())  # bars only on a terminal
    results.seconds["compress"] = time.perf_counter() - t0 - results.seconds["distill_and_stage_evaluation"]
    results.replaced = [n for s in results.stages for n in s["replaced"]]
    return small


def account(loaded: LoadedModel, small, results: RunResults) -> None:
    """Parameter tables of both models and their ratios, into ``results``."""
    top_level = [n for n in results.replaced if not any(n.startswith(p + ".") for p in results.replaced)]
    before, after = count_parameters(loaded.model, top_level), count_parameters(small, top_level)
    results.params = {"before": before, "after": after}
    results.compression = compression_summary(before, after)


def write_run(out: Path, small, loaded: LoadedModel, recipe: Recipe, results: RunResults, work: Path,
              overwrite: bool) -> None:
    """The run folder, written atomically: compressed model, ``results.json``, ``report.md``, distill logs."""
    with atomic_folder(out, overwrite=overwrite, inputs=[loaded.name]) as tmp:
        write_compressed(small, tmp, tokenizer=loaded.tokenizer, kind=loaded.kind, recipe=recipe, notes=loaded.notes)
        (tmp / "results.json").write_text(results_json(results))
        add_results_to_card(tmp, results_dict(results))
        (tmp / "report.md").write_text(render(results))
        for log_file in work.glob("distill-*/metrics.jsonl"):
            (tmp / f"{log_file.parent.name}.jsonl").write_text(log_file.read_text())
    if work.exists():
        shutil.rmtree(work)


def run(model: str | None = None, recipe: str | Recipe = DEFAULT_RECIPE, out: str | os.PathLike | None = None, *,
        data_dir: str | os.PathLike | None = None, eval_mode: str = "quick", overwrite: bool = False,
        resume: bool = False, dtype: str = "float32", restart: bool = False, device: str | None = None,
        seed: int | None = None) -> RunResults:
    """Compress ``model`` by ``recipe``, measure both models in one harness, and write a run folder.

    The folder ``out`` (default ``runs/<recipe>-<model>-<time>``) receives the compressed model
    (:func:`tensorlm.io.write_compressed`), ``results.json`` and ``report.md``; it is written to a
    temporary folder and renamed at the end. Stages with a ``distill:`` block are distilled right after
    they are compressed (:func:`compress_and_heal`); distillation checkpoints live in ``<out>.partial/``
    until the run completes, and ``resume`` continues them after an interruption.

    Args:
        eval_mode: ``quick`` (default), ``sweep``, ``full`` (:data:`tensorlm.evaluate.CAUSAL_PROTOCOLS`; encoders
            score their full sets in every mode) or ``none``.
        dtype: ``float32`` or ``bfloat16``, the dtype the model is loaded in.
        restart: delete a stale ``<out>.partial`` work folder first (``resume`` continues it instead).
        device: ``cpu``, ``cuda`` or ``cuda:N``, where the models run (default: where they load).
        seed: seeds Python, NumPy and torch before compressing (the permutation search, distillation).

    Raises:
        TensorLMError: an unknown model, recipe or eval mode, an existing output folder, bad recipe targets;
            before loading: an unavailable device, a stale ``<out>.partial`` without ``resume`` or
            ``restart``, a missing benchmark file of the eval mode.
    """
    if eval_mode not in EVAL_MODES:
        raise TensorLMError(f"eval mode {eval_mode!r} is not one of {', '.join(EVAL_MODES)}")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    model = model or recipe.model or DEFAULT_MODEL
    out = output_folder(out, recipe, model, overwrite)
    work = Path(f"{out}.partial")
    target = check_run(work, model, eval_mode, data_dir, resume=resume, restart=restart, device=device, seed=seed)
    log(f"loading {model}")
    loaded = load_model(model, data_dir=data_dir, dtype=dtype)
    if target is not None:
        loaded.model.to(target)
    results = RunResults(model, loaded.kind, recipe.to_dict(), eval_mode, notes=loaded.notes,
                         random_weights=loaded.random_weights, tensorlm_version=__version__)
    log(f"evaluating the uncompressed model ({eval_mode})")
    t0 = time.perf_counter()
    results.metrics["before"], results.protocols = evaluate(loaded, loaded.model, data_dir, eval_mode)
    before_sample = sample(loaded, loaded.model, eval_mode)
    results.seconds["evaluate_before"] = time.perf_counter() - t0
    log(f"compressing with recipe {recipe.name}")
    small = compress_and_heal(loaded, recipe, results, work, data_dir, resume)
    log(f"compressed {len(results.replaced)} modules in {results.seconds['compress']:.1f} s; "
        "evaluating the compressed model")
    t0 = time.perf_counter()
    results.metrics["after"], _ = evaluate(loaded, small, data_dir, eval_mode)
    results.metrics["agreement"], agree_protocols = measure_agreement(loaded, small, data_dir, eval_mode)
    results.protocols.update(agree_protocols)
    if before_sample is not None:
        results.samples = {"prompt": SAMPLE_PROMPT, "before": before_sample, "after": sample(loaded, small, eval_mode)}
    results.seconds["evaluate_after"] = time.perf_counter() - t0
    account(loaded, small, results)
    results.machine = machine()
    write_run(out, small, loaded, recipe, results, work, overwrite)
    results.out = str(out)
    return results
