"""Models larger than memory: streaming compression of a 1.1B Llama and meta-device loading, peak memory measured.

Protocol (one machine, one run): a Llama of TinyLlama-1.1B's configuration (hidden 2048, MLP 5632, 22 layers,
32 query and 4 key/value heads, vocabulary 32,000, untied head; 1,100,048,384 parameters) with random weights
(normal, std 0.02; norms 1) is written as bfloat16 safetensors shards (the embedding, one shard per layer,
the final norm with the head) with a ``model.safetensors.index.json``, one shard at a time, to a cache folder
outside the repository. Each step then runs in a fresh subprocess, so that its peak resident memory
(``getrusage`` ``ru_maxrss``, Linux) is its own:

- ``dense load``: ``transformers`` ``AutoModelForCausalLM.from_pretrained(folder, dtype=bfloat16)``, for
  reference; it maps the shards without reading them, so its peak is little more than the runtime (the
  weights become resident when a forward touches them);
- ``streaming compress``: ``tensorlm.stream.compress_streaming`` (the path of ``tensorlm compress --model
  FOLDER``) with the recipe below, on the CPU, writing the compressed folder;
- ``load_compressed``: ``tensorlm.load_compressed`` of that folder (bfloat16, as saved), then one forward of
  1 x 8 tokens to show the model runs.

Resident memory counts the pages of the input shards a process has touched: safetensors maps the files, so
a tensor read in its stored dtype on the CPU shares the shard's pages (no copy) and becomes resident when it
is first read (the NaN check, a decomposition, the save, a forward). ``load_compressed``'s peak is therefore
given twice: right after loading (untouched weights not yet resident) and after one forward of 1 x 8 tokens
(``peak_with_forward_bytes``: every weight touched), the second being the one compared with the target.
``runtime_rss_bytes`` is each subprocess's resident memory after its imports (Python, torch, transformers,
tensorlm), before any weight. Recipe ``scale-lowrank-20``: data-blind truncated SVD (``lowrank``, float64 SVD)
of the 44 ``gate_proj`` and ``up_proj`` matrices (5632 x 2048) at ratio 0.56 (rank 841), which removes 20.3%
of all parameters; about 7 s per target on 2 quiet cores and minutes on a loaded machine, so a run that
cannot finish is recorded as a ``partial`` row (the targets done, their seconds, the largest peak after one of
them). Rows marked
``[scale-kronecker-2x2]`` run the same steps with a recipe whose decomposition costs seconds per target:
the nearest Kronecker sum ``A (2816 x 1024) (x) B (2 x 2)``, rank 2, of the same 44 matrices (-23.1% of all
parameters), so that the whole streaming pass and the load of its result are measured. Targets: peak while
compressing <= 1.3 x the bfloat16 checkpoint; ``load_compressed`` peak <= 1.2 x the compressed checkpoint.
Rows marked ``estimate`` (7B and 8B shapes) are arithmetic, not
measurements: peak = runtime + compressed model (bfloat16, same recipe) + one target's working memory (the
measured 1.1B excess over runtime and compressed model, scaled by the matrix size); time = the measured
seconds per target scaled by ``m n min(m, n)`` (dense SVD cost) times the number of targets.

Run: ``python benchmarks/scale.py [--cache-dir DIR] [--threads N]`` (resumable: rows already in
``results/scale.json`` are kept; the JSON is rewritten atomically after every row and per-target times go to
``DIR/progress.jsonl`` as they come; ``--partial`` records them as a row while or after the compression runs);
``--smoke`` runs the same steps on a 2-layer model of width 256 into a
temporary folder; ``--render-only`` rewrites the Markdown from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from causal_lm import log  # noqa: E402

from tensorlm.pipeline import machine  # noqa: E402

RESULTS = HERE / "results"
MODEL = "tinyllama-1.1b-random"
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000}
SMOKE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1000}
SHAPES = {  # the 7B / 8B configurations of the estimate rows
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000},
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256},
}
RATIO = 0.56
MLP = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up)_proj"
RECIPE = {"name": "scale-lowrank-20", "description": "truncated SVD of every gate_proj and up_proj at ratio 0.56",
          "stages": [{"name": "mlp", "method": "lowrank", "targets": [MLP], "options": {"ratio": RATIO}}]}
KRONECKER = {"name": "scale-kronecker-2x2", "description": "nearest Kronecker sum A (2816 x 1024) (x) B (2 x 2), "
             "rank 2, of every gate_proj and up_proj: half their parameters",
             "stages": [{"name": "mlp", "method": "kronecker", "targets": [MLP],
                         "options": {"a_shape": [2816, 1024], "b_shape": [2, 2], "rank": 2}}]}
RECIPES = {"lowrank": RECIPE, "kronecker": KRONECKER}
TARGETS = {"streaming compress": 1.3, "load_compressed": 1.2}


def config_of(shape: dict) -> LlamaConfig:
    return LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def layer_tensors(config: LlamaConfig, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The bfloat16 tensors of decoder layer ``index``: normal(0, 0.02) matrices, norms of ones."""
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}
    out = {f"model.layers.{index}.{name}.weight": random(shape, generator) for name, shape in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{index}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def random(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``(rows, cols)`` bfloat16 normal(0, 0.02), drawn in float32 blocks of 256 rows (no full float32 copy)."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], 256):
        block = out[start:start + 256]
        block.copy_(torch.randn(block.shape, generator=generator) * 0.02)
    return out


def build_checkpoint(folder: Path, shape: dict, data_dir: Path) -> None:
    """Write the random bfloat16 Llama of ``shape`` as shards (one at a time) with its index, config and a
    tokenizer (GPT-2's: the benchmark never tokenizes text); atomic (a temporary folder renamed at the end)."""
    config = config_of(shape)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    h, vocab = config.hidden_size, config.vocab_size
    shards = [lambda: {"model.embed_tokens.weight": random((vocab, h), generator)}]
    shards += [lambda i=i: layer_tensors(config, i, generator) for i in range(config.num_hidden_layers)]
    shards += [lambda: {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                        "lm_head.weight": random((vocab, h), generator)}]
    weight_map, total = {}, 0
    for number, make in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(data_dir / "gpt2-tokenizer").save_pretrained(tmp)
    os.replace(tmp, folder)


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    """``--worker STEP``: one measured step in this (fresh) process; prints one JSON line."""
    from transformers import AutoModelForCausalLM

    import tensorlm
    from tensorlm.recipe import Recipe
    from tensorlm.stream import compress_streaming

    folder, out = Path(args.folder), Path(args.compressed)
    runtime = resident_bytes()
    start = time.perf_counter()
    answer = {}
    if args.worker == "dense load":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        answer["params"] = sum(p.numel() for p in model.parameters())
    elif args.worker == "streaming compress":
        progress = Path(args.cache_dir) / "progress.jsonl"

        def on_module(name: str, seconds: float) -> None:
            with progress.open("a") as f:
                f.write(json.dumps({"module": name, "seconds": seconds, "peak_rss_bytes": peak_bytes()}) + "\n")

        result = compress_streaming(folder, Recipe.from_dict(RECIPES[args.recipe]), out, progress=False, overwrite=True,
                                    on_module=on_module)
        answer["module_seconds"] = result.module_seconds
        answer["params"] = json.loads((out / "tensorlm.json").read_text())["params"]["total"]
    else:
        loaded = tensorlm.load_compressed(out)
        answer["params"] = sum(p.numel() for p in loaded.model.parameters())
        answer["dtypes"] = sorted({str(p.dtype) for p in loaded.model.parameters()})
        seconds, peak = time.perf_counter() - start, peak_bytes()
        with torch.no_grad():
            loaded.model(input_ids=torch.arange(8)[None])
        answer.update(seconds=seconds, peak_rss_bytes=peak, peak_with_forward_bytes=peak_bytes())
    answer.setdefault("seconds", time.perf_counter() - start)
    answer.setdefault("peak_rss_bytes", peak_bytes())
    print(json.dumps({**answer, "runtime_rss_bytes": runtime}))


def run_worker(args, step: str, folder: Path, compressed: Path) -> dict:
    """One step in a fresh subprocess (same interpreter, ``--threads`` threads); its JSON answer.

    Raises:
        RuntimeError: the step failed (the end of its standard error is shown).
    """
    command = [sys.executable, __file__, "--worker", step, "--folder", str(folder), "--compressed", str(compressed),
               "--cache-dir", str(args.cache_dir), "--recipe", args.recipe]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"step {step} failed:\n{done.stderr[-3000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return {**answer, "load_average_before": load, "load_average_after": os.getloadavg()[0]}


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def matrix_cost(m: int, n: int) -> int:
    """Dense SVD cost of an ``m x n`` matrix up to a constant: ``m n min(m, n)``."""
    return m * n * min(m, n)


def estimates(per_target: float, runtime: int, work_1b: int, shape_1b: dict, source: str) -> list[dict]:
    """The 7B and 8B rows: arithmetic (see the protocol) from the 1.1B run's seconds per target, runtime
    memory and one target's working memory (peak minus runtime minus the compressed tensors held then)."""
    rows = []
    m1, h1 = shape_1b["intermediate_size"], shape_1b["hidden_size"]
    for name, shape in SHAPES.items():
        h, m, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
        kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
        layer = 2 * h * h + 2 * kv * h + 3 * m * h + 2 * h
        params = layers * layer + 2 * shape["vocab_size"] * h + h
        rank = int(RATIO * m * h // (m + h))
        after = params - 2 * layers * (m * h - rank * (m + h))
        work = work_1b * (m * h) / (m1 * h1)
        peak = runtime + 2 * after + work
        seconds = per_target * matrix_cost(m, h) / matrix_cost(m1, h1) * 2 * layers
        rows.append({"model": name, "step": "streaming compress", "estimate": True, "from": source,
                     "params": params, "params_after": after, "checkpoint_bytes": 2 * params,
                     "compressed_bytes": 2 * after,
                     "peak_rss_bytes": int(peak), "seconds": seconds, "peak_over_checkpoint": peak / (2 * params)})
    return rows


class Rows:
    """``scale.json``: rows keyed by (model, step), rewritten atomically after every row."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        kept = json.loads(path.read_text())["rows"] if path.exists() else []
        self.data = {**header, "rows": kept}

    def get(self, model: str, step: str) -> dict | None:
        return next((r for r in self.data["rows"] if r["model"] == model and r["step"] == step), None)

    def put(self, row: dict) -> None:
        self.data["rows"] = [r for r in self.data["rows"] if (r["model"], r["step"]) != (row["model"], row["step"])]
        self.data["rows"].append(row)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, allow_nan=False))
        os.replace(tmp, self.path)


def settle(row: dict) -> dict:
    """``row`` with its ratio to the reference and whether it met its target; for ``load_compressed`` the peak
    after one forward counts (every weight resident only once touched)."""
    if row.get("peak_with_forward_bytes") and row.get("compressed_bytes"):
        row["peak_over_reference"] = row["peak_with_forward_bytes"] / row["compressed_bytes"]
    if row.get("target") is not None:
        row["target_met"] = row["peak_over_reference"] <= row["target"]
    return row


def header(args) -> dict:
    """The JSON header: protocol, machine (with its load average now), threads, recipe."""
    return {"benchmark": "scale", "protocol": __doc__.split("Run:")[0].strip(), "machine": machine(),
            "threads": args.threads, "recipe": RECIPE, "other_recipes": [KRONECKER], "smoke": bool(args.smoke)}


def run(args) -> None:
    shape = SMOKE if args.smoke else TINYLLAMA
    model = "smoke-llama-random" if args.smoke else MODEL
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    folder, compressed = cache / "checkpoint", cache / "compressed"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "scale.json", header(args))
    if not folder.exists():
        log(f"writing the random {model} checkpoint to {folder}")
        build_checkpoint(folder, shape, Path(args.data_dir))
    checkpoint = folder_bytes(folder, "*.safetensors")
    label = "" if args.recipe == "lowrank" else f" [{RECIPES[args.recipe]['name']}]"
    for base in ("streaming compress", "load_compressed", "dense load"):
        step = base + label
        if rows.get(model, step):
            log(f"{step}: kept")
            continue
        log(f"{step}: running")
        answer = run_worker(args, base, folder, compressed)
        small = folder_bytes(compressed, "*.safetensors") if compressed.exists() else None
        reference = small if base == "load_compressed" else checkpoint
        row = {"model": model, "step": step, "estimate": False, "checkpoint_bytes": checkpoint,
               "compressed_bytes": small,
               **answer, "peak_over_reference": answer["peak_rss_bytes"] / reference,
               "reference": "compressed checkpoint" if base == "load_compressed" else "bf16 checkpoint",
               "recipe": RECIPES[args.recipe]["name"], "target": TARGETS.get(base)}
        rows.put(settle(row))
        log(f"{step}: peak {answer['peak_rss_bytes'] / 2**30:.2f} GiB in {answer['seconds']:.0f} s")
    measured = rows.get(model, "streaming compress")
    if args.recipe == "lowrank":
        per_target = sum(measured["module_seconds"].values()) / len(measured["module_seconds"])
        work = measured["peak_rss_bytes"] - measured["runtime_rss_bytes"] - measured["compressed_bytes"]
        for row in estimates(per_target, measured["runtime_rss_bytes"], work, shape, "the measured 1.1B row"):
            rows.put(row)
    render(rows.data, out / "scale.md")


def partial_row(args) -> None:
    """``--partial``: record the streaming compression still running (or stopped) from its ``progress.jsonl``:
    the targets done so far, their seconds, and the largest peak seen after one of them."""
    shape = SMOKE if args.smoke else TINYLLAMA
    cache = Path(args.cache_dir)
    done = [json.loads(line) for line in (cache / "progress.jsonl").read_text().splitlines()]
    checkpoint = folder_bytes(cache / "checkpoint", "*.safetensors")
    peak = max(d["peak_rss_bytes"] for d in done)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = Rows(Path(args.out) / "scale.json", header(args))
    rows.put({"model": MODEL if not args.smoke else "smoke-llama-random", "step": "streaming compress (partial)",
              "estimate": False, "partial": f"{len(done)} of {2 * shape['num_hidden_layers']} targets",
              "params": None, "checkpoint_bytes": checkpoint, "compressed_bytes": None, "peak_rss_bytes": peak,
              "seconds": sum(d["seconds"] for d in done), "peak_over_reference": peak / checkpoint,
              "reference": "bf16 checkpoint", "target": None, "target_met": None,
              "module_seconds": {d["module"]: d["seconds"] for d in done}, "load_average_now": os.getloadavg()[0]})
    runtime = next((r["runtime_rss_bytes"] for r in rows.data["rows"] if r.get("runtime_rss_bytes")), None)
    if runtime is not None:  # the runtime of another step of this benchmark: the same imports
        h, m = shape["hidden_size"], shape["intermediate_size"]
        held = len(done) * 2 * int(RATIO * m * h // (m + h)) * (m + h)  # bf16 factors built so far
        per_target = sum(d["seconds"] for d in done) / len(done)
        for row in estimates(per_target, runtime, peak - runtime - held, shape,
                             f"the partial 1.1B row ({len(done)} targets) and another step's runtime"):
            rows.put(row)
    render(rows.data, Path(args.out) / "scale.md")


def peak_text(row: dict) -> str:
    """The peak in GiB; for ``load_compressed``: right after loading / after one forward."""
    forward = row.get("peak_with_forward_bytes")
    return gib(row["peak_rss_bytes"]) + ("" if forward is None else f" / {gib(forward)} after a forward")


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def render(data: dict, path: Path) -> None:
    """``scale.md``: measured rows, then the 7B / 8B arithmetic."""
    lines = ["# Models larger than memory: streaming compression and loading", "", data["protocol"], "",
             f"Machine: {data['machine']}; {data['threads']} threads.", "",
             "| model | step | parameters | checkpoint GiB | compressed GiB | runtime GiB | peak RSS GiB | "
             "peak / reference | target | seconds | load avg before/after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in data["rows"]:
        ratio = r.get("peak_over_reference", r.get("peak_over_checkpoint"))
        reference = r.get("reference", "bf16 checkpoint")
        target = "-" if r.get("target") is None else f"<= {r['target']}x: {'met' if r['target_met'] else 'missed'}"
        load = ("-" if "load_average_before" not in r else
                f"{r['load_average_before']:.1f} / {r['load_average_after']:.1f}")
        step = f"{r['step']} (estimate)" if r.get("estimate") else r["step"]
        params = "-" if r.get("params") is None else f"{r['params']:,}"
        lines.append(f"| {r['model']} | {step} | {params} | {gib(r['checkpoint_bytes'])} | "
                     f"{gib(r.get('compressed_bytes'))} | {gib(r.get('runtime_rss_bytes'))} | "
                     f"{peak_text(r)} | {ratio:.2f}x {reference} | {target} | {r['seconds']:.0f} | "
                     f"{load} |")
    compress = next((r for r in data["rows"] if r["step"] == "streaming compress" and not r.get("estimate")), None)
    if compress and compress.get("module_seconds"):
        times = list(compress["module_seconds"].values())
        lines += ["", f"Per target ({len(times)} matrices): median {sorted(times)[len(times) // 2]:.1f} s, "
                      f"min {min(times):.1f} s, max {max(times):.1f} s; per layer (2 targets) about "
                      f"{2 * sum(times) / len(times):.1f} s."]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "tensorlm" / "scale"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--data-dir", default=os.environ.get("TENSORLM_DATA", str(HERE.parents[1] / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="lowrank",
                        help="lowrank (the benchmark's recipe) or kronecker (cheap per target: rows marked [name])")
    parser.add_argument("--merge", help="add the rows of another run's scale.json to --out's, then render")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model of width 256, into a temporary folder")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--partial", action="store_true", help="record the progress of a compression still running")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--compressed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.merge:
        rows = Rows(Path(args.out) / "scale.json", header(args))
        for row in json.loads(Path(args.merge).read_text())["rows"]:
            rows.put(settle(row))
        render(rows.data, Path(args.out) / "scale.md")
        return
    if args.partial:
        partial_row(args)
        return
    if args.render_only:
        render(json.loads((Path(args.out) / "scale.json").read_text()), Path(args.out) / "scale.md")
        return
    if args.smoke:
        base = Path(tempfile.mkdtemp(prefix="tensorlm-scale-smoke-"))
        args.cache_dir, args.out = str(base / "cache"), str(base / "results")
    run(args)


if __name__ == "__main__":
    main()
