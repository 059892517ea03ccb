"""``--sweep 0.3,0.5,0.7``: one pruned bundle per ratio, benchmarked side by side.

OUT holds ``unpruned/`` (the same conversion without pruning, the reference row),
one bundle per ratio named ``<kind>-<ratio>`` (e.g. ``latency-0.5``), and
``bench/`` with the `edgerep bench` report over all of them (``bench.json``,
``bench.md``, ``bench.html``): every artifact of every bundle on every runtime here
(quantized variants included when the bundles were quantized), accuracy on the
calibration data's evaluation samples, the accuracy-vs-latency Pareto plot, and a
``pruning`` section: per variant MACs, params, the measured p50 ratio against the
unpruned bundle on each backend, and top-1 before/after.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError

if TYPE_CHECKING:
    from edgerep.bench.latency import LatencyConfig
    from edgerep.quantize import CalibrationData

__all__ = ["parse_sweep", "pruning_summary", "run_sweep"]

#: make_bundle(out_dir, target or None for the unpruned reference)
MakeBundle = Callable[[Path, "str | None"], Any]


def parse_sweep(text: str, kind: str) -> list[str]:
    """``0.3,0.5,0.7`` -> ``["latency=0.3", ...]`` for the --target's `kind`.

    Raises:
        ConfigError: not a comma-separated list of ratios in (0, 1), or a widths target.
    """
    from edgerep.prune._config import parse_target

    if kind == "widths":
        raise ConfigError("--sweep takes ratios; it goes with latency=, macs= or params= targets")
    try:
        ratios = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(
            f"cannot read --sweep {text!r}; give ratios of the --target kind, e.g. --sweep 0.3,0.5,0.7"
        ) from e
    if not ratios:
        raise ConfigError("--sweep names no ratio; e.g. --sweep 0.3,0.5,0.7")
    targets = [parse_target(f"{kind}={r:g}").to_text() for r in ratios]
    if len(set(targets)) != len(targets):  # compared as written: 0.3 and 0.30000001 are one
        raise ConfigError(f"--sweep {text!r} repeats a ratio")
    return targets


def _variant(target: str) -> str:
    return target.replace("=", "-")


def pruning_summary(
    report: Mapping[str, Any], pruned: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The ``pruning`` section of a sweep's bench report.

    Args:
        report: the bench report (rows of the unpruned bundle first).
        pruned: variant name -> its ``prune_report.json``.
    """
    from edgerep.bench.report import _runtime_label, pareto_front

    rows = report["rows"]
    base: dict[tuple[str, str, str], float] = {
        (r["runtime"], r["format"], r["precision"]): r["latency"]["stats"]["p50_ms"]
        for r in rows
        if r["variant"] == "unpruned"
    }
    variants = []
    for name, rep in pruned.items():
        ratios = {}
        for r in rows:
            key = (r["runtime"], r["format"], r["precision"])
            if r["variant"] == name and key in base:
                # the runtime with the precision that ran (OpenVINO's default may be bf16)
                ratios[f"{_runtime_label(r)} {r['format']}/{r['precision']}"] = (
                    r["latency"]["stats"]["p50_ms"] / base[key]
                )
        acc = rep.get("accuracy") or {}
        variants.append(
            {
                "variant": name,
                "target": rep.get("target"),
                "status": rep.get("status"),
                "backend": rep.get("backend"),
                "ratio_in_search": rep.get("achieved"),
                "macs_before": rep.get("macs_before"),
                "macs_after": rep.get("macs_after"),
                "params_before": rep.get("params_before"),
                "params_after": rep.get("params_after"),
                "p50_ratio": ratios,
                "top1_before": acc.get("before"),
                "top1_after": acc.get("finetuned", acc.get("pruned")),
                "finetune": rep.get("finetune"),
            }
        )
    points = []
    for r in rows:
        acc = (r.get("accuracy") or {}).get("top1")
        if isinstance(acc, int | float):
            points.append(
                {
                    "variant": r["variant"],
                    "runtime": _runtime_label(r),
                    "precision": r["precision"],
                    "p50_ms": r["latency"]["stats"]["p50_ms"],
                    "top1": float(acc),
                }
            )
    front = set(pareto_front([(p["p50_ms"], p["top1"]) for p in points]))
    for i, p in enumerate(points):
        p["pareto"] = i in front
    return {"variants": variants, "points": points}


def run_sweep(
    out: str | Path,
    targets: Sequence[str],
    make_bundle: MakeBundle,
    *,
    data: CalibrationData | None,
    input_names: Sequence[str],
    overwrite: bool = False,
    latency_config: LatencyConfig | None = None,
    threads: int | None = 1,
) -> tuple[Path, dict[str, Any]]:
    """Build the unpruned bundle and one per target inside OUT, then bench them all.

    Nothing is written to OUT unless everything succeeds (a failed variant leaves an
    earlier OUT as it was).

    Returns:
        OUT and the bench report (with its ``pruning`` section).
    """
    import numpy as np

    from edgerep.bench.report import write_report
    from edgerep.bench.suite import run_bench
    from edgerep.bundle import atomic_output_dir, check_output_dir
    from edgerep.demo import _relocated

    target_dir = check_output_dir(out, overwrite=overwrite)
    with atomic_output_dir(target_dir, overwrite=overwrite) as tmp:
        make_bundle(tmp / "unpruned", None)
        names = []
        for t in targets:
            names.append(_variant(t))
            make_bundle(tmp / names[-1], t)
        bench_data = None
        if data is not None and len(input_names) == 1:
            (tmp / "bench").mkdir()
            bench_data = tmp / "bench" / "eval.npz"
            arrays = {"x": np.asarray(data.eval_feeds[input_names[0]])}
            if data.labels is not None:
                arrays["y"] = np.asarray(data.labels)
            np.savez(bench_data, **arrays)  # type: ignore[arg-type]
        report = run_bench(
            [f"unpruned={tmp / 'unpruned'}", *(f"{n}={tmp / n}" for n in names)],
            data=str(bench_data) if bench_data else None,
            config=latency_config,
            threads=threads,
            roofline=False,
        )
        pruned = {n: json.loads((tmp / n / "prune_report.json").read_text()) for n in names}
        report["pruning"] = pruning_summary(report, pruned)
        report = _relocated(report, tmp, target_dir)
        write_report(report, tmp / "bench")
    return target_dir, report
