"""Inference speed and memory of every built-in recipe of SmolLM2-135M and all-MiniLM-L6-v2 against dense.

Protocol (one machine, one run): causal LMs: prefill of 1 x 512 random tokens as ``generate`` runs it (KV
cache filled, logits of the last position only), and greedy decoding with the KV cache (``generate``,
exactly 128 new tokens after an 8-token prompt) at batch 1 and batch 8, in tokens per second; encoders: one
forward of 32 x 128 and of 1 x 128 random tokens; both: the input embedding's lookup of 32 x 128 random ids
(``lookup_32x128_s``, the model's ``get_input_embeddings()`` alone: ``nn.Embedding`` in dense, the factored
table where a recipe replaces it). Every time is the median of ``--repeats`` (>= 5) calls
after one warm-up. Each row (model, recipe, forward path) runs in a fresh subprocess that loads the saved
folder (``tensorlm.load_compressed``); its peak resident memory (weights plus activations; Linux ``VmHWM``
reset after loading, so the dense random initialisation of the loader does not count) is the largest over
its measurements, and ``size_on_disk`` is its ``model.safetensors``. Forward paths: ``dense``; ``factorized``
(every factored layer runs its factored forward); ``chosen`` (``tensorlm.layers.base.choose_forward`` at the
measured shapes, right after loading: per layer, the faster of the factored forward and the forward through
the reconstructed dense weight). The thread count and the load average (before and after) are recorded.
Paired metrics (``<metric>_paired``: prefill, decoding at batch 1 and lookup of causal LMs, both forwards
and the lookup of encoders), for a machine that is not quiet: in the same worker, after the metrics above,
the dense folder is loaded too and each timed call of the compressed model follows one of dense on the same
input, ``--repeats`` pairs after one warm-up pair; ``value`` and ``dense_value`` are the two medians of that
row, so their ratio sees the same load.

Run: ``python benchmarks/speed.py [--models smollm2-135m,all-MiniLM-L6-v2] [--recipes a,b] [--redo a,b]
[--forwards factorized,chosen]`` (resumable: rows already in the JSON are kept, except those of the ``--redo``
recipes (``dense`` included), measured again after a change of code; the file is rewritten atomically after
every row; compressed folders are cached under ``--cache-dir``). ``--render-only`` rewrites the Markdown and
PNG from the JSON. ``--smoke`` runs the whole pipeline on tiny random models (a Llama and a BERT, seconds)
into ``--out`` (default a temporary folder), never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from causal_lm import compress_row, log  # noqa: E402  (plan, calibrate, allocate, build: as the quality benchmark)

from tensorlm import compress, count_parameters, load_compressed, save_compressed  # noqa: E402
from tensorlm.evaluate.speed import (  # noqa: E402
    decode_throughput,
    forward_latency,
    peak_resident_mib,
    prefill_kwargs,
    reset_peak_resident,
    resident_mib,
)
from tensorlm.layers.base import (  # noqa: E402
    FACTORIZED,
    choose_forward,
    factorized_layers,
    get_forward,
    median_seconds,
    set_forward_all,
)
from tensorlm.models import load_model  # noqa: E402
from tensorlm.recipe import Recipe, builtin_recipes  # noqa: E402

RESULTS = HERE / "results"
MODELS = {"smollm2-135m": "causal-lm", "all-MiniLM-L6-v2": "encoder"}
METRICS = {  # metric -> (kind, unit, higher is better)
    "prefill_1x512_s": ("causal-lm", "s", False), "decode_b1_tokens_per_s": ("causal-lm", "tokens/s", True),
    "decode_b8_tokens_per_s": ("causal-lm", "tokens/s", True), "forward_32x128_s": ("encoder", "s", False),
    "forward_1x128_s": ("encoder", "s", False), "lookup_32x128_s": (None, "s", False),
    "peak_rss_mib": (None, "MiB", False),
    "resident_after_load_mib": (None, "MiB", False), "size_on_disk_mib": (None, "MiB", False),
}
PAIRED = {"causal-lm": ("prefill_1x512_s", "decode_b1_tokens_per_s", "lookup_32x128_s"),
          "encoder": ("forward_32x128_s", "forward_1x128_s", "lookup_32x128_s")}
"""The metrics also timed against dense in the same worker, interleaved (``<metric>_paired``)."""
METRICS.update({f"{m}_paired": METRICS[m] for m in dict.fromkeys(PAIRED["causal-lm"] + PAIRED["encoder"])})
CHOICE_SHAPES = {"causal-lm": [(1, 512), (1, 1), (8, 1)], "encoder": [(32, 128), (1, 128)]}
"""The input shapes ``choose_forward`` measures at: the prefill and decoding steps, or the two encoder batches."""
SMOKE_CHOICE_SHAPES = {"causal-lm": [(1, 32), (1, 1), (8, 1)], "encoder": [(32, 16), (1, 16)]}
SMOKE_RECIPES = {
    "tiny-llama": {
        "kronecker": [{"name": "mlp", "method": "kronecker", "targets": ["re:.*mlp\\.(gate|up|down)_proj"],
                       "options": {"ratio": 0.5}}],
        "tt-embedding": [{"name": "emb", "method": "tt_embedding", "targets": ["model.embed_tokens"],
                          "options": {"shape": [4, 4, 4], "ranks": 3, "head": "tie"}}],
    },
    "tiny-bert": {
        "tucker-bank": [{"name": "bank", "method": "tucker_bank", "targets": ["re:.*(intermediate|output)\\.dense"],
                         "options": {"ranks": [4, 16], "block_size": 32}}],
    },
}


class Rows:
    """``speed.json``: one row per (model, recipe, forward, metric), rewritten atomically (temporary file, then
    ``os.replace``) after every worker, as ``benchmarks/causal_lm.py``'s ``Rows`` does per recipe."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        kept = json.loads(path.read_text())["rows"] if path.exists() else []
        self.data = {**header, "rows": kept}  # the header (protocol) of this version, the rows measured so far

    @staticmethod
    def key(row: dict) -> tuple:
        return row["model"], row["recipe"], row["forward"], row["metric"]

    def has(self, model: str, recipe: str, forward: str, paired_only: bool = False) -> bool:
        """A row of ``(model, recipe, forward)`` is in the file (with ``paired_only``: every paired metric of the
        model's kind, so that a metric added to :data:`PAIRED` is measured for the rows that lack it)."""
        metrics = {r["metric"] for r in self.data["rows"]
                   if (r["model"], r["recipe"], r["forward"]) == (model, recipe, forward)}
        wanted = {f"{m}_paired" for m in PAIRED[model_kind(model)]} if paired_only else set()
        return bool(metrics) and wanted <= metrics

    def put_all(self, rows: list[dict]) -> None:
        keys = {self.key(r) for r in rows}
        self.data["rows"] = [r for r in self.data["rows"] if self.key(r) not in keys] + rows
        fill_dense_values(self.data["rows"])
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, allow_nan=False))
        os.replace(tmp, self.path)


