"""Benchmark reports: JSON (with a schema version), a Markdown table, a self-contained HTML page.

A report is a plain dictionary (`REPORT_SCHEMA`): the environment fingerprint, the
settings, and one row per (variant, runtime) with its latency, accuracy, agreement
with the reference and roofline numbers. `write_report` writes ``bench.json``,
``bench.md`` and ``bench.html`` (plots embedded as base64 PNG: the latency
distribution per row, and accuracy versus p50 latency with the Pareto front), each
to a temporary name and renamed. The plots are drawn by `edgerep.bench.plots`,
imported (with matplotlib and its Agg backend) only when an HTML page is written.
"""

from __future__ import annotations

import html
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgerep._json import finite, schema_problems
from edgerep.errors import ConfigError

__all__ = [
    "REPORT_SCHEMA",
    "REPORT_SCHEMA_VERSION",
    "markdown_table",
    "pareto_front",
    "pruning_markdown",
    "quantization_markdown",
    "render_html",
    "validate_report",
    "write_report",
]

REPORT_SCHEMA_VERSION = 1
_MAX_PLOTTED_SAMPLES = 2000

_NUM = {"type": ["number", "null"]}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edgerep benchmark report",
    "type": "object",
    "required": ["schema_version", "kind", "created", "environment", "settings", "rows"],
    "properties": {
        "schema_version": {"const": REPORT_SCHEMA_VERSION},
        "kind": {"const": "edgerep-bench"},
        "created": {"type": "string"},
        "environment": {"type": "object"},
        "settings": {"type": "object"},
        "rows": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["variant", "runtime", "format", "latency"],
                "properties": {
                    "variant": {"type": "string", "minLength": 1},
                    "runtime": {"type": "string", "minLength": 1},
                    "format": {"type": "string"},
                    "precision": {"type": "string"},
                    "device": {"type": "string"},
                    "bundle": {"type": ["string", "null"]},
                    "session": {"type": "object"},
                    "latency": {
                        "type": "object",
                        "required": ["stats", "p50_ci_ms", "p50_spread", "unstable"],
                        "properties": {
                            "stats": {
                                "type": "object",
                                "required": ["n", "p50_ms", "p99_ms"],
                            },
                            "p50_ci_ms": {"type": "array", "items": _NUM},
                            "p50_spread": {"type": "number"},
                            "unstable": {"type": "boolean"},
                        },
                    },
                    "accuracy": {"type": ["object", "null"]},
                    "reference": {"type": ["object", "null"]},
                    "roofline": {"type": ["object", "null"]},
                    "samples_ms": {"type": "array", "items": {"type": "number"}},
                    "throughput": {"type": "array", "items": {"type": "object"}},
                    "device_memory_bytes": {"type": ["integer", "null"]},
                    "target": {"type": "string"},
                    "fingerprint": {"type": ["string", "null"]},
                },
            },
        },
        "devices": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "transport", "fingerprint"]},
        },
        "quantization": {
            "type": "array",
            "items": {"type": "object", "required": ["variant", "report"]},
        },
        "pruning": {
            "type": "object",
            "required": ["variants", "points"],
            "properties": {
                "variants": {"type": "array", "items": {"type": "object"}},
                "points": {"type": "array", "items": {"type": "object"}},
            },
        },
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["variant", "runtime", "error"],
            },
        },
    },
}


def validate_report(report: Any) -> list[str]:
    """Problems with `report` against `REPORT_SCHEMA` (empty when valid).

    Uses jsonschema when installed, else checks the required keys by hand.
    """
    return schema_problems(report, REPORT_SCHEMA, _validate_by_hand)


def _validate_by_hand(report: Any) -> list[str]:
    if not isinstance(report, dict):
        return ["<root>: expected an object"]
    problems = [f"<root>: {k!r} is required" for k in REPORT_SCHEMA["required"] if k not in report]
    if report.get("schema_version") != REPORT_SCHEMA_VERSION:
        problems.append(f"schema_version: {REPORT_SCHEMA_VERSION} was expected")
    row_required = REPORT_SCHEMA["properties"]["rows"]["items"]["required"]
    for i, row in enumerate(report.get("rows", [])):
        problems += [f"rows/{i}: {k!r} is required" for k in row_required if k not in row]
    return problems


def _thin(samples: Sequence[float]) -> list[float]:
    """At most `_MAX_PLOTTED_SAMPLES` quantiles of `samples` (the distribution, not the order)."""
    if len(samples) <= _MAX_PLOTTED_SAMPLES:
        return [float(v) for v in samples]
    import numpy as np

    q = np.linspace(0, 100, _MAX_PLOTTED_SAMPLES)
    return [float(v) for v in np.percentile(np.asarray(samples, dtype=np.float64), q)]


