"""The Markdown report of a run, built from its :class:`~tensorlm.pipeline.RunResults`."""

from __future__ import annotations

from tensorlm.params import GROUPS


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}"
    return str(value)


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
    """The full ``report.md`` of a run (a :class:`~tensorlm.pipeline.RunResults`)."""
    params, ratios = results.params, results.compression
    lines = [
        f"# {results.recipe['name']} on {results.model}",
        "",
        results.recipe.get("description", "").strip(),
        "",
        "## Quality",
        "",
        metrics_table(results.metrics["before"], results.metrics["after"]) if results.metrics["before"]
        else "Not evaluated (`--eval none`).",
        "",
        *[f"Agreement with the uncompressed model, `{k}`: {_fmt(v)}." for k, v in
          results.metrics.get("agreement", {}).items()],
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
