"""Command line: ``tensorlm run | compress | evaluate | inspect | recipes``.

A thin layer over the API. Bad input prints one line, ``tensorlm: error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tensorlm.errors import TensorLMError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="benchmark data folder laid out like shared/data (default: $TENSORLM_DATA)")


def cmd_run(args) -> None:
    from tensorlm.pipeline import run
    from tensorlm.report import metrics_table, params_table, ratio_phrase

    results = run(args.model, args.recipe, args.out, data_dir=args.data_dir, eval_mode=args.eval,
                  overwrite=args.overwrite, resume=args.resume, dtype=args.dtype)
    metrics = results.metrics
    print(metrics_table(metrics["before"], {**metrics["after"]}) if metrics["before"] else "(not evaluated)")
    for key, value in metrics["agreement"].items():
        print(f"{key}: {value:.4f}")
    if results.samples:
        print(f"greedy {results.samples['prompt']!r} -> uncompressed {results.samples['before']!r}, "
              f"compressed {results.samples['after']!r}")
    print()
    print(params_table(results.params["before"], results.params["after"]))
    print(f"\ncompression took {results.seconds['compress']:.1f} s; "
          f"whole model {ratio_phrase(results.compression['model_ratio'])}")
    print(f"wrote {results.out} (model.safetensors, tensorlm.json, results.json, report.md)")


def cmd_compress(args) -> None:
    from tensorlm import compress, load_model, save_compressed
    from tensorlm.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    loaded = load_model(args.model or recipe.model, data_dir=args.data_dir)
    small = compress(loaded.model, recipe)
    save_compressed(small, args.out, tokenizer=loaded.tokenizer, kind=loaded.kind, recipe=recipe,
                    notes=loaded.notes, overwrite=args.overwrite)
    print(f"wrote {args.out}")


def cmd_distill(args) -> None:
    import yaml
    from accelerate import PartialState

    from tensorlm import load_model, save_compressed
    from tensorlm.distill import DistillConfig, distill

    if Path(args.out).exists() and not args.overwrite:
        raise TensorLMError(f"output folder {args.out} already exists; choose another or pass --overwrite")
    student = load_model(args.student, data_dir=args.data_dir)
    teacher = load_model(args.teacher, data_dir=args.data_dir)
    if student.kind != teacher.kind:
        raise TensorLMError(f"student {args.student!r} is a {student.kind} but teacher {args.teacher!r} is a "
                            f"{teacher.kind}")
    options = yaml.safe_load(open(args.config)) if args.config else {}
    options = {"data_dir": args.data_dir, **options, **({"steps": args.steps} if args.steps else {})}
    work = args.work or f"{args.out}.partial"
    result = distill(student.model, teacher.model, teacher.tokenizer, DistillConfig.from_dict(options), work,
                     kind=teacher.kind, resume=args.resume)
    if not PartialState().is_main_process:  # under accelerate launch, one process saves
        return
    save_compressed(student.model, args.out, tokenizer=student.tokenizer, kind=student.kind,
                    notes=[*student.notes, f"distilled from {args.teacher}: best {result.metric} "
                           f"{result.best_metric:.4f} at step {result.best_step} of {result.steps}"],
                    overwrite=args.overwrite)
    print(f"best {result.metric} {result.best_metric:.4f} at step {result.best_step}; wrote {args.out} "
          f"(checkpoints and metrics.jsonl in {work})")


def cmd_evaluate(args) -> None:
    from tensorlm.evaluate import evaluate_model
    from tensorlm.models import load_model

    loaded = load_model(args.model, data_dir=args.data_dir)
    metrics, protocols = evaluate_model(loaded.model, loaded.tokenizer, loaded.kind, data_dir=args.data_dir,
                                        mode=args.eval)
    print(json.dumps({"model": args.model, "metrics": metrics, "protocols": protocols}, indent=2))


def cmd_inspect(args) -> None:
    from tensorlm.io import replaced_modules
    from tensorlm.models import load_model
    from tensorlm.params import count_parameters

    loaded = load_model(args.model, data_dir=args.data_dir)
    table = count_parameters(loaded.model)
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
    from tensorlm.models import load_model
    from tensorlm.recipe import Recipe
    from tensorlm.surgery import plan_recipe

    recipe = Recipe.load(args.recipe)
    loaded = load_model(args.model or recipe.model, data_dir=args.data_dir)
    plan = plan_recipe(loaded.model, recipe)
    print(plan.to_json() if args.json else plan.table())


def cmd_recipes(args) -> None:
    from tensorlm.recipe import Recipe, builtin_recipes

    for name in builtin_recipes():
        recipe = Recipe.load(name)
        print(f"{name:<24} {' '.join(recipe.description.split())}")


def parser() -> argparse.ArgumentParser:
    from tensorlm.pipeline import DEFAULT_RECIPE

    top = argparse.ArgumentParser(prog="tensorlm", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="evaluate, compress, evaluate again, save and report")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="built-in recipe name or YAML path")
    p.add_argument("--model", help="model folder, offline name or hub id (default: the recipe's model)")
    p.add_argument("--out", help="new output folder (default: runs/<recipe>-<model>-<time>)")
    p.add_argument("--eval", choices=("full", "sweep", "quick", "none"), default="full",
                   help="benchmark sets: full (everything), sweep (wt2-16k, 1,000 LAMBADA passages), quick "
                        "(wt2-4k, 100 passages; encoders: the full sets in every mode), none")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype the model is loaded in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue the distillation of an interrupted run")
    _add_common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("distill", help="distill a compressed folder against its teacher and save the result")
    p.add_argument("--student", required=True, help="compressed folder (from tensorlm compress or run)")
    p.add_argument("--teacher", required=True, help="the uncompressed model: folder, offline name or hub id")
    p.add_argument("--out", required=True, help="new folder for the distilled student")
    p.add_argument("--config", help="YAML of distillation options (tensorlm.distill.DistillConfig fields)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    p.add_argument("--work", help="checkpoint folder (default: <out>.partial)")
    p.add_argument("--resume", action="store_true", help="continue from the work folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("compress", help="compress and save, without evaluation")
    p.add_argument("--recipe", required=True)
    p.add_argument("--model")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_compress)
    p = sub.add_parser("evaluate", help="the standard benchmarks of a model or compressed folder")
    p.add_argument("--model", required=True)
    p.add_argument("--eval", choices=("full", "sweep", "quick"), default="full",
                   help="benchmark sets: full, sweep (wt2-16k, 1,000 LAMBADA passages) or quick (wt2-4k, 100)")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("inspect", help="parameter table of a model or compressed folder")
    p.add_argument("model")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("plan", help="the modules a recipe targets: shapes, ranks, parameters (nothing decomposed)")
    p.add_argument("--recipe", required=True, help="built-in recipe name or YAML path")
    p.add_argument("--model", help="model folder, offline name or hub id (default: the recipe's model)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=cmd_recipes)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except TensorLMError as err:
        print(f"tensorlm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