def fill_dense_values(rows: list[dict]) -> None:
    """Set every row's ``dense_value`` from the dense row of the same model and metric (None until measured);
    a paired row keeps the dense median measured beside it."""
    dense = {(r["model"], r["metric"]): r["value"] for r in rows if r["recipe"] == "dense"}
    for row in rows:
        if not row.get("paired"):
            row["dense_value"] = dense.get((row["model"], row["metric"]))


def model_kind(model: str) -> str:
    return {**MODELS, "tiny-llama": "causal-lm", "tiny-bert": "encoder"}[model]


def recipes_for(model: str) -> list[str]:
    """The built-in recipes written for ``model`` (their ``model:`` field)."""
    return [name for name in builtin_recipes() if Recipe.load(name).model == model]


# ------------------------------------------------------------------------------------------------- workers


def tiny_model(name: str):
    """The smoke models (random, seeded): a Llama (GQA, tied, 1024 positions) and a BERT encoder."""
    torch.manual_seed(0)
    if name == "tiny-llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                            num_hidden_layers=2, intermediate_size=128, vocab_size=256,
                                            max_position_embeddings=1024, tie_word_embeddings=True,
                                            bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).eval()


def prepare(model: str, recipe: str, folder: Path, data_dir: str | None, smoke: bool) -> None:
    """Write the folder of ``model`` compressed by ``recipe`` (``dense``: the model itself) if absent."""
    if folder.exists():
        return
    kind = model_kind(model)
    if smoke:
        dense, tokenizer = tiny_model(model), None
        small = dense if recipe == "dense" else compress(
            dense, Recipe.from_dict({"name": recipe, "stages": SMOKE_RECIPES[model][recipe]}), progress=False)
    else:
        loaded = load_model(model, data_dir=data_dir)
        dense, tokenizer = loaded.model, loaded.tokenizer
        small = dense if recipe == "dense" else compress_row(loaded, Recipe.load(recipe),
                                                             data_dir, kind)[0]
    save_compressed(small, folder, tokenizer=tokenizer, kind=kind, notes=[f"speed benchmark: {recipe}"])


