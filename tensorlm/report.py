"""The Markdown report of a run, built from its :class:`~tensorlm.pipeline.RunResults`, and its JSON.

JSON never holds ``NaN`` or ``Infinity``: a value that could not be computed (non-finite) is written as
``null``, with the reason under ``metrics_notes`` keyed by its dotted path (:func:`null_non_finite`), and
every writer uses ``allow_nan=False`` (:func:`json_text`), so a regression fails loudly.
"""

from __future__ import annotations

import json
import math

from tensorlm.params import GROUPS

NOT_FINITE = "could not be computed: it came out {value} (non-finite; e.g. overflowing logits or an empty set)"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}"
    return str(value)


def null_non_finite(value, path: str = "") -> tuple[object, dict[str, str]]:
    """``value`` (nested dicts and lists) with every NaN/Inf float replaced by ``None``, and the reasons.

    Returns:
        ``(clean copy, {dotted path: reason})``.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, {path: NOT_FINITE.format(value=value)}
    notes: dict[str, str] = {}
    if isinstance(value, dict):
        clean = {}
        for key, item in value.items():
            clean[key], found = null_non_finite(item, f"{path}.{key}" if path else str(key))
            notes.update(found)
        return clean, notes
    if isinstance(value, (list, tuple)):
        items = [null_non_finite(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return [c for c, _ in items], {k: v for _, found in items for k, v in found.items()}
    return value, notes


def json_text(value, indent: int | None = 2) -> str:
    """``json.dumps`` with ``allow_nan=False``: a NaN that escaped :func:`null_non_finite` raises ``ValueError``."""
    return json.dumps(value, indent=indent, allow_nan=False)


def results_dict(results) -> dict:
    """``results.to_dict()`` (a :class:`~tensorlm.pipeline.RunResults`) with non-finite values ``null`` and
    the reasons added to ``metrics_notes``."""
    raw = results.to_dict()
    clean, notes = null_non_finite(raw)
    clean["metrics_notes"] = {**(clean.get("metrics_notes") or {}), **notes}
    return clean


def results_json(results) -> str:
    """The text of ``results.json``: :func:`results_dict`, with ``allow_nan=False``."""
    return json_text(results_dict(results))


def metrics_table(before: dict, after: dict) -> str:
    """Markdown table: metric, uncompressed, compressed, change."""
    rows = ["| metric | uncompressed | compressed | change |", "|---|---:|---:|---:|"]
    for key in before:
        b, a = before[key], after.get(key)
        change = "-" if a is None or b is None else f"{a - b:+.4f}" if abs(b) < 100 else f"{a - b:+,.2f}"
        rows.append(f"| {key} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return "\n".join(rows)


def params_table(before: dict, after: dict) -> str:
    """Markdown table of the parameter accounting of both models."""
    rows = ["| parameters | uncompressed | compressed |", "|---|---:|---:|"]
    for key in ("total", "total_without_head", "stored", "targeted"):
        if key in before:
            rows.append(f"| {key} | {_fmt(before[key])} | {_fmt(after.get(key))} |")
    for group in GROUPS:
        if before["groups"][group] or after["groups"][group]:
            rows.append(f"| group: {group} | {_fmt(before['groups'][group])} | {_fmt(after['groups'][group])} |")
    rows.append(f"| LM head | {before['tied_head'] or 'none'} | {after['tied_head'] or 'none'} |")
    return "\n".join(rows)


def render(results) -> str:
    """The full ``report.md`` of a run (a :class:`~tensorlm.pipeline.RunResults`).

    Partly random weights, and the notes of the loaded model, stand in a **Notes** line under the title;
    a metric that could not be computed shows as ``-`` with its reason under the quality table.
    """
    params, ratios = results.params, results.compression
    clean = results_dict(results)
    metrics = clean["metrics"]
    lines = [
        f"# {results.recipe['name']} on {results.model}",
        "",
        *_notes_line(results),
        results.recipe.get("description", "").strip(),
        "",
        "## Quality",
        "",
        metrics_table(metrics["before"], metrics["after"]) if metrics["before"] else "Not evaluated (`--eval none`).",
        "",
        *[f"Agreement with the uncompressed model, `{k}`: {_fmt(v)}." for k, v in metrics.get("agreement", {}).items()],
        *[f"- `{k}` is missing: {v}" for k, v in clean["metrics_notes"].items()],
        *_sample_lines(results.samples),
        "",
        "## Parameters",
        "",
        params_table(params["before"], params["after"]),
        "",
        f"Compression: whole model {ratio_phrase(ratios['model_ratio'])}"
        + (f", targeted modules {ratio_phrase(ratios['targeted_ratio'])}" if "targeted_ratio" in ratios else "")
        + f" ({len(results.replaced)} modules replaced). Compression took {results.seconds['compress']:.1f} s.",
        "",
        "## Protocols",
        "",
        *[f"- `{k}`: {v}" for k, v in results.protocols.items()],
        *_stage_lines(results.stages),
    ]
    if results.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in results.notes]]
    lines += ["", f"Machine: {results.machine}. tensorlm {results.tensorlm_version}, eval mode "
              f"`{results.eval_mode}`.", ""]
    return "\n".join(lines)


def _notes_line(results) -> list[str]:
    """The **Notes** line under a report's title: random weights first, then the model's notes."""
    notes = list(getattr(results, "notes", []) or [])
    if getattr(results, "random_weights", False):
        notes.insert(0, "the weights are partly or wholly RANDOM (no real checkpoint was available), so these "
                        "metrics describe the method on this architecture, not the real model")
    return [f"**Notes:** {'; '.join(notes)}.", ""] if notes else []


def ratio_phrase(ratio: float) -> str:
    """``2.000x smaller`` for a ratio ``before / after`` above 1, ``1.490x larger`` below it (growth is growth)."""
    return f"{ratio:.3f}x smaller" if ratio >= 1 else f"{1 / ratio:.3f}x larger"


def _sample_lines(samples: dict) -> list[str]:
    if not samples:
        return []
    return ["", f"Greedy continuation of {samples['prompt']!r} (32 new tokens):", "",
            f"- uncompressed: {samples['before']!r}", f"- compressed: {samples['after']!r}"]


def _stage_lines(stages: list[dict]) -> list[str]:
    if len(stages) <= 1 and not any("distill" in s for s in stages):
        return []
    lines = ["", "## Stages", "", "| stage | method | modules | distillation | metrics after the stage |",
             "|---|---|---:|---|---|"]
    for s in stages:
        d = s.get("distill")
        trained = f"{d['steps']} steps, best {d['metric']} {_fmt(d['best_metric'])} at step {d['best_step']}" \
            if d else "-"
        metric = ", ".join(f"{k} {_fmt(v)}" for k, v in s.get("metrics", {}).items()) or "-"
        lines.append(f"| {s['name']} | {s['method']} | {len(s['replaced'])} | {trained} | {metric} |")
    return lines