def _runtime_label(row: Mapping[str, Any]) -> str:
    """The runtime, with the inference precision that ran when the session reports one
    (OpenVINO's CPU default is bf16 on CPUs that have it, not fp32)."""
    session = row.get("session") or {}
    precision = session.get("inference_precision") if isinstance(session, Mapping) else None
    return f"{row['runtime']} ({precision})" if precision else str(row["runtime"])


def _label(row: Mapping[str, Any]) -> str:
    where = f"{row['target']}: " if row.get("target") else ""
    return f"{where}{row['variant']} / {_runtime_label(row)}"


def _accuracy_value(row: Mapping[str, Any]) -> float | None:
    acc = row.get("accuracy") or {}
    for key in ("top1", *sorted(acc)):
        v = acc.get(key)
        if isinstance(v, int | float) and key != "samples":
            return float(v)
    return None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) no other point beats on both, by latency.

    A point is on the front when no other point is at least as fast and at least as
    accurate, and strictly better on one of the two.
    """
    front = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            (lo <= lat and ao >= acc) and (lo < lat or ao > acc)
            for j, (lo, ao) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per (variant, runtime): p50 with its interval, p99, spread, throughput,
    first call, load, accuracy, agreement and % of roofline."""
    head = (
        "| variant | runtime | p50 ms (95% CI) | p99 ms | spread | items/s | first ms | "
        "load ms | accuracy | top-1 agree | max rel err | % peak |"
    )
    per_device = any(r.get("target") for r in report["rows"])
    if per_device:
        head = "| device | fingerprint " + head
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = report["rows"]
    for i, row in enumerate(rows):
        lat = row["latency"]
        st = lat["stats"]
        lo, hi = lat["p50_ci_ms"]
        flag = " (!)" if lat["unstable"] else ""
        acc = _accuracy_value(row)
        ref: dict[str, Any] = next(iter((row.get("reference") or {}).values()), {})
        roof = row.get("roofline") or {}
        # the reference: the first row (per device when devices are listed, each measured
        # against its own first row)
        is_ref = len(rows) > 1 and (
            i == 0
            or (
                per_device
                and row.get("reference") is None
                and rows[i - 1].get("target") != row.get("target")
            )
        )
        lines.append(
            "| "
            + " | ".join(
                (
                    [str(row.get("target", "-")), str(row.get("fingerprint") or "-")]
                    if per_device
                    else []
                )
                + [
                    row["variant"],
                    _runtime_label(row),
                    f"mean {st['p50_ms']:.3f} (no CI)†"
                    if lat.get("mean_only")
                    else f"{st['p50_ms']:.3f} ({_f(lo, '.3f')}..{_f(hi, '.3f')})",
                    _f(st.get("p99_ms"), ".3f"),
                    f"{lat['p50_spread']:.1%}{flag}",
                    _f(lat.get("throughput_items_per_s"), ".1f"),
                    _f(lat.get("first_ms"), ".2f"),
                    _f(lat.get("load_ms"), ".1f"),
                    "-" if acc is None else f"{acc:.2%}",
                    "(reference)" if is_ref else _f(ref.get("top1_agreement"), ".2%"),
                    "(reference)" if is_ref else _f(ref.get("max_rel_error"), ".1e"),
                    _peak_cell(roof),
                ]
            )
            + " |"
        )
    notes = [
        "",
        "p50 interval: bootstrap 95%; spread: (max - min) / median of the p50s of "
        f"{_repeats(report)} runs, (!) above the threshold (do not trust smaller differences); "
        + _peak_note(rows),
    ]
    for row in rows:
        why = row["latency"].get("mean_only")
        if why:
            notes.append(f"† {_label(row)}: a mean per call, not a p50: {why}.")
    if len(rows) > 1 and report.get("devices"):
        notes.append(
            "top-1 agree, max rel err: per device and bundle, against the first row that "
            "device measured."
        )
    elif len(rows) > 1:
        inputs = report.get("settings", {}).get("reference_inputs") or "the same inputs"
        notes.append(
            f"top-1 agree, max rel err: against the reference row {_label(rows[0])} (the first "
            f"row measured; list the reference target first), on {inputs}."
        )
    for dev in report.get("devices") or []:
        env = dev.get("environment") or {}
        what = env.get("cpu") or env.get("model") or "-"
        notes.append(
            f"- device {dev['name']} ({dev['transport']} {dev.get('address') or ''}): fingerprint "
            f"{dev.get('fingerprint') or '-'}, {what}, {env.get('os') or env.get('android') or '-'}"
        )
    for err in report.get("errors", []):
        where = f"{err['device']}: " if err.get("device") else ""
        notes.append(f"- {where}{err['variant']} / {err['runtime']}: not measured: {err['error']}")
    return "\n".join(lines + notes + _throughput_lines(report)) + "\n"


