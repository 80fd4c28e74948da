"""The main job: load, evaluate, compress (stage by stage), evaluate again, save, report."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from tensorlm.errors import TensorLMError
from tensorlm.io import atomic_folder, write_compressed
from tensorlm.models import LoadedModel, load_model
from tensorlm.params import compression_summary, count_parameters
from tensorlm.recipe import Recipe
from tensorlm.report import render
from tensorlm.surgery import compress

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_RECIPE = "minilm-kronecker-ffn"
AGREEMENT_SENTENCES = 500
AGREEMENT_TOKENS = 8192


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (load average "
            f"{os.getloadavg()[0]:.1f} at the time), torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}")


def log(message: str) -> None:
    print(f"[tensorlm] {message}", file=sys.stderr, flush=True)


def evaluate(loaded: LoadedModel, model, data_dir, mode: str) -> tuple[dict, dict]:
    """Standard metrics of ``model`` (``mode``: full, quick or none)."""
    if mode == "none":
        return {}, {}
    from tensorlm.evaluate import evaluate_model

    return evaluate_model(model, loaded.tokenizer, loaded.kind, data_dir=data_dir, quick=mode == "quick")


def agreement(loaded: LoadedModel, student, data_dir, mode: str) -> tuple[dict, dict]:
    """Student-teacher agreement: mean embedding cosine (encoders) or per-token KL (causal LMs)."""
    if mode == "none":
        return {}, {}
    from tensorlm.data import load_sts, load_wikitext2_test
    from tensorlm.evaluate.agreement import causal_kl, embedding_agreement

    if loaded.kind == "encoder":
        pairs = load_sts("stsb", "dev", data_dir)
        sentences = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))[:AGREEMENT_SENTENCES]
        value = embedding_agreement(student, loaded.model, loaded.tokenizer, sentences)
        return ({"teacher_cosine": value},
                {"teacher_cosine": f"mean cosine of student and teacher mean-pooled embeddings, first "
                                   f"{len(sentences)} unique STS-B dev sentences"})
    value = causal_kl(student, loaded.model, loaded.tokenizer, load_wikitext2_test(data_dir),
                      max_tokens=AGREEMENT_TOKENS)
    return ({"teacher_kl": value},
            {"teacher_kl": f"KL(teacher || student) per token in nats, first {AGREEMENT_TOKENS:,} tokens of "
                           "wikitext-2-raw test, context 1024 chunks"})


def distill_stage(loaded: LoadedModel, student, stage, work: Path, data_dir, resume: bool) -> dict:
    """Run a stage's ``distill:`` block on ``student`` against the uncompressed model (TQ's iterative scheme).

    Checkpoints live in ``work/distill-<stage>`` so an interrupted run continues with ``resume``.
    Model selection uses the trainer's held-out validation (never a test split).
    """
    from tensorlm.distill import DistillConfig, distill

    config = DistillConfig.from_dict({"data_dir": str(data_dir) if data_dir else None, **stage.distill})
    log(f"stage {stage.name}: distilling ({config.steps} steps at most)")
    result = distill(student, loaded.model, loaded.tokenizer, config, work / f"distill-{stage.name}",
                     kind=loaded.kind, resume=resume)
    return {"steps": result.steps, "best_step": result.best_step, "metric": result.metric,
            "best_metric": result.best_metric, "stopped": result.stopped}


def run(model: str | None = None, recipe: str | Recipe = DEFAULT_RECIPE, out: str | os.PathLike | None = None, *,
        data_dir: str | os.PathLike | None = None, eval_mode: str = "full", overwrite: bool = False,
        resume: bool = False) -> dict:
    """Compress ``model`` by ``recipe``, measure both models in one harness, and write a run folder.

    The folder ``out`` (default ``runs/<recipe>-<model>-<time>``) receives the compressed model
    (:func:`tensorlm.io.write_compressed`), ``results.json`` and ``report.md``; it is written to a
    temporary folder and renamed at the end. Stages with a ``distill:`` block are distilled right after
    they are compressed, and such an iterative recipe is evaluated after each stage (quick subsets for
    causal LMs); distillation checkpoints live in ``<out>.partial/`` until the run completes, and
    ``resume`` continues them after an interruption. ``seconds.compress`` counts the decompositions
    alone; distillation and per-stage evaluation are timed apart.

    Returns:
        The results dictionary (also in ``results.json``): ``model``, ``recipe``, ``params.before``,
        ``params.after``, ``compression``, ``metrics.before``, ``metrics.after``, ``protocols``, ...

    Raises:
        TensorLMError: an unknown model or recipe, an existing output folder, bad recipe targets.
    """
    if eval_mode not in ("full", "quick", "none"):
        raise TensorLMError(f"eval mode {eval_mode!r} is not one of full, quick, none")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    model = model or recipe.model or DEFAULT_MODEL
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out else Path("runs") / f"{recipe.name}-{Path(model).name}-{stamp}"
    if out.exists() and not overwrite:
        raise TensorLMError(f"output folder {out} already exists; choose another or pass --overwrite")
    seconds = {}
    log(f"loading {model}")
    loaded = load_model(model, data_dir=data_dir)
    log(f"evaluating the uncompressed model ({eval_mode})")
    t0 = time.perf_counter()
    before, protocols = evaluate(loaded, loaded.model, data_dir, eval_mode)
    seconds["evaluate_before"] = time.perf_counter() - t0
    log(f"compressing with recipe {recipe.name}")
    stages = []
    work = Path(f"{out}.partial")
    per_stage = any(s.distill is not None for s in recipe.stages) and eval_mode != "none"
    seconds["distill_and_stage_evaluation"] = 0.0

    def after_stage(student, stage, names):
        t_stage = time.perf_counter()
        record = {"name": stage.name, "method": stage.method, "replaced": names}
        if stage.distill is not None:
            record["distill"] = distill_stage(loaded, student, stage, work, data_dir, resume)
        if per_stage:
            record["metrics"] = evaluate(loaded, student, data_dir, "quick")[0]
        stages.append(record)
        seconds["distill_and_stage_evaluation"] += time.perf_counter() - t_stage

    t0 = time.perf_counter()
    small = compress(loaded.model, recipe, after_stage=after_stage)
    seconds["compress"] = time.perf_counter() - t0 - seconds["distill_and_stage_evaluation"]
    replaced = [n for s in stages for n in s["replaced"]]
    log(f"compressed {len(replaced)} modules in {seconds['compress']:.1f} s; evaluating the compressed model")
    t0 = time.perf_counter()
    after, _ = evaluate(loaded, small, data_dir, eval_mode)
    agree, agree_protocols = agreement(loaded, small, data_dir, eval_mode)
    seconds["evaluate_after"] = time.perf_counter() - t0
    top_level = [n for n in replaced if not any(n.startswith(p + ".") for p in replaced)]
    params_before = count_parameters(loaded.model, top_level)
    params_after = count_parameters(small, top_level)
    results = {
        "model": model,
        "kind": loaded.kind,
        "recipe": recipe.to_dict(),
        "params": {"before": params_before, "after": params_after},
        "compression": compression_summary(params_before, params_after),
        "metrics": {"before": before, "after": after, "agreement": agree},
        "protocols": {**protocols, **agree_protocols},
        "replaced": replaced,
        "stages": stages,
        "seconds": seconds,
        "notes": loaded.notes,
        "machine": machine(),
    }
    with atomic_folder(out, overwrite=overwrite) as tmp:
        write_compressed(small, tmp, tokenizer=loaded.tokenizer, kind=loaded.kind, recipe=recipe, notes=loaded.notes)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        (tmp / "report.md").write_text(render(results))
        for log_file in work.glob("distill-*/metrics.jsonl"):
            (tmp / f"{log_file.parent.name}.jsonl").write_text(log_file.read_text())
    if work.exists():
        shutil.rmtree(work)
    results["out"] = str(out)
    return results