def measure(folder: Path, kind: str, forward: str, repeats: int, small: bool, dense_folder: Path | None = None,
            paired_only: bool = False) -> dict:
    """One row's metrics, in this (fresh) process: load, set the forward path, time, read the peak memory; then,
    given ``dense_folder``, the paired metrics (``paired_only``: those alone)."""
    t0 = time.perf_counter()
    model = load_compressed(folder).model
    load_seconds = time.perf_counter() - t0
    info = {"threads": torch.get_num_threads(), "load_before": os.getloadavg(), "load_seconds": load_seconds,
            "params": count_parameters(model)["total"]}
    if forward == "chosen":
        t0 = time.perf_counter()
        shapes = CHOICE_SHAPES[kind] if not small else SMOKE_CHOICE_SHAPES[kind]
        choose_forward(model, shapes, repeats=3)
        info["choose_seconds"] = time.perf_counter() - t0
        choices = [json.dumps(get_forward(m)) for m in factorized_layers(model).values()]
        info["choices"] = {c: choices.count(c) for c in sorted(set(choices))}
    elif forward == "factorized":
        set_forward_all(model, FACTORIZED)
    metrics, peaks = {}, []
    seq = 32 if small else 512
    if not paired_only:
        reset_peak_resident()
        metrics["resident_after_load_mib"] = resident_mib()
        for metric, run in timed_metrics(model, kind, repeats, seq).items():
            reset_peak_resident()
            metrics[metric] = run()
            peaks.append(peak_resident_mib())
        metrics["peak_rss_mib"] = max(peaks)
        metrics["size_on_disk_mib"] = (folder / "model.safetensors").stat().st_size / 2**20
    paired = {}
    if dense_folder is not None:
        paired = paired_metrics(model, load_compressed(dense_folder).model, kind, repeats, seq)
    info["load_after"] = os.getloadavg()
    return {"metrics": metrics, "paired": paired, "info": info}


