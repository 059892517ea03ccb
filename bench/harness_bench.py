"""Harness honesty: edgerep's latency p50 vs a hand-written loop and OpenVINO's benchmark_app.

Run from the repository root (about 1-2 minutes on 2 cores)::

    .venv/bin/python bench/harness_bench.py [--threads 1] [--seconds 2] [--rounds 3]

It folds and exports `edgerep.zoo.demo_net` (random weights, input 1x1x32x32) to
ONNX and OpenVINO IR, then, with the same thread settings everywhere:

- **onnxruntime**: `edgerep.bench.benchmark_latency` over the edgerep session vs a
  minimal ``time.perf_counter_ns`` loop around the raw ``InferenceSession.run``;
- **openvino** (f32 precision, 1 stream, ``threads`` threads, sync API): edgerep vs a
  perf_counter loop around the raw ``InferRequest.infer`` vs ``benchmark_app``
  (``-hint none -nstreams 1 -nthreads T -nireq 1 -api sync -infer_precision f32
  -t S``; benchmark_app only accepts ``-nthreads`` with ``-hint none``), parsing
  its reported median;
- **openvino, preset tensors**: what benchmark_app itself times (``infer()`` on
  input tensors filled once, no numpy conversion), under edgerep's harness and a
  hand loop: the like-for-like comparison with benchmark_app's median;
- **overhead**: the harness's own cost per sample (p50 of timing an empty call) and
  the edgerep session wrapper's cost (edgerep ``Session.run`` p50 minus the raw
  call's p50), each as a fraction of the demo net's p50.

The methods are interleaved in ``--rounds`` rounds and each one's p50 is the median
over rounds, so that drift from other processes hits them alike. The machine's
load average before and after is recorded: other engineers share the 2 cores.
Writes ``bench/results/harness_bench.json`` (temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def hand_loop(fn, seconds: float, min_iters: int = 200) -> float:
    """The minimal loop a careful person writes: warm up, time each call, take the median."""
    for _ in range(20):
        fn()
    samples = []
    end = time.perf_counter() + seconds
    while len(samples) < min_iters or time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1e6


def edgerep_p50(run, feeds, seconds: float) -> dict:
    from edgerep.bench import LatencyConfig, benchmark_latency

    cfg = LatencyConfig(warmup_iters=20, warmup_seconds=0.0, min_iters=200, min_seconds=seconds / 3)
    r = benchmark_latency(run, feeds, config=cfg)
    return {"p50_ms": r.stats.p50_ms, "spread": r.p50_spread, "ci": list(r.p50_ci_ms)}


def benchmark_app(xml: Path, threads: int, seconds: float) -> float:
    exe = Path(sys.executable).parent / "benchmark_app"
    cmd = [
        str(exe), "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1",
        "-nthreads", str(threads), "-nireq", "1", "-api", "sync", "-infer_precision", "f32",
        "-t", str(max(1, round(seconds))), "-shape", "x[1,1,32,32]",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Latency:\s*\n.*?Median:\s*([\d.]+)\s*(ms|us)", out, re.S)
    if not m:
        raise RuntimeError(f"cannot find the median in benchmark_app's output:\n{out[-2000:]}")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "us" else value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per method and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "harness_bench.json"))
    args = p.parse_args()

    import onnxruntime as ort
    import openvino as ov
    import torch

    from edgerep.bench.env import environment_fingerprint
    from edgerep.pipeline import convert
    from edgerep.runtimes import get_runtime
    from edgerep.spec import parse_input_spec
    from edgerep.zoo import demo_net

    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = demo_net(num_classes=10, in_channels=1).eval()
    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    bundle, _ = convert(
        model, [parse_input_spec("x:Nx1x32x32")], to=("onnx", "openvino"), out_dir=tmp / "b"
    )
    onnx_path, xml = bundle / "onnx" / "model.onnx", bundle / "openvino" / "model.xml"
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    feeds = {"x": x}
    T = args.threads

    er_ort = get_runtime("onnxruntime").load(onnx_path, options={"threads": T})
    so = ort.SessionOptions()
    so.intra_op_num_threads = T
    raw_ort = ort.InferenceSession(
        str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"]
    )
    er_ov = get_runtime("openvino").load(
        xml, options={"threads": T, "inference_precision": "f32", "performance_hint": "LATENCY"}
    )
    core = ov.Core()
    compiled = core.compile_model(
        str(xml),
        "CPU",
        {"INFERENCE_NUM_THREADS": T, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1},
    )
    req = compiled.create_infer_request()

    raw_ort_call = lambda: raw_ort.run(None, feeds)  # noqa: E731
    raw_ov_call = lambda: req.infer(feeds)  # noqa: E731
    # what benchmark_app times: infer() on input tensors filled once, no numpy conversion
    req_preset = compiled.create_infer_request()
    req_preset.set_input_tensor(ov.Tensor(x))
    preset_call = req_preset.infer
    # each method: name -> () -> (p50 ms, spread or None); the order is shuffled per round
    methods = {
        "ort_edgerep_session": lambda: edgerep_p50(er_ort.run, feeds, args.seconds),
        "ort_edgerep_harness_raw_call": lambda: edgerep_p50(
            lambda _: raw_ort_call(), None, args.seconds
        ),
        "ort_hand_loop_raw_call": lambda: hand_loop(raw_ort_call, args.seconds),
        "ort_hand_loop_edgerep_session": lambda: hand_loop(lambda: er_ort.run(feeds), args.seconds),
        "ov_edgerep_session": lambda: edgerep_p50(er_ov.run, feeds, args.seconds),
        "ov_edgerep_harness_raw_call": lambda: edgerep_p50(
            lambda _: raw_ov_call(), None, args.seconds
        ),
        "ov_hand_loop_raw_call": lambda: hand_loop(raw_ov_call, args.seconds),
        "ov_edgerep_harness_preset_infer": lambda: edgerep_p50(
            lambda _: preset_call(), None, args.seconds
        ),
        "ov_hand_loop_preset_infer": lambda: hand_loop(preset_call, args.seconds),
        "ov_benchmark_app": lambda: benchmark_app(xml, T, args.seconds),
        "harness_empty_call": lambda: edgerep_p50(lambda _: None, None, min(args.seconds, 0.5)),
    }
    results: dict[str, list[float]] = {k: [] for k in methods}
    spreads: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for name in rng.permutation(list(methods)):
            got = methods[name]()
            if isinstance(got, dict):
                results[name].append(got["p50_ms"])
                spreads.setdefault(name, []).append(got["spread"])
            else:
                results[name].append(got)
    p50 = {k: statistics.median(v) for k, v in results.items()}
    load_after = os.getloadavg()

    def rel(a: float, b: float) -> float:
        return (a - b) / b

    summary = {
        # the timing method itself: the same call under edgerep's harness and a hand loop
        "ort_harness_vs_hand_loop_same_call": rel(
            p50["ort_edgerep_harness_raw_call"], p50["ort_hand_loop_raw_call"]
        ),
        "ov_harness_vs_hand_loop_same_call": rel(
            p50["ov_edgerep_harness_raw_call"], p50["ov_hand_loop_raw_call"]
        ),
        "ov_harness_preset_infer_vs_benchmark_app": rel(
            p50["ov_edgerep_harness_preset_infer"], p50["ov_benchmark_app"]
        ),
        "ov_harness_vs_hand_loop_preset_infer": rel(
            p50["ov_edgerep_harness_preset_infer"], p50["ov_hand_loop_preset_infer"]
        ),
        # what an edgerep user measures (edgerep session) vs the raw runtime call
        "ort_edgerep_session_vs_raw_call": rel(
            p50["ort_edgerep_session"], p50["ort_hand_loop_raw_call"]
        ),
        "ov_edgerep_session_vs_raw_call": rel(
            p50["ov_edgerep_session"], p50["ov_hand_loop_raw_call"]
        ),
        "ov_edgerep_session_vs_benchmark_app": rel(
            p50["ov_edgerep_session"], p50["ov_benchmark_app"]
        ),
        "harness_overhead_fraction_of_ort_p50": p50["harness_empty_call"]
        / p50["ort_edgerep_session"],
        "harness_overhead_fraction_of_ov_p50": p50["harness_empty_call"]
        / p50["ov_edgerep_session"],
    }
    targets = {
        "harness_within_5pct": all(
            abs(summary[k]) <= 0.05
            for k in (
                "ort_harness_vs_hand_loop_same_call",
                "ov_harness_vs_hand_loop_same_call",
                "ov_harness_preset_infer_vs_benchmark_app",
                "ov_harness_vs_hand_loop_preset_infer",
            )
        ),
        "harness_overhead_below_2pct": max(
            summary["harness_overhead_fraction_of_ort_p50"],
            summary["harness_overhead_fraction_of_ov_p50"],
        )
        < 0.02,
    }
    out = {
        "schema_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "threads": T,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "model": "edgerep.zoo.demo_net (folded, random weights), x 1x1x32x32",
        },
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "p50_ms": p50,
        "p50_ms_per_round": results,
        "edgerep_p50_spread_per_round": spreads,
        "relative": summary,
        "targets_met": targets,
        "environment": environment_fingerprint(threads=T),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = path.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp_out, path)
    print(json.dumps({"p50_ms": p50, "relative": summary, "targets_met": targets,
                      "loadavg": [load_before, load_after]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