def _peak_cell(roof: Mapping[str, Any]) -> str:
    """``76.1%`` against the fp32 peak; ``19.9% of bf16`` against the peak at the row's own
    low precision; ``49.0% of fp32 (computes bf16)`` where no peak at its precision was
    measured, so the figure cannot be misread as a fraction of its own peak."""
    frac = roof.get("fraction_of_peak")
    if frac is None:
        return "-"
    peak = str(roof.get("peak_precision") or "fp32")
    computes = str(roof.get("compute_precision") or peak)
    if computes != peak:
        return f"{frac:.1%} of {peak} (computes {computes})"
    return f"{frac:.1%}" if peak == "fp32" else f"{frac:.1%} of {peak}"


def _peak_note(rows: Sequence[Mapping[str, Any]]) -> str:
    roofs = [r.get("roofline") or {} for r in rows]
    note = "% peak: FLOPs / p50 / measured GEMM peak at the row's precision (fp32: numpy's BLAS"
    if any((r.get("peak_precision") or "fp32") != "fp32" for r in roofs):
        note += "; bf16/f16: OpenVINO's CPU MatMul with that precision hint"
    note += ")."
    if any(
        r.get("compute_precision") and r.get("compute_precision") != r.get("peak_precision")
        for r in roofs
    ):
        note += (
            " 'of fp32 (computes X)': no GEMM peak at precision X was measured here, so the "
            "figure is relative to the fp32 peak, not to X's own (higher) peak."
        )
    return note


def quantization_markdown(report: Mapping[str, Any]) -> str:
    """Per quantized bundle and backend: every variant `edgerep quantize` measured, the
    choice, and the per-layer sensitivity table when the bundle has one ("" if none)."""
    out: list[str] = []
    for q in report.get("quantization") or []:
        rep = q["report"]
        out.append(
            f"### Quantization of {q['variant']} (mode {rep['mode']}, budget "
            f"{rep['max_drop']:.2%}, at least {rep['min_speedup']:.2f}x)"
        )
        for b in rep["backends"]:
            sel = b["selection"]
            out += [
                "",
                f"{b['backend']}: chose **{b['chosen']}**"
                + (f" ({b['reason']})" if b["reason"] else ""),
                "",
                f"| variant | p50 ms | speed-up | {sel['metric']} | drop | status |",
                "|---|---|---|---|---|---|",
            ]
            out += [
                f"| {c['name']} | {c['latency_ms']:.4f} | {c['speedup']:.2f}x | "
                f"{c['metric']:.4f} | {c['drop']:.4f} | {c['status']} |"
                for c in sel["candidates"]
            ]
            mixed = b.get("mixed_precision")
            if mixed:
                kept = ", ".join(mixed["kept_float"]) or "none"
                out += ["", f"mixed precision: {mixed['status']}; kept in float: {kept}"]
        if q.get("sensitivity_markdown"):
            out += ["", q["sensitivity_markdown"].rstrip()]
        out.append("")
    return "\n".join(out)


def pruning_markdown(report: Mapping[str, Any]) -> str:
    """A pruning sweep (``edgerep prune --sweep``): per variant MACs, params, measured p50
    ratio against the unpruned bundle per backend, top-1 before/after; "" if none."""
    pruning = report.get("pruning") or {}
    variants = pruning.get("variants") or []
    if not variants:
        return ""
    out = [
        "### Pruning sweep",
        "",
        "| variant | status | MACs | params | measured p50 / unpruned | top-1 before | "
        "top-1 after |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        macs = (
            f"{v['macs_after']:,} ({v['macs_after'] / v['macs_before']:.3f})"
            if v.get("macs_before")
            else "-"
        )
        params = (
            f"{v['params_after']:,} ({v['params_after'] / v['params_before']:.3f})"
            if v.get("params_before")
            else "-"
        )
        ratios = "; ".join(f"{k}: {r:.3f}" for k, r in (v.get("p50_ratio") or {}).items()) or "-"
        out.append(
            f"| {v['variant']} | {v.get('status') or '-'} | {macs} | {params} | {ratios} | "
            f"{_f(v.get('top1_before'), '.2%')} | {_f(v.get('top1_after'), '.2%')} |"
        )
    front = [p for p in pruning.get("points") or [] if p.get("pareto")]
    if front:
        out += [
            "",
            "Pareto front (accuracy vs p50, every row): "
            + ", ".join(
                f"{p['variant']} / {p['runtime']} {p['precision']} ({p['p50_ms']:.3f} ms, "
                f"{p['top1']:.2%})"
                for p in front
            ),
        ]
    out.append("")
    return "\n".join(out)


