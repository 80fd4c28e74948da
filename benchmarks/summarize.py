"""Rebuild the README's results section from the committed files in ``benchmarks/results/``.

Run: ``python benchmarks/summarize.py`` (after any benchmark). Replaces the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md; a benchmark whose results are
not committed is listed as such, never filled in by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from causal_lm import RECIPES as CAUSAL_RECIPES

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


def section(title: str, name: str, body: str) -> list[str]:
    return [f"### {title}", "", body.strip(), "", f"Files: {_link(name)}.", ""]


def main() -> None:
    parts: list[str] = []
    if causal := _load("causal_lm"):
        done = {r["recipe"] for r in causal["rows"]}
        todo = [name for name in CAUSAL_RECIPES if name not in done]
        parts += section("SmolLM2-135M (a real pretrained causal LM), every recipe, training-free", "causal_lm",
                         _table_of("causal_lm") + "\n\nThe teacher is SmolLM2-135M-Instruct's GGUF Q4_1 weights "
                         "dequantized to float32 (itself a 4-bit quantization of the release). `wt2-16k`: the first "
                         "16,384 tokens of WikiText-2 raw test, sliding windows of 1024, stride 512, token-level; "
                         "LAMBADA: first 1,000 passages, last-word accuracy; teacher KL: nats per token on held-out "
                         "`lm_text`. No calibration and no distillation: these are the data-blind methods as "
                         "published, and they break a real causal LM (see the calibrated results)."
                         + (f" Not yet measured (the benchmark resumes there): {', '.join(todo)}." if todo else ""))
    if _load("calibrated"):
        tables = re.findall(r"(?:^\|.*\|\n)+", (RESULTS / "calibrated.md").read_text(), re.M)
        parts += section("Data-aware (calibrated) compression, training-free", "calibrated",
                         "\n\n".join(t.rstrip() for t in tables) + "\n\nFirst table: SmolLM2-135M, protocol as above "
                         "(`wt2-16k`, LAMBADA 1,000 passages, teacher KL); the dense and data-blind rows are those of "
                         "`causal_lm.json`. Second table: all-MiniLM-L6-v2, FFNs at half their parameters, STS-B and "
                         "SICK-R test Spearman, calibrated on 1,024 training sentences, dense measured in the same "
                         "run. Calibration never reads a test split.")
    if _load("minilm_recipes"):
        parts += section("all-MiniLM-L6-v2, every MiniLM recipe, no training", "minilm_recipes",
                         _table_of("minilm_recipes") + "\n\nSTS-B and SICK-R test Spearman of mean-pooled "
                         "embeddings (cosine); parameters counted as unique tensors; `tensorlm run`, the "
                         "uncompressed model measured in the same run.")
    if _load("speed"):
        tables = re.findall(r"(?:^\|.*\|\n)+", (RESULTS / "speed.md").read_text(), re.M)
        parts += section("Inference speed and memory against dense (issue 14)", "speed",
                         "\n\n".join(t.rstrip() for t in tables)
                         + "\n\nFirst table all-MiniLM-L6-v2, second SmolLM2-135M. "
                         "One quiet run on 2 CPU threads, median of 5 "
                         "after warm-up, each row in a fresh process; `factorized`: every factored layer runs its "
                         "factored forward; `chosen`: per layer, the faster of that and the reconstructed dense "
                         "weight (`choose_forward`). Ratios > 1 are better than dense. Peak RSS includes the "
                         "Python, torch and transformers runtime (about 0.45 GiB). Only the rows shown are measured.")
    if _load("model_latency"):
        parts += section("Forward latency on this CPU, same models", "model_latency", _table_of("model_latency"))
    if _load("kronecker_real_weights"):
        parts += section("Kronecker vs truncated SVD at half the parameters (real weights)", "kronecker_real_weights",
                         _table_of("kronecker_real_weights"))
    if _load("permutation_gain"):
        parts += section("TQCompressor permutations", "permutation_gain", _table_of("permutation_gain"))
    if sweep := _load("tensorgpt_sweep"):
        parts += section("TensorGPT: per-row TT embeddings, no training", "tensorgpt_sweep",
                         "\n".join(f"- {line}" for line in sweep["findings"]))
    if _load("tucker_bank"):
        parts += section("Tucker matrix bank (Ren, Wang et al.), no training", "tucker_bank", _table_of("tucker_bank"))
    for name, title in (("distill_minilm", "Distillation: all-MiniLM-L6-v2, Kronecker FFN"),
                        ("distill_minilm-tucker-bank-1x7", "Distillation: all-MiniLM-L6-v2, Tucker bank at 1/7"),
                        ("distill_causal_lm", "Distillation: a small GPT-2 trained here, KnGPT2-style student")):
        if _load(name):
            parts += section(title, name, _table_of(name))
    expected = ("causal_lm", "calibrated", "speed", "minilm_recipes", "model_latency", "kronecker_real_weights",
                "permutation_gain", "tensorgpt_sweep", "tucker_bank", "distill_minilm",
                "distill_minilm-tucker-bank-1x7", "distill_causal_lm")
    missing = [n for n in expected if not _load(n)]
    if missing:
        parts += [f"Not yet measured: {', '.join(missing)}.", ""]
    text = README.read_text()
    new = re.sub(r"<!-- results:start -->.*<!-- results:end -->",
                 lambda _: "<!-- results:start -->\n" + "\n".join(parts) + "<!-- results:end -->", text, flags=re.S)
    README.write_text(new)


if __name__ == "__main__":
    main()