def paired_metrics(model, dense, kind: str, repeats: int, seq: int) -> dict:
    """``<metric>_paired -> [model median, dense median]`` (seconds; tokens per second for decoding) for the
    metrics of :data:`PAIRED`: each timed call of ``model`` right after one of ``dense`` on the same ids,
    ``repeats`` pairs after one warm-up pair."""
    tokens = 128 if seq == 512 else 16
    shapes = {"prefill_1x512_s": (1, seq), "forward_32x128_s": (32, tokens), "forward_1x128_s": (1, tokens),
              "lookup_32x128_s": (32, tokens)}
    out = {}
    with torch.no_grad():
        for metric in PAIRED[kind]:
            if metric == "decode_b1_tokens_per_s":  # one generate() of `tokens` new tokens per call
                calls = [lambda m=m: decode_throughput(m, 1, tokens, repeats=1, warmup=0) for m in (model, dense)]
                out[f"{metric}_paired"] = [tokens / statistics.median(t) for t in interleaved_seconds(calls, repeats)]
                continue
            ids = torch.randint(0, model.config.vocab_size, shapes[metric], generator=torch.Generator().manual_seed(0))
            calls = [(lambda m=m, ids=ids: m.get_input_embeddings()(ids)) if metric.startswith("lookup") else
                     (lambda m=m, ids=ids: m(input_ids=ids, **(prefill_kwargs(m) if kind == "causal-lm" else {})))
                     for m in (model.eval(), dense.eval())]
            out[f"{metric}_paired"] = [statistics.median(t) for t in interleaved_seconds(calls, repeats)]
    return out


def interleaved_seconds(calls: list, repeats: int) -> list[list[float]]:
    """Seconds of each call in ``calls``, called in turn ``repeats`` times after one untimed round."""
    times = [[] for _ in calls]
    for i in range(repeats + 1):
        for call, seconds in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            if i:
                seconds.append(time.perf_counter() - start)
    return times


def lookup_seconds(model, batch: int, seq: int, repeats: int) -> float:
    """Median seconds of the input embedding alone on ``(batch, seq)`` random ids (seeded), under ``no_grad``,
    after one warm-up call."""
    table = model.get_input_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return median_seconds(lambda: table(ids), ids, repeats, warmup=1)


def timed_metrics(model, kind: str, repeats: int, seq: int) -> dict:
    """metric -> a function that measures it (seconds or tokens per second)."""
    lookup = {"lookup_32x128_s": lambda: lookup_seconds(model, 32, 128 if seq == 512 else 16, repeats)}
    if kind == "causal-lm":
        new = 128 if seq == 512 else 16
        return {"prefill_1x512_s": lambda: forward_latency(model, 1, seq, repeats=repeats, warmup=1,
                                                            model_kwargs=prefill_kwargs(model))["median_s"],
                "decode_b1_tokens_per_s": lambda: decode_throughput(model, 1, new, repeats=repeats)["tokens_per_s"],
                "decode_b8_tokens_per_s": lambda: decode_throughput(model, 8, new, repeats=repeats)["tokens_per_s"],
                **lookup}
    tokens = 128 if seq == 512 else 16
    return {"forward_32x128_s": lambda: forward_latency(model, 32, tokens, repeats=repeats)["median_s"],
            "forward_1x128_s": lambda: forward_latency(model, 1, tokens, repeats=repeats)["median_s"], **lookup}


def worker(args) -> None:
    """``--worker``: prepare a folder, or measure one row, and print one JSON line."""
    folder = Path(args.folder)
    if args.worker == "prepare":
        prepare(args.model, args.recipe, folder, args.data_dir, args.smoke)
        print(json.dumps({"folder": str(folder)}))
    else:
        dense = Path(args.dense_folder) if args.dense_folder else None
        print(json.dumps(measure(folder, model_kind(args.model), args.worker, args.repeats, args.smoke, dense,
                                 args.paired_only)))


