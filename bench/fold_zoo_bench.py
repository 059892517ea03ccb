"""Fold bench of the mobile zoo families: edgerep.fold vs each model's own per-block fold.

Run from the repository root, alone on the machine (timings)::

    flock -x -w 900 /tmp/edgerep-cpu.lock .venv/bin/python bench/fold_zoo_bench.py

For each net of `bench/fold_reference.py` (random weights and BN statistics,
1x3x224x224): edgerep.fold's wall time and stages, the fold's peak resident memory
(the process's high-water mark reset before the fold, Linux), BatchNorm layers
left by edgerep and by the blocks' own deploy algebra, float32/float64 errors,
and onnxruntime batch-1 p50 of the original, the own fold and edgerep's fold,
measured interleaved (A B C C B A, `fold_bench._measure_abba`) at one thread.
Also RepVGG-A0's fold time (median of ``--a0-repeats`` at 2 threads, after a
warm-up fold), the target being <= 1 s. Writes ``bench/results/fold_zoo_bench.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _args import positive_float, positive_int
from fold_bench import (
    CpuMeter,
    _export,
    _measure_abba,
    _ort_session,
    peak_rss_mib,
    quiet_torch_logs,
    reset_peak_rss,
)
from fold_reference import NETS, reference_fold

from edgerep.fold import fold
from edgerep.fold._cost import count_flops, count_params
from edgerep.zoo import randomize_, repvgg_a0

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fold_zoo_bench.json"
SEED = 0


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rel(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max())


def bench_net(name: str, size: int, seconds: float, workdir: Path) -> dict[str, Any]:
    shape = (1, 3, size, size)
    model = randomize_(NETS[name](), seed=SEED).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 1))
    own = reference_fold(model)
    model64 = randomize_(NETS[name](), seed=SEED).double().eval()
    own64_err = _rel(model64, reference_fold(model64), x.double())
    if not own64_err <= 1e-9:
        raise RuntimeError(f"{name}: the reference fold is wrong ({own64_err:.1e} in float64)")

    reset = reset_peak_rss()
    meter = CpuMeter()
    start = time.perf_counter()
    folded, report = fold(model, x)
    fold_seconds = time.perf_counter() - start
    cpu_fold = meter.read()
    peak = peak_rss_mib() if reset else None
    folded64, report64 = fold(model64, x.double())

    exports = {
        "original": _export(model, size, workdir / f"{name}-original", do_fold=False),
        "own_fold": _export(own, size, workdir / f"{name}-own", do_fold=False),
        "edgerep": _export(model, size, workdir / f"{name}-edgerep", do_fold=True),
    }
    x_np = x.numpy()
    calls = {}
    for variant, e in exports.items():
        run = _ort_session(e["path"], 1)
        calls[variant] = lambda run=run: run(x_np)
    lat = _measure_abba(calls, seconds)
    p50 = {k: v["p50_ms"] for k, v in lat.items()}
    return {
        "name": name,
        "input_shape": list(shape),
        "params": count_params(model),
        "params_edgerep": report.params_after,
        "params_own_fold": count_params(own),
        "flops": report.flops_before,
        "flops_edgerep": report.flops_after,
        "flops_own_fold": count_flops(own, (x,)),
        "batch_norms": {
            "original": _batch_norms(model),
            "own_fold": _batch_norms(own),
            "edgerep": _batch_norms(folded),
        },
        "fold_seconds": fold_seconds,
        "stage_seconds": dict(report.stage_seconds),
        "fold_peak_rss_mib": peak,
        "fold_peak_rss_method": "VmHWM after resetting it (/proc/self/clear_refs 5) before the fold",
        "cpu_during_fold": cpu_fold,
        "kept": len(report.kept),
        "float32_max_rel_error": _rel(model, folded, x),
        "float64_max_rel_error": _rel(model64, folded64, x.double()),
        "float64_worst_region": report64.max_error,
        "own_fold_float64_max_rel_error": own64_err,
        "onnxruntime_p50_ms": p50,
        "onnxruntime": lat,
        "edgerep_over_original": p50["edgerep"] / p50["original"],
        "edgerep_over_own_fold": p50["edgerep"] / p50["own_fold"],
        "onnx_op_types": {k: e.get("op_types") for k, e in exports.items()},
    }


def a0_fold_time(repeats: int, threads: int) -> dict[str, Any]:
    """RepVGG-A0 (1x3x224x224) fold time: median of `repeats` after one warm-up fold."""
    torch.set_num_threads(threads)
    model = randomize_(repvgg_a0(), seed=SEED).eval()
    x = torch.randn(1, 3, 224, 224)
    fold(model, x)
    runs = []
    for _ in range(repeats):
        meter = CpuMeter()
        start = time.perf_counter()
        _, report = fold(model, x)
        runs.append(
            {
                "seconds": time.perf_counter() - start,
                "stage_seconds": dict(report.stage_seconds),
                "others_cores": meter.read()["others_cores"],
            }
        )
    torch.set_num_threads(1)
    seconds = sorted(r["seconds"] for r in runs)
    return {
        "threads": threads,
        "median_seconds": seconds[len(seconds) // 2],
        "min_seconds": seconds[0],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--latency-seconds", type=positive_float, default=1.0)
    p.add_argument("--nets", default=",".join(NETS), help="comma-separated subset")
    p.add_argument("--a0-repeats", type=positive_int, default=5, help="RepVGG-A0 timed folds")
    args = p.parse_args(argv)
    names = [n for n in args.nets.split(",") if n]
    unknown = sorted(set(names) - set(NETS))
    if unknown:
        p.error(f"unknown nets {unknown}; known: {', '.join(NETS)}")
    torch.set_num_threads(1)
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    start = time.perf_counter()
    rows = []
    with quiet_torch_logs(), tempfile.TemporaryDirectory(prefix="fold-zoo-") as tmp:
        # one warm-up fold: the first fold of a process pays one-time start-up costs
        warm = randomize_(NETS[names[0]](), seed=SEED).eval()
        fold(warm, torch.randn(1, 3, args.size, args.size))
        a0 = a0_fold_time(args.a0_repeats, threads=2)
        print(
            f"repvgg_a0 fold: median {a0['median_seconds']:.2f} s (min {a0['min_seconds']:.2f} s)"
        )
        for name in names:
            row = bench_net(name, args.size, args.latency_seconds, Path(tmp))
            rows.append(row)
            p50 = row["onnxruntime_p50_ms"]
            print(
                f"{name:<14} {row['params'] / 1e6:5.2f}M  fold {row['fold_seconds']:5.2f} s "
                f"peak {row['fold_peak_rss_mib'] or 0:6.0f} MiB  BN {row['batch_norms']['original']}"
                f" -> own {row['batch_norms']['own_fold']} / edgerep "
                f"{row['batch_norms']['edgerep']}  ORT p50 {p50['original']:.2f} -> own "
                f"{p50['own_fold']:.2f} / edgerep {p50['edgerep']:.2f} ms",
                flush=True,
            )
    results = {
        "schema_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["fold_zoo_bench.py", *(argv if argv is not None else sys.argv[1:])],
        "threads": {"torch": 1, "onnxruntime_intra_op": 1, "onnxruntime_inter_op": 1},
        "latency_method": "fold_bench._measure_abba: original, own fold, edgerep measured in "
        "A B C C B A order (edgerep.bench.measure_latency, warm-up 5, >= 20 iterations, "
        f">= {args.latency_seconds} s each); headline = lowest p50 of the undisturbed runs",
        "loadavg_before": loadavg_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "repvgg_a0_fold": a0,
        "nets": rows,
        "wall_seconds": time.perf_counter() - start,
    }
    busy = float(loadavg_before[0]) > 0.5
    results["note"] = (
        "the machine was busy with other work when the run started (1-minute load "
        f"{loadavg_before[0]}): latency and fold times carry that noise; compare the three "
        "variants of a net (interleaved) rather than absolute numbers"
        if busy
        else "machine idle at start"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
