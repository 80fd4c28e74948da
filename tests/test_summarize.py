"""``benchmarks/summarize.py``: the README's results section is rebuilt from ``benchmarks/results/`` alone.

The embeddings section shows every row beside dense and beside the SVD row of the same target ratio, and
names what the sweep has not measured; rewriting a README keeps the text outside the markers and is
idempotent.
"""

from __future__ import annotations

from benchmark_scripts import benchmark_script

summarize = benchmark_script("summarize")
embeddings = benchmark_script("embeddings")


def row(method: str, target: float | None, ratio: float, stsb: float, **extra) -> dict:
    return {"model": "minilm", "method": method, "target_ratio": target, "embedding_ratio": ratio,
            "params": 1000 + int(100 / ratio), "embedding_params": round(1200 / ratio), "stsb": stsb,
            "table_rel_error": 0.0 if method == "dense" else 0.5, "load_average": 2.5, **extra}


def data(rows: list[dict]) -> dict:
    protocol = "Intro that stays out.\n\nMethods: svd and tensorgpt.\n\nProtocols: STS-B test Spearman.\n\nRun: no."
    return {"protocol": protocol, "machine": "a test machine", "rows": rows}


def table_row(text: str, method: str, target: str) -> list[str]:
    """The cells of the table row of ``method`` at ``target`` (e.g. ``"2x"``)."""
    found = [line for line in text.splitlines() if line.startswith(f"| {target} | {method} |")]
    assert len(found) == 1, found
    return [cell.strip() for cell in found[0].strip("|").split("|")]


def test_embeddings_rows_sit_beside_dense_and_the_svd_of_their_target():
    rows = [row("dense", None, 1.0, 0.8, model_notes=[]), row("svd", 2.0, 2.0, 0.72),
            row("tensorgpt", 2.0, 2.09, 0.76, healed={"stsb": 0.78}), row("tensorgpt", 3.3, 3.37, 0.6)]
    text = summarize.embeddings_body(data(rows))
    assert "Methods: svd and tensorgpt." in text and "Protocols: STS-B test Spearman." in text
    assert "Intro that stays out" not in text and "Run: no." not in text
    assert "Machine: a test machine." in text
    assert "dense STS-B test 0.8000" in text and "token table 1,200 values" in text
    dense = table_row(text, "dense", "-")
    assert dense[5:7] == ["0.8000", "1.000"]
    tt = table_row(text, "tensorgpt", "2x")
    assert tt[2] == "2.09x" and tt[5] == "0.7600" and tt[6] == f"{0.76 / 0.8:.3f}" and tt[8] == "2.00x, 0.7200"
    assert tt[7] == f"0.7800 ({0.78 / 0.8:.3f})"  # after healing the table
    assert table_row(text, "svd", "2x")[7:] == ["-", "-"]  # not healed, not beside itself
    assert table_row(text, "tensorgpt", "3.3x")[8] == "-"  # no SVD row at 3.3x
    # no row keeps 99% of 0.8, healed or not, which the target line says
    assert "none of the 4 rows (target: >= 3x); the best at 3x or more: tensorgpt at 3.37x, STS-B 0.6000 (75.0% of" \
        " dense)" in text


def test_embeddings_lists_what_the_sweep_has_not_measured():
    text = summarize.embeddings_body(data([row("dense", None, 1.0, 0.8), row("svd", 2.0, 2.0, 0.72)]))
    todo = text.split("Not yet measured")[1]
    assert "smollm2: not yet run" in todo and "gemma3: not yet run" in todo
    assert "svd at 3.3x, 5x, 10x, 20x, 40x" in todo and "svd at 2x" not in todo
    assert "kronecker-permute at 2x, 3.3x, 5x;" in todo  # the permutation search stops at 6x
    assert "untied" not in todo.split("smollm2")[0]  # an encoder has no head to untie


def test_rewriting_a_readme_keeps_the_rest_and_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nkept above\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nkept below\n")
    summarize.main(readme)
    once = readme.read_text()
    assert once.startswith("# title\n\nkept above\n\n<!-- results:start -->\n### ")
    assert once.endswith("<!-- results:end -->\n\nkept below\n") and "\nold\n" not in once
    if (summarize.RESULTS / "embeddings.json").exists():
        assert "### Embedding compression where embeddings dominate" in once
    summarize.main(readme)
    assert readme.read_text() == once


def test_a_causal_row_above_the_lambada_bound_says_skipped():
    def causal(method, target, ratio, ppl, **extra):
        return {**row(method, target, ratio, 0.0, **extra), "model": "smollm2", "wikitext2_ppl": ppl}

    rows = [causal("dense", None, 1.0, 18.75, lambada_acc=0.297), causal("svd", 2.0, 2.0, 2_000.0),
            causal("tensorgpt", 2.0, 2.0, 900.0, lambada_acc=0.01)]
    text = summarize.embeddings_body(data(rows))
    assert table_row(text, "svd", "2x")[7] == "skipped"  # above BROKEN_PPL: not scored
    assert table_row(text, "tensorgpt", "2x")[7] == "0.010"


def test_a_method_broken_at_a_smaller_ratio_is_listed_as_not_run_not_as_missing():
    def causal(method, target, ppl):
        out = {**row(method, target, target or 1.0, 0.0), "model": "smollm2", "wikitext2_ppl": ppl,
               "lambada_acc": 0.1}
        del out["stsb"]
        return out

    rows = [causal("dense", None, 18.75), causal("svd", 2.0, 900.0), causal("svd", 3.3, 2_000.0),
            causal("tensorgpt", 2.0, 1_500.0)]
    assert embeddings.broken_below(rows, "smollm2", "svd", 3.3) is None  # 3.3x itself is measured, 2x was fine
    assert embeddings.broken_below(rows, "smollm2", "svd", 10.0)["target_ratio"] == 3.3
    assert embeddings.broken_below(rows, "smollm2", "tensorgpt", 3.3)["target_ratio"] == 2.0
    assert embeddings.broken_below(rows, "smollm2", "tensorgpt", 2.0) is None
    assert embeddings.broken_below(rows, "gemma3", "tensorgpt", 3.3) is None  # another model's rows do not count
    text = summarize.embeddings_body(data(rows))
    skipped, todo = text.split("Not run, as the method broke")[1].split("Not yet measured")
    assert "svd at 5x, 10x, 20x, 40x" in skipped and "tensorgpt at 3.3x, 5x, 10x, 20x, 40x" in skipped
    assert "smollm2: svd at" not in todo and "smollm2: tensorgpt at" not in todo.split(";")[0]
    assert "tt-matrix at 2x, 3.3x" in todo.split("smollm2: ")[1]
