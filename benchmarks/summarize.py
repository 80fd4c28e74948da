"""Rebuild the README's results section from the committed files in ``benchmarks/results/``.

Run: ``python benchmarks/summarize.py [--readme PATH]`` (after any benchmark). Replaces the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md (or ``PATH``, e.g. a copy to diff
against); a benchmark whose results are not committed is listed as such, never filled in by hand.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from causal_lm import RECIPES as CAUSAL_RECIPES
from embeddings import BROKEN_PPL, headline, unmeasured
from embeddings import MODELS as EMBEDDING_MODELS

HERE = Path(__file__).parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table_of(name: str) -> str:
    """The first Markdown table of ``results/<name>.md``."""
    text = (RESULTS / f"{name}.md").read_text()
    block = re.search(r"(^\|.*\|\n)+", text, re.M)
    return block.group(0).rstrip() if block else ""


def _link(name: str) -> str:
    files = [p.name for p in sorted(RESULTS.glob(f"{name}.*"))]
    return ", ".join(f"[{f}](benchmarks/results/{f})" for f in files)


def _dense_spread(rows: list[dict]) -> str:
    """How much dense itself varied across the paired rows of ``speed.json``: its lowest and highest median for
    each paired forward, prefill and decoding metric, e.g. ``... ranged: forward_32x128_s_paired 0.959-1.63 s
    over 22 rows; ...``."""
    spans = []
    for metric in dict.fromkeys(r["metric"] for r in rows if r.get("paired")):
        if not metric.startswith(("forward_32x128", "prefill", "decode_b1")):
            continue
        paired = [r for r in rows if r["metric"] == metric and r.get("paired")]
        dense = [r["dense_value"] for r in paired]
        if len(dense) > 1:
            spans.append(f"{metric} {min(dense):.3g}-{max(dense):.3g} {paired[0]['unit']} over {len(dense)} rows")
    return "the dense medians measured beside the rows ranged: " + "; ".join(spans)


def section(title: str, name: str, body: str) -> list[str]:
    return [f"### {title}", "", body.strip(), "", f"Files: {_link(name)}.", ""]


EMBEDDING_QUALITY = {"encoder": ("stsb", "STS-B test"), "causal-lm": ("wikitext2_ppl", "wt2-16k ppl")}


def _not_measured(rows: list[dict], broken: bool = False) -> list[str]:
    """Per model of the embeddings sweep, what ``embeddings.unmeasured`` lists (``broken``: the pairs not run
    because the method broke at a smaller ratio): ``["smollm2: not yet run", "minilm: svd at 40x", ...]``."""
    out = []
    for model, (_, _, kind) in EMBEDDING_MODELS.items():
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            out += [] if broken else [f"{model}: not yet run"]
        elif gaps := unmeasured(mine, model, kind, broken):
            out.append(f"{model}: {'; '.join(gaps)}")
    return out


def embeddings_body(data: dict) -> str:
    """The README text of ``results/embeddings.json``: its methods and protocol paragraphs and machine line,
    then per model a table of every measured row beside dense and beside the SVD row at the same target
    ratio (the baseline at about the same parameters), the issue's targets (``embeddings.headline``), and
    what the sweep has not measured yet.

    Raises:
        KeyError: a row without the fields ``benchmarks/embeddings.py`` writes.
    """
    rows = data["rows"]
    paragraphs = [p for p in data["protocol"].split("\n\n") if p.startswith(("Methods", "Protocols"))]
    lines = [*(p + "\n" for p in paragraphs), f"Machine: {data['machine']}. Size on disk and lookup times of "
             "every row: `embeddings.md`.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = next((r for r in mine if r["method"] == "dense"), None)
        key, label = EMBEDDING_QUALITY[EMBEDDING_MODELS[model][2]]
        svd = {r["target_ratio"]: r for r in mine if r["method"] == "svd" and key in r}
        loads = [r["load_average"] for r in mine]
        name = ((dense or {}).get("model_notes") or [EMBEDDING_MODELS[model][0]])[0]
        table = round(mine[0]["embedding_params"] * mine[0]["embedding_ratio"])  # V d
        dense_text = f"{dense[key]:,.4f} ({dense['params']:,} parameters)" if dense and key in dense else "not measured"
        lines += [f"**{model}** ({name}; token table {table:,} values): dense {label} {dense_text}, measured in "
                  f"the same run; load average {min(loads):g}-{max(loads):g} on the machine while the rows ran.", ""]
        causal = key == "wikitext2_ppl"
        lines += [f"| target | method | embedding ratio | params | table rel. error | {label} | x dense | "
                  + ("LAMBADA acc | " if causal else "") + f"table healed: {label} (x dense) | "
                  f"SVD at this target: ratio, {label} |",
                  "|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if causal else "") + "---:|---|"]
        if dense and key in dense:
            lines.append(f"| - | dense | 1.00x | {dense['params']:,} | 0.000 | {dense[key]:,.4f} | 1.000 | "
                         + (f"{dense['lambada_acc']:.3f} | " if causal else "") + "- | - |")
        measured = sorted((r for r in mine if r["method"] != "dense"),
                          key=lambda r: (r["target_ratio"], r["method"] != "svd", r["method"]))
        for r in measured:
            value = r.get(key)
            shown = "-" if value is None else f"{value:,.4f}"
            versus = f"{value / dense[key]:.3f}" if value is not None and dense and dense.get(key) else "-"
            base = svd.get(r["target_ratio"])
            beside = "-" if base is None or base is r else f"{base['embedding_ratio']:.2f}x, {base[key]:,.4f}"
            lambada = (f"{r['lambada_acc']:.3f} | " if "lambada_acc" in r
                       else "skipped | " if (value or 0) > BROKEN_PPL else "- | ") if causal else ""
            healed = r.get("healed", {})
            healed = (f"{healed[key]:,.4f} ({healed[key] / dense[key]:.3f})" if key in healed and dense
                      and dense.get(key) else "-")
            lines.append(f"| {r['target_ratio']:g}x | {r['method']} | {r['embedding_ratio']:.2f}x | {r['params']:,} | "
                         f"{r['table_rel_error']:.3f} | {shown} | {versus} | {lambada}{healed} | {beside} |")
        lines += [""] + headline(rows, model) + [""]
    if skipped := _not_measured(rows, broken=True):
        lines += [f"Not run, as the method broke (wt2-16k above {BROKEN_PPL:,.0f}) at a smaller ratio: "
                  + "; ".join(skipped) + ".", ""]
    if todo := _not_measured(rows):
        lines += ["Not yet measured (`python benchmarks/embeddings.py` resumes there, keeping the rows it has): "
                  + "; ".join(todo) + "."]
    return "\n".join(lines)


def main(readme: Path = README) -> None:
    """Rewrite the results section of ``readme`` from ``benchmarks/results/``; the text outside the markers
    is kept as it is."""
    parts: list[str] = []
    if causal := _load("causal_lm"):
        done = {r["recipe"] for r in causal["rows"]}
        todo = [name for name in CAUSAL_RECIPES if name not in done]
        full = next(r for r in causal["rows"] if r["recipe"] == "dense").get("full", {})
        whole = (f" Dense on `wt2-full` (the whole test set, {full['protocols']['wikitext2_ppl'].split(', ')[-1]}, "
                 f"same windows): perplexity {full['wikitext2_ppl']:.2f}." if "wikitext2_ppl" in full else "")
        parts += section("SmolLM2-135M (a real pretrained causal LM), every recipe, training-free", "causal_lm",
                         _table_of("causal_lm") + "\n\nThe teacher is SmolLM2-135M-Instruct's GGUF Q4_1 weights "
                         "dequantized to float32 (itself a 4-bit quantization of the release). `wt2-16k`: the first "
                         "16,384 tokens of WikiText-2 raw test, sliding windows of 1024, stride 512, token-level; "
                         "LAMBADA: first 1,000 passages, last-word accuracy; teacher KL: nats per token on held-out "
                         "`lm_text`. No calibration and no distillation: these are the data-blind methods as "
                         "published, and they break a real causal LM (see the calibrated results)." + whole
                         + (f" Not yet measured (the benchmark resumes there): {', '.join(todo)}." if todo else ""))
    if _load("calibrated"):
        text = (RESULTS / "calibrated.md").read_text()
        tables = re.findall(r"(?:^\|.*\|\n)+", text, re.M)
        parts += section("Data-aware (calibrated) compression, training-free", "calibrated",
                         "\n\n".join(t.rstrip() for t in tables) + "\n\nFirst table: SmolLM2-135M, protocol as above "
                         "(`wt2-16k`, LAMBADA 1,000 passages, teacher KL); the dense and data-blind rows are those of "
                         "`causal_lm.json`. `kronecker`, `kronecker-whitened` and `kronecker-whitened-permuted` are "
                         "uniform Kronecker sums with 2 x 2 `B` factors (rank 2) at mlp 50%, with 4 x 4 `B` factors "
                         "(TQCompressor's) at the other budgets; `*-allocated` rows spend one budget across their "
                         "matrices. Second table: all-MiniLM-L6-v2, FFNs at half their parameters, STS-B and "
                         "SICK-R test Spearman, calibrated on 1,024 training sentences, dense measured in the same "
                         "run. Calibration never reads a test split. " + " ".join(re.findall(r"^On `wt2-full`.*$", text,
                                                                                            re.M)))
    if _load("heal_causal_lm"):
        text = (RESULTS / "heal_causal_lm.md").read_text()
        reference = re.findall(r"^Dense (?:is not measured|`wt2-full` marked).*$", text, re.M)
        parts += section("SmolLM2-135M healed within a CPU budget (issue 11)", "heal_causal_lm",
                         _table_of("heal_causal_lm") + "\n\nEach phase measured as above (`wt2-16k`, LAMBADA 1,000 "
                         "passages, teacher KL): training-free; after block-wise reconstruction on `lm_text` "
                         "calibration blocks; after end-to-end distillation (top-64 teacher store, factors only). "
                         "Healing CPU-minutes are the process's CPU time (getrusage), the store's teacher pass "
                         "included. " + " ".join(reference))
    if _load("heal_causal_lm_gpu"):
        parts += section("SmolLM2-135M healed at GPU scale (issue 11)", "heal_causal_lm_gpu",
                         _table_of("heal_causal_lm_gpu") + "\n\nThe same recipes, phases and evaluation on a lent "
                         "GPU: more calibration blocks in the reconstruction, a live teacher (full-vocabulary logit "
                         "KL, bf16 autocast) in the distillation, its length set in wall seconds; compression on the "
                         "CPU. The CPU-minutes column is the process's CPU time, not a budget.")
    if _load("heal_minilm"):
        parts += section("all-MiniLM-L6-v2 healed within a CPU budget (issue 11)", "heal_minilm",
                         _table_of("heal_minilm") + "\n\nSTS-B and SICK-R test Spearman (mean pooling, cosine) after "
                         "each phase: training-free; after block-wise reconstruction on training sentences (`lm_text` "
                         "and STS-B/SICK train pairs); after embedding distillation with model selection on 300 STS-B "
                         "dev pairs. Budget 30 CPU-minutes of healing per recipe (process CPU time); dense measured "
                         "in the same run.")
    if _load("minilm_recipes"):
        parts += section("all-MiniLM-L6-v2, every MiniLM recipe, no training", "minilm_recipes",
                         _table_of("minilm_recipes") + "\n\nSTS-B and SICK-R test Spearman of mean-pooled "
                         "embeddings (cosine); parameters counted as unique tensors; `tensorlm run`, the "
                         "uncompressed model measured in the same run.")
    if speed := _load("speed"):
        tables = re.findall(r"(?:^\|.*\|\n)+", (RESULTS / "speed.md").read_text(), re.M)
        parts += section("Inference speed and memory against dense (issue 14)", "speed",
                         "\n\n".join(t.rstrip() for t in tables)
                         + "\n\nFirst table all-MiniLM-L6-v2, second SmolLM2-135M. "
                         "2 CPU threads; every time the median of at least 5 calls after a warm-up, each row in a "
                         "fresh process; `factorized`: every factored layer runs its factored forward; `chosen`: per "
                         "layer, the faster of that and the reconstructed dense weight (`choose_forward`). Ratios > 1 "
                         "are better than dense. `load`: the 1-minute load average when the row started (several "
                         "values when its metrics come from runs at different loads). The plain columns compare with "
                         "the dense row, measured at the load in its row: a row measured on a busier machine is "
                         "slower for that alone, and only its `_paired` columns (each call timed alternately with "
                         "dense in the same worker, so that both see the same load) compare fairly: on this shared "
                         f"virtual machine {_dense_spread(speed['rows'])}. "
                         "Peak RSS includes the Python, torch and transformers runtime (about 0.45 GiB); a "
                         "`chosen` layer that takes the reconstructed path keeps its dense weight beside its factors "
                         "(more resident memory for the speed). Only the rows shown are measured.")
    if _load("model_latency"):
        parts += section("Forward latency on this CPU, same models", "model_latency", _table_of("model_latency"))
    if _load("kronecker_real_weights"):
        parts += section("Kronecker vs truncated SVD at half the parameters (real weights)", "kronecker_real_weights",
                         _table_of("kronecker_real_weights"))
    if _load("kronecker_heldout"):
        parts += section("Data-aware Kronecker sums on held-out text (issue 10)", "kronecker_heldout",
                         _table_of("kronecker_heldout") + "\n\nSmolLM2-135M MLP matrices (layers 1, 15, 28; "
                         "`gate_proj` and `down_proj`), each method fitted on the 16,384 calibration tokens and scored "
                         "by its relative output error `||(W - W~) G^{1/2}||_F / ||W G^{1/2}||_F` there and on 16,384 "
                         "disjoint `lm_text` tokens, at equal values per matrix (92 or 170 Kronecker terms of 4,800 "
                         "values; the whitened SVD at the same count). Means over the matrices; every matrix in the "
                         "file.")
    if _load("permutation_gain"):
        parts += section("TQCompressor permutations", "permutation_gain", _table_of("permutation_gain"))
    if sweep := _load("tensorgpt_sweep"):
        parts += section("TensorGPT: per-row TT embeddings, no training", "tensorgpt_sweep",
                         "\n".join(f"- {line}" for line in sweep["findings"]))
    if embeddings := _load("embeddings"):
        parts += section("Embedding compression where embeddings dominate (issue 15): training-free, and with the "
                         "table healed", "embeddings",
                         embeddings_body(embeddings))
    if _load("embedding_limits"):
        parts += section("What limits the frequency-split table (issue 15)", "embedding_limits",
                         _table_of("embedding_limits") + "\n\n`svd-frequency-whitened-split-2m` built as in the sweep; "
                         "`both`: the compressed model; `lookup`: its table for the lookups with the dense head; "
                         "`head`: the dense lookups with its table as the head; `healed`: `both` after healing the "
                         "table alone by its tied head's KL (`embedding_head: kl`, at most 200 Adam steps at lr 1e-4 "
                         "on the calibration text, 1/8 held out). `wt2-16k` as above; the NLL columns "
                         "split the same scored tokens by whether the target's row is factored or kept dense; `p on "
                         "factored rows`: the mean probability the model gives the factored rows.")
    if _load("tucker_bank"):
        parts += section("Tucker matrix bank (Ren, Wang et al.), no training", "tucker_bank", _table_of("tucker_bank"))
    for name, title in (("distill_minilm", "Distillation: all-MiniLM-L6-v2, Kronecker FFN"),
                        ("distill_minilm-tucker-bank-1x7", "Distillation: all-MiniLM-L6-v2, Tucker bank at 1/7"),
                        ("distill_causal_lm", "Distillation: a small GPT-2 trained here, KnGPT2-style student")):
        if _load(name):
            parts += section(title, name, _table_of(name))
    expected = ("causal_lm", "calibrated", "speed", "minilm_recipes", "model_latency", "kronecker_real_weights",
                "permutation_gain", "tensorgpt_sweep", "embeddings", "tucker_bank", "distill_minilm",
                "distill_minilm-tucker-bank-1x7", "distill_causal_lm")
    missing = [n for n in expected if not _load(n)]
    if missing:
        parts += [f"Not yet measured: {', '.join(missing)}.", ""]
    text = readme.read_text()
    new = re.sub(r"<!-- results:start -->.*<!-- results:end -->",
                 lambda _: "<!-- results:start -->\n" + "\n".join(parts) + "<!-- results:end -->", text, flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=README, help="the file to rewrite (default README.md)")
    main(parser.parse_args().readme)