def run_worker(args, what: str, model: str, recipe: str, folder: Path, dense_folder: Path | None = None,
               paired_only: bool = False) -> dict:
    """Run one worker in a fresh subprocess (same interpreter and thread count); its JSON answer.

    Raises:
        RuntimeError: the worker failed (its standard error is shown).
    """
    command = [sys.executable, __file__, "--worker", what, "--model", model, "--recipe", recipe, "--folder",
               str(folder), "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    command += ["--dense-folder", str(dense_folder)] if dense_folder else []
    command += ["--paired-only"] if paired_only else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"worker {what} {model} {recipe} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row_records(model: str, recipe: str, forward: str, answer: dict) -> list[dict]:
    """The JSON rows of one worker's answer: one per metric (a paired one carries its own ``dense_value``)."""
    info = answer["info"]
    plain = [{"model": model, "recipe": recipe, "forward": forward, "params": info["params"], "metric": metric,
              "unit": METRICS[metric][1], "value": value, "dense_value": None, **info}
             for metric, value in answer["metrics"].items()]
    return plain + [{"model": model, "recipe": recipe, "forward": forward, "params": info["params"], "metric": metric,
                     "unit": METRICS[metric][1], "value": value, "dense_value": dense, "paired": True, **info}
                    for metric, (value, dense) in answer.get("paired", {}).items()]


def run(args) -> None:
    models = args.models.split(",") if args.models else (list(SMOKE_RECIPES) if args.smoke else list(MODELS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "speed.json", {"benchmark": "speed", "protocol": __doc__.split("Run:")[0].strip(),
                                     "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                     "smoke": bool(args.smoke)})
    cache = Path(args.cache_dir)
    redo = set(args.redo.split(",")) if args.redo else set()
    forwards = args.forwards.split(",")
    for model in models:
        names = SMOKE_RECIPES[model] if args.smoke else recipes_for(model)
        if args.recipes:
            names = [n for n in names if n in args.recipes.split(",")]
        for recipe in ["dense", *names]:
            folder = cache / model / recipe
            for forward in (["dense"] if recipe == "dense" else forwards):
                paired_only = args.paired_only and recipe != "dense" and rows.has(model, recipe, forward)
                if rows.has(model, recipe, forward, paired_only) and recipe not in redo:
                    log(f"{model} {recipe} {forward}: kept")
                    continue
                try:
                    if args.smoke:  # tiny models: in this process, one subprocess fewer per recipe
                        prepare(model, recipe, folder, args.data_dir, smoke=True)
                    elif not folder.exists():
                        run_worker(args, "prepare", model, recipe, folder)
                    dense_folder = None if recipe == "dense" else cache / model / "dense"
                    answer = run_worker(args, forward if forward != "dense" else "factorized", model, recipe,
                                        folder, dense_folder, paired_only and recipe not in redo)
                except RuntimeError as err:
                    log(str(err))
                    continue
                rows.put_all(row_records(model, recipe, forward, answer))
                log(f"{model} {recipe} {forward}: {answer['metrics']}")
    render(rows.data, out)


def ratio_text(row: dict) -> str:
    """``value`` with its ratio to dense: a speed-up (dense / value for times and sizes, value / dense for
    throughputs), so that > 1 is better."""
    value, dense = row["value"], row["dense_value"]
    if not dense or not value or row["recipe"] == "dense":
        return f"{value:.4g}"
    better = METRICS[row["metric"]][2]
    return f"{value:.4g} ({(value / dense if better else dense / value):.2f}x)"


def render(data: dict, out: Path) -> None:
    """``speed.md`` (one table per model: a column per metric, ``(Nx)`` = better than dense by N) and
    ``speed.png`` (the ratios to dense, per metric)."""
    lines = ["# Inference speed and memory against dense", "", data.get("protocol", ""), "",
             "Ratios in parentheses are relative to dense, > 1 better (speed-up, throughput gain, memory saved).",
             ""]
    rows = data["rows"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        metrics = [m for m in METRICS if any(r["metric"] == m for r in mine)]
        first = mine[0]
        lines += [f"## {model}", "", f"threads {first['threads']}, load average at start "
                  f"{first['load_before'][0]:.1f}; load: the 1-minute load average when each row started", "",
                  "| recipe | forward | params | load | " + " | ".join(metrics) + " |", "|---|---|---:|---:|"
                  + "---:|" * len(metrics)]
        for recipe, forward in dict.fromkeys((r["recipe"], r["forward"]) for r in mine):
            same = [r for r in mine if (r["recipe"], r["forward"]) == (recipe, forward)]
            cells = {r["metric"]: ratio_text(r) for r in same}
            row, loads = same[0], sorted({f"{r['load_before'][0]:.1f}" for r in same})
            lines.append(f"| {recipe} | {forward} | {row['params']:,} | {', '.join(loads)} | "
                         + " | ".join(cells.get(m, "-") for m in metrics) + " |")
        lines.append("")
    (out / "speed.md").write_text("\n".join(lines))
    plot(rows, out / "speed.png")


def plot(rows: list[dict], path: Path) -> None:
    """Horizontal bars: ratio to dense (> 1 better) of each (model, recipe, forward) per paired time metric
    (timed beside dense, so the ratio sees one load) and for the peak memory."""
    import matplotlib  # noqa: PLC0415  (optional, only to draw)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    timed = [m for m in METRICS if m.endswith("_paired") or m == "peak_rss_mib"]
    series = [r for r in rows if r["recipe"] != "dense" and r["dense_value"] and r["value"] and r["metric"] in timed]
    labels = list(dict.fromkeys(f"{r['model']} {r['recipe']} ({r['forward']})" for r in series))
    metrics = list(dict.fromkeys(r["metric"] for r in series))
    fig, ax = plt.subplots(figsize=(10, 0.3 * max(len(labels), 4) * max(len(metrics), 1) / 2 + 2))
    height = 0.8 / max(len(metrics), 1)
    for i, metric in enumerate(metrics):
        values = {f"{r['model']} {r['recipe']} ({r['forward']})":
                  (r["value"] / r["dense_value"] if METRICS[metric][2] else r["dense_value"] / r["value"])
                  for r in series if r["metric"] == metric}
        ax.barh([j + i * height for j in range(len(labels))], [values.get(lab, 0) for lab in labels], height,
                label=metric)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))], labels, fontsize=7)
    ax.set_xlabel("ratio to dense (> 1: faster or smaller)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated (default: smollm2-135m,all-MiniLM-L6-v2)")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: every built-in of the model)")
    parser.add_argument("--redo", help="comma-separated recipes (or dense) measured again though already in the JSON")
    parser.add_argument("--forwards", default="factorized,chosen",
                        help="forward paths of the compressed rows, comma-separated (factorized, chosen)")
    parser.add_argument("--paired-only", action="store_true",
                        help="rows already measured get only their paired metrics (the others are kept)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (>= 5 for results)")
    parser.add_argument("--threads", type=int, help="torch threads of the workers (OMP_NUM_THREADS)")
    parser.add_argument("--out", help="results folder (default benchmarks/results; with --smoke a temporary one)")
    parser.add_argument("--cache-dir", help="compressed folders (default ~/.cache/tensorlm/speed)")
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA"), help="calibration data folder")
    parser.add_argument("--render-only", action="store_true", help="rewrite speed.md and speed.png from the JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny random models, seconds: checks the pipeline")
    parser.add_argument("--worker", choices=["prepare", "factorized", "chosen"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dense-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not args.forwards or set(args.forwards.split(",")) - {"factorized", "chosen"}:
        parser.error(f"--forwards {args.forwards!r}: comma-separated factorized and/or chosen")
    smoke_dir = Path(tempfile.gettempdir()) / "tensorlm-speed-smoke"
    args.out = args.out or str(smoke_dir if args.smoke else RESULTS)
    args.cache_dir = args.cache_dir or str(smoke_dir / "folders" if args.smoke
                                           else Path.home() / ".cache" / "tensorlm" / "speed")
    if args.render_only:
        data = json.loads((Path(args.out) / "speed.json").read_text())
        fill_dense_values(data["rows"])
        render(data, Path(args.out))
        return
    run(args)


if __name__ == "__main__":
    main()
