"""Command line: ``tensorlm run | compress | distill | export | evaluate | inspect | plan | recipes``.

A thin layer over the API. Bad input prints one line, ``tensorlm: error: ...``, and exits 2; a file
system error (an unwritable or impossible path) prints one line and exits 1; Ctrl-C or SIGTERM prints
``tensorlm: interrupted`` and exits 130 (143 for SIGTERM), after temporary folders are removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import huggingface_hub
import torch
import transformers
import yaml
from accelerate import PartialState

from tensorlm.distill import DistillConfig, distill
from tensorlm.errors import TensorLMError
from tensorlm.evaluate import evaluate_model
from tensorlm.files import MANIFEST, Terminated, raise_on_sigterm, refuse_existing
from tensorlm.io import export_dense, replaced_modules, save_compressed
from tensorlm.models import load_model
from tensorlm.params import count_parameters
from tensorlm.pipeline import DEFAULT_RECIPE, run
from tensorlm.preflight import accelerate_on, check_device, check_work_folder, seed_everything
from tensorlm.recipe import Recipe, builtin_recipes, recipe_path
from tensorlm.report import json_text, metrics_table, null_non_finite, params_table, ratio_phrase, results_dict
from tensorlm.shards import INDEX, SINGLE, is_checkpoint
from tensorlm.stream import compress_streaming, streaming_refusal
from tensorlm.surgery import compress, plan_reads_weights, plan_recipe
from tensorlm.version import __version__

OVERWRITE_HELP = ("replace an existing output folder, only if tensorlm wrote it (never the input model, one of "
                  "its parents or the current directory)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="benchmark data folder laid out like shared/data (default: $TENSORLM_DATA)")


def _add_device(p: argparse.ArgumentParser, seed: str | None = None) -> None:
    """``--device`` and, when ``seed`` says what it seeds, ``--seed``."""
    p.add_argument("--device", help="where the model runs: cpu, cuda or cuda:N (default: where it loads, the CPU; "
                                    "refused before loading when the machine lacks it)")
    if seed:
        p.add_argument("--seed", type=int, help=f"seed of Python, NumPy and torch ({seed})")


def _moved(loaded, device):
    """``loaded`` with its model on ``device`` (a checked ``torch.device`` or None: left where it is)."""
    if device is not None:
        loaded.model.to(device)
    return loaded


def cmd_run(args) -> None:
    results = run(args.model, args.recipe, args.out, data_dir=args.data_dir, eval_mode=args.eval,
                  overwrite=args.overwrite, resume=args.resume, dtype=args.dtype, restart=args.restart,
                  device=args.device, seed=args.seed)
    metrics = results_dict(results)["metrics"]
    print(metrics_table(metrics["before"], {**metrics["after"]}) if metrics["before"] else "(not evaluated)")
    for key, value in metrics["agreement"].items():
        print(f"{key}: {'n/a (could not be computed)' if value is None else f'{value:.4f}'}")
    if results.samples:
        print(f"greedy {results.samples['prompt']!r} -> uncompressed {results.samples['before']!r}, "
              f"compressed {results.samples['after']!r}")
    print()
    print(params_table(results.params["before"], results.params["after"]))
    print(f"\ncompression took {results.seconds['compress']:.1f} s; "
          f"whole model {ratio_phrase(results.compression['model_ratio'])}")
    print(f"wrote {results.out} (model.safetensors, tensorlm.json, results.json, report.md)")


def _streams(model: str, recipe: Recipe, mode: str) -> bool:
    """Whether ``tensorlm compress`` streams (``--stream auto|on|off``): ``auto`` when ``model`` is a local
    safetensors folder (not a compressed one) and the recipe can stream.

    Raises:
        TensorLMError: ``on`` for a model that is no such folder or a recipe that cannot stream (the reason).
    """
    folder = Path(model).expanduser()
    is_folder = folder.is_dir() and not (folder / MANIFEST).exists() and is_checkpoint(folder)
    if mode == "off" or (mode == "auto" and not is_folder):
        return False
    reason = streaming_refusal(recipe)
    if mode == "on" and not is_folder:
        reason = f"--stream on: {model!r} is not a folder with {INDEX} or {SINGLE} (and config.json)"
    if reason and mode == "on":
        raise TensorLMError(reason)
    return reason is None


def cmd_compress(args) -> None:
    recipe = Recipe.load(args.recipe)
    model = args.model or recipe.model
    refuse_existing(args.out, args.overwrite, inputs=[model])  # before the compression, not after
    device = check_device(args.device)
    seed_everything(args.seed)
    if _streams(model, recipe, args.stream):
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        result = compress_streaming(model, recipe, args.out, device=device, dtype=dtype, overwrite=args.overwrite,
                                    progress=sys.stderr.isatty(), data_dir=args.data_dir)
        print(f"wrote {args.out} ({len(result.module_seconds)} modules streamed from {result.checkpoint_bytes:,} "
              f"bytes of shards in {result.seconds:.1f} s)")
        return
    loaded = _moved(load_model(model, data_dir=args.data_dir, dtype=args.dtype or "float32"), device)
    small = compress(loaded.model, recipe, progress=sys.stderr.isatty())
    save_compressed(small, args.out, tokenizer=loaded.tokenizer, kind=loaded.kind, recipe=recipe,
                    notes=loaded.notes, overwrite=args.overwrite, inputs=[model])
    print(f"wrote {args.out}")


def distill_options(path: str | None, data_dir: str | None, steps: int | None, seed: int | None = None
                    ) -> DistillConfig:
    """The distillation config of ``tensorlm distill``: the YAML file ``path`` with ``--steps`` and ``--seed``
    laid over it.

    Raises:
        TensorLMError: a missing or unreadable file, invalid YAML, not a mapping, an unknown key or a bad
            value (:meth:`DistillConfig.from_dict`), ``steps`` below 1.
    """
    if steps is not None and steps < 1:
        raise TensorLMError(f"--steps {steps}: distillation needs at least 1 optimizer step")
    options = {}
    if path:
        try:
            options = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise TensorLMError(f"distill config {path}: {err.strerror or err}") from err
        except yaml.YAMLError as err:
            raise TensorLMError(f"distill config {path}: invalid YAML: {' '.join(str(err).split())}") from err
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise TensorLMError(f"distill config {path} must be a mapping of DistillConfig fields, "
                                f"got a {type(options).__name__}")
    laid = {**({} if steps is None else {"steps": steps}), **({} if seed is None else {"seed": seed})}
    return DistillConfig.from_dict({"data_dir": data_dir, **options, **laid})


def cmd_distill(args) -> None:
    refuse_existing(args.out, args.overwrite, inputs=[args.student, args.teacher])
    config = distill_options(args.config, args.data_dir, args.steps, args.seed)
    device = check_device(args.device)
    work = args.work or f"{args.out}.partial"
    check_work_folder(work, args.resume, args.restart)
    seed_everything(args.seed)
    student = load_model(args.student, data_dir=args.data_dir)
    teacher = load_model(args.teacher, data_dir=args.data_dir)
    if student.kind != teacher.kind:
        raise TensorLMError(f"student {args.student!r} is a {student.kind} but teacher {args.teacher!r} is a "
                            f"{teacher.kind}")
    with accelerate_on(device):
        result = distill(student.model, teacher.model, teacher.tokenizer, config, work,
                         kind=teacher.kind, resume=args.resume, progress=sys.stderr.isatty())
    if not PartialState().is_main_process:  # under accelerate launch, one process saves
        return
    save_compressed(student.model, args.out, tokenizer=student.tokenizer, kind=student.kind,
                    notes=[*student.notes, f"distilled from {args.teacher}: best {result.metric} "
                           f"{result.best_metric:.4f} at step {result.best_step} of {result.steps}"],
                    overwrite=args.overwrite, inputs=[args.student, args.teacher])
    print(f"best {result.metric} {result.best_metric:.4f} at step {result.best_step}; wrote {args.out} "
          f"(checkpoints and metrics.jsonl in {work})")


def cmd_export(args) -> None:
    refuse_existing(args.dense, args.overwrite, inputs=[args.model])
    loaded = load_model(args.model, data_dir=args.data_dir)
    export_dense(loaded, args.dense, overwrite=args.overwrite, inputs=[args.model])
    print(f"wrote {args.dense} (a plain Hugging Face folder: transformers' from_pretrained loads it)")


def cmd_evaluate(args) -> None:
    device = check_device(args.device)
    loaded = _moved(load_model(args.model, data_dir=args.data_dir), device)
    metrics, protocols = evaluate_model(loaded.model, loaded.tokenizer, loaded.kind, data_dir=args.data_dir,
                                        mode=args.eval)
    metrics, reasons = null_non_finite(metrics)
    print(json_text({"model": args.model, "kind": loaded.kind, "random_weights": loaded.random_weights,
                     "metrics": metrics, "metrics_notes": reasons, "protocols": protocols, "notes": loaded.notes}))


def cmd_inspect(args) -> None:
    loaded = load_model(args.model, data_dir=args.data_dir)
    table = count_parameters(loaded.model)
    if args.json:
        print(json_text({"model": args.model, "kind": loaded.kind, "params": table,
                         "modules": replaced_modules(loaded.model), "notes": loaded.notes,
                         "random_weights": loaded.random_weights}))
        return
    width = max(len(k) for k in table["groups"]) + 8
    for key in ("total", "total_without_head", "stored"):
        print(f"{key:<{width}}{table[key]:>15,}")
    for group, count in table["groups"].items():
        if count:
            print(f"{'  ' + group:<{width}}{count:>15,}")
    print(f"{'LM head':<{width}}{table['tied_head'] or 'none':>15}")
    for entry in replaced_modules(loaded.model):
        print(f"{entry['name']}: {entry['class']} {entry['config']}")
    for note in loaded.notes:
        print(f"note: {note}")


def cmd_plan(args) -> None:
    recipe = Recipe.load(args.recipe)
    loaded = load_model(args.model or recipe.model, data_dir=args.data_dir, weights=plan_reads_weights(recipe))
    plan = plan_recipe(loaded.model, recipe)
    print(plan.to_json() if args.json else plan.table())


def cmd_recipes(args) -> None:
    if args.show:
        if args.show not in builtin_recipes():
            raise TensorLMError(f"recipe {args.show!r} is not a built-in; built-ins: {', '.join(builtin_recipes())}")
        print(recipe_path(args.show).read_text(), end="")
        return
    for name in builtin_recipes():
        recipe = Recipe.load(name)
        print(f"{name:<24} {' '.join(recipe.description.split())}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tensorlm", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"tensorlm {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="evaluate, compress, evaluate again, save and report")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="built-in recipe name or YAML path")
    p.add_argument("--model", help="model folder, offline name or hub id (default: the recipe's model)")
    p.add_argument("--out", help="new output folder (default: runs/<recipe>-<model>-<time>)")
    p.add_argument("--eval", choices=("full", "sweep", "quick", "none"), default="quick",
                   help="benchmark sets: quick (default: wt2-4k, 100 LAMBADA passages; encoders: the full sets in "
                        "every mode), sweep (wt2-16k, 1,000 passages), full (everything), none")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype the model is loaded in")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--resume", action="store_true", help="continue the distillation of an interrupted run (its "
                                                         "<out>.partial folder); a distill block's steps may be raised")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run's <out>.partial folder "
                                                          "and start afresh")
    _add_device(p, "the permutation search and distillation")
    _add_common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("distill", help="distill a compressed folder against its teacher and save the result")
    p.add_argument("--student", required=True, help="compressed folder (from tensorlm compress or run)")
    p.add_argument("--teacher", required=True, help="the uncompressed model: folder, offline name or hub id")
    p.add_argument("--out", required=True, help="new folder for the distilled student")
    p.add_argument("--config", help="YAML of distillation options (tensorlm.distill.DistillConfig fields)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    p.add_argument("--work", help="checkpoint folder (default: <out>.partial)")
    p.add_argument("--resume", action="store_true", help="continue from the work folder's last checkpoint "
                                                         "(--steps may be raised)")
    p.add_argument("--restart", action="store_true", help="discard the work folder's checkpoints and start afresh")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_device(p, "overrides the config's seed: data order and dropout")
    _add_common(p)
    p.set_defaults(func=cmd_distill)
    _add_other_commands(sub)
    return top


def _add_other_commands(sub) -> None:
    """The subcommands after ``run`` and ``distill``: compress, export, evaluate, inspect, plan, recipes."""
    p = sub.add_parser("compress", help="compress and save, without evaluation")
    p.add_argument("--recipe", required=True, help="built-in recipe name or YAML path")
    p.add_argument("--model", help="model folder, offline name or hub id (default: the recipe's model)")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                   help="compress one module at a time from the safetensors shards, the model built on the meta "
                        "device (peak memory ~ the compressed model + one layer); auto (default): for a local "
                        "safetensors folder and a recipe without budget (calibrated stages run block by block)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="dtype of the weights read and of the result (default: streamed, the checkpoint's; "
                        "otherwise float32)")
    _add_device(p, "the permutation search")
    _add_common(p)
    p.set_defaults(func=cmd_compress)
    p = sub.add_parser("export", help="write a compressed folder as an ordinary Hugging Face folder (dense weights)")
    p.add_argument("model", help="compressed folder (or any model tensorlm loads)")
    p.add_argument("--dense", required=True, metavar="OUT", help="new folder for the decompressed model")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_common(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("evaluate", help="the standard benchmarks of a model or compressed folder")
    p.add_argument("--model", required=True)
    p.add_argument("--eval", choices=("full", "sweep", "quick"), default="full",
                   help="benchmark sets: full, sweep (wt2-16k, 1,000 LAMBADA passages) or quick (wt2-4k, 100)")
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("inspect", help="parameter table of a model or compressed folder")
    p.add_argument("model", help="model folder, compressed folder, offline name or hub id")
    p.add_argument("--json", action="store_true", help="print the table, the factored modules and notes as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("plan", help="the modules a recipe targets: shapes, ranks, parameters (nothing decomposed)")
    p.add_argument("--recipe", required=True, help="built-in recipe name or YAML path")
    p.add_argument("--model", help="model folder, offline name or hub id (default: the recipe's model)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("--show", metavar="NAME", help="print the YAML of the built-in recipe NAME")
    p.set_defaults(func=cmd_recipes)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 file system error, 2 bad input, 130/143 interrupt)."""
    args = parser().parse_args(argv)
    if not sys.stderr.isatty():  # progress bars only on a terminal
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    try:
        with raise_on_sigterm():
            args.func(args)
    except TensorLMError as err:
        print(f"tensorlm: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Terminated:
        print("tensorlm: interrupted (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tensorlm: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"tensorlm: error: {where}{_one_line(err.strerror or err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