def _throughput_lines(report: Mapping[str, Any]) -> list[str]:
    """The throughput table (rows measured with concurrency), or nothing."""
    out = []
    for row in report["rows"]:
        for t in row.get("throughput") or []:
            if "error" in t:
                out.append(
                    f"| {_label(row)} | {t.get('concurrency', '-')} | - | - | - | {t['error']} |"
                )
                continue
            lat = t["latency"]
            out.append(
                f"| {_label(row)} | {t['concurrency']} | {t['inferences_per_s']:.1f} | "
                f"{lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} | {t.get('setup', '')} |"
            )
    if not out:
        return []
    head = "| variant / runtime | concurrency | inferences/s | p50 ms under load | p99 ms | setup |"
    return ["", head, "|" + "---|" * (head.count("|") - 1), *out]


def _repeats(report: Mapping[str, Any]) -> str:
    settings = report.get("settings", {}).get("latency", {})
    rows = report.get("rows") or []
    if "repeats" not in settings and rows:
        settings = rows[0]["latency"].get("config", {})
    return str(settings.get("repeats", "?"))


def _f(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page: the table, the plots (inline PNG) and the environment."""
    from edgerep.bench.plots import plot_pngs

    plots = plot_pngs(report)
    rows_md = markdown_table(report).splitlines()
    table = [r for r in rows_md if r.startswith("|")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in table]
    head, body = cells[0], cells[2:]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>edgerep bench</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}pre{background:#f6f6f6;"
        "padding:1em;overflow:auto}</style></head><body>",
        "<h1>edgerep benchmark</h1>",
        f"<p>created {html.escape(str(report.get('created', '')))}; schema version "
        f"{REPORT_SCHEMA_VERSION}</p>",
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>",
        *("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body),
        "</table>",
        "<p>" + html.escape(" ".join(r for r in rows_md if r and not r.startswith("|"))) + "</p>",
    ]
    for name, title in (("latency", "Latency distribution"), ("pareto", "Accuracy vs latency")):
        if name in plots:
            parts.append(
                f"<h2>{title}</h2><img id='plot-{name}' alt='{title}' "
                f"src='data:image/png;base64,{plots[name]}'>"
            )
    quantized = quantization_markdown(report)
    if quantized:
        parts.append("<h2>Quantization</h2><pre>" + html.escape(quantized) + "</pre>")
    pruned = pruning_markdown(report)
    if pruned:
        parts.append("<h2>Pruning</h2><pre>" + html.escape(pruned) + "</pre>")
    devices = report.get("devices") or []
    if devices:
        parts.append(
            "<h2>Devices</h2><table><tr><th>device</th><th>transport</th><th>address</th>"
            "<th>fingerprint</th><th>machine</th><th>errors</th></tr>"
        )
        for dev in devices:
            env_d = dev.get("environment") or {}
            what = env_d.get("cpu") or env_d.get("model") or "-"
            dev_cells = [
                dev["name"],
                dev["transport"],
                dev.get("address") or "-",
                dev.get("fingerprint") or "-",
                str(what),
                "; ".join(dev.get("errors") or []),
            ]
            parts.append(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in dev_cells) + "</tr>"
            )
        parts.append("</table>")
        for dev in devices:
            if dev.get("environment"):
                parts.append(
                    f"<h3>Environment of {html.escape(dev['name'])}</h3><pre>"
                    + html.escape(json.dumps(dev["environment"], indent=2, default=str))
                    + "</pre>"
                )
    env = json.dumps(report.get("environment", {}), indent=2, default=str)
    settings = json.dumps(report.get("settings", {}), indent=2, default=str)
    parts += [
        "<h2>Settings</h2><pre>" + html.escape(settings) + "</pre>",
        "<h2>Environment</h2><pre>" + html.escape(env) + "</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(
    report: Mapping[str, Any], out_dir: str | Path, *, html_page: bool = True
) -> dict[str, Path]:
    """Validate `report` and write ``bench.json``, ``bench.md`` and ``bench.html``.

    Rows' ``samples_ms`` are thinned to at most 2000 quantiles before writing.

    Returns:
        ``{"json": ..., "markdown": ..., "html": ...}`` paths.

    Raises:
        ConfigError: the report does not match `REPORT_SCHEMA`.
    """
    data = finite(dict(report))
    data["rows"] = [{**r, "samples_ms": _thin(r.get("samples_ms") or [])} for r in data["rows"]]
    problems = validate_report(data)
    if problems:
        raise ConfigError("benchmark report does not match its schema: " + "; ".join(problems[:10]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    _write(paths["json"], json.dumps(data, indent=2, allow_nan=False) + "\n")
    extra = "".join("\n" + s for s in (quantization_markdown(data), pruning_markdown(data)) if s)
    _write(paths["markdown"], markdown_table(data) + extra)
    if html_page:
        paths["html"] = out / "bench.html"
        _write(paths["html"], render_html(data))
    return paths
