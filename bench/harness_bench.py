"""Harness honesty: edgerep's latency p50 vs a hand-written loop and OpenVINO's benchmark_app.

Run from the repository root (about 9 minutes on 2 cores at load 5, 5 rounds)::

    .venv/bin/python bench/harness_bench.py [--threads 1] [--seconds 1] [--rounds 5]

It folds and exports `edgerep.zoo.demo_net` (random weights, input 1x1x32x32) to
ONNX and OpenVINO IR, then, with the same thread settings everywhere:

- **overhead of the edgerep session** (target < 2% of the demo net's p50): the
  edgerep ``Session.run`` vs the minimal raw call doing the same work, alternated
  call by call in one loop (so drift hits both alike; separate loops recorded too). onnxruntime: ``InferenceSession.run(None, feeds)``. OpenVINO
  (f32, 1 stream, sync): the fastest raw Python that takes a new numpy input and
  returns numpy outputs (copy into the request's input tensor, ``infer()``, copy the
  output); the one-liner ``InferRequest.infer(feeds)`` is recorded too (it is about
  twice as slow here: its data dispatcher and ``OVDict``);
- **the timing method** (target within 5%): the same raw call under edgerep's
  ``benchmark_latency`` and under a hand loop; the harness's own cost per sample
  (p50 of timing an empty call);
- **benchmark_app** (target within 5%): benchmark_app's median is OpenVINO's own
  ``InferRequest.latency``, timed in C++ around the inference: it leaves out the
  Python binding (~2-3 us a call) that any Python wall-clock timer includes, and
  with ``-shape`` it compiles a *static* model (a dynamic batch costs ~6 us a call
  on this net). Compared like with like: edgerep's runtime timer (``runtime`` stats,
  `SessionBase.runtime_ms`) on a static session (``shape`` option) vs ``-shape``,
  and on the dynamic IR vs ``-data_shape``; the wall-clock gaps are recorded too;
- **throughput** under concurrency: `measure_throughput` on onnxruntime (one
  session shared by N threads) and OpenVINO (N infer requests on N streams, N x
  threads) vs benchmark_app ``-api async -nstreams N -nireq N`` (AsyncInferQueue).

The latency methods are interleaved in ``--rounds`` rounds (order shuffled per
round); each one's p50 is its least-disturbed round (min over rounds: other
processes only add time, and hit whole rounds), the median over rounds is recorded
too. The machine's load average before and after is
recorded: other engineers share the 2 cores.
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
from _args import positive_float, positive_int

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


def paired_loop(fa, fb, seconds: float, min_iters: int = 400) -> tuple[float, float]:
    """Medians (ms) of `fa` and `fb` timed alternately in one loop: drift hits both alike."""
    for _ in range(20):
        fa()
        fb()
    a, b = [], []
    end = time.perf_counter() + seconds
    while len(a) < min_iters or time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        fa()
        t1 = time.perf_counter_ns()
        fb()
        t2 = time.perf_counter_ns()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return statistics.median(a) / 1e6, statistics.median(b) / 1e6


def edgerep_p50(run, feeds, seconds: float, runtime_timer=None) -> dict:
    from edgerep.bench import LatencyConfig, benchmark_latency

    cfg = LatencyConfig(warmup_iters=20, warmup_seconds=0.0, min_iters=200, min_seconds=seconds / 3)
    r = benchmark_latency(run, feeds, config=cfg, runtime_timer=runtime_timer)
    return {
        "p50_ms": r.stats.p50_ms,
        "spread": r.p50_spread,
        "ci": list(r.p50_ci_ms),
        "runtime_p50_ms": None if r.runtime is None else r.runtime.p50_ms,
    }


def benchmark_app(xml: Path, threads: int, seconds: float, *, static: bool) -> float:
    """benchmark_app's median latency (ms), sync API, one stream and request."""
    shape = ["-shape", "x[1,1,32,32]"] if static else ["-data_shape", "x[1,1,32,32]"]
    out = _benchmark_app(xml, ["-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
                               "-nireq", "1", "-api", "sync", *shape], seconds)  # fmt: skip
    m = re.search(r"Latency:\s*\n.*?Median:\s*([\d.]+)\s*(ms|us)", out, re.S)
    if not m:
        raise RuntimeError(f"cannot find the median in benchmark_app's output:\n{out[-2000:]}")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "us" else value


def benchmark_app_throughput(xml: Path, threads: int, n: int, seconds: float) -> float:
    """benchmark_app's throughput (FPS), async API, n streams and n requests, static shape."""
    out = _benchmark_app(xml, ["-hint", "none", "-nstreams", str(n), "-nthreads", str(threads * n),
                               "-nireq", str(n), "-api", "async", "-shape", "x[1,1,32,32]"],
                         seconds)  # fmt: skip
    m = re.search(r"Throughput:\s*([\d.]+)\s*FPS", out)
    if not m:
        raise RuntimeError(f"cannot find the throughput in benchmark_app's output:\n{out[-2000:]}")
    return float(m.group(1))


def _benchmark_app(xml: Path, args: list[str], seconds: float) -> str:
    exe = Path(sys.executable).parent / "benchmark_app"
    cmd = [str(exe), "-m", str(xml), "-d", "CPU", "-infer_precision", "f32",
           "-t", str(max(1, round(seconds))), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument(
        "--seconds", type=positive_float, default=1.0, help="timed seconds per method and round"
    )
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--concurrency", default="1,2", help="throughput at these concurrencies")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "harness_bench.json"))
    args = p.parse_args()

    import onnxruntime as ort
    import openvino as ov
    import torch

    from edgerep.bench import measure_throughput
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
    ov_opts = {"threads": T, "inference_precision": "f32", "num_streams": 1}
    er_ov = get_runtime("openvino").load(xml, options=ov_opts)
    er_ov_static = get_runtime("openvino").load(
        xml, options={**ov_opts, "shape": {"x": [1, 1, 32, 32]}}
    )
    core = ov.Core()
    ov_cfg = {"INFERENCE_NUM_THREADS": T, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    compiled = core.compile_model(str(xml), "CPU", ov_cfg)
    static_model = core.read_model(str(xml))
    static_model.reshape({"x": [1, 1, 32, 32]})
    compiled_static = core.compile_model(static_model, "CPU", ov_cfg)

    def raw_ov_call(comp):
        """The fastest raw Python doing what Session.run does: numpy in, numpy out."""
        req = comp.create_infer_request()
        req.set_input_tensor(ov.Tensor(x))  # the request's own tensor, refilled per call
        buf = req.get_input_tensor(0).data

        def call():
            np.copyto(buf, x)
            req.infer()
            return req.get_output_tensor(0).data.copy()

        return call

    naive_req = compiled.create_infer_request()
    naive_ov_call = lambda: naive_req.infer(feeds)  # noqa: E731
    raw_ort_call = lambda: raw_ort.run(None, feeds)  # noqa: E731
    raw_ov_dyn, raw_ov_static = raw_ov_call(compiled), raw_ov_call(compiled_static)
    # what benchmark_app times: infer() on input tensors filled once
    req_preset = compiled_static.create_infer_request()
    req_preset.set_input_tensor(ov.Tensor(x))
    preset_call = req_preset.infer
    runtime_p50 = lambda s: edgerep_p50(s.run, feeds, args.seconds, s.runtime_ms)  # noqa: E731
    methods = {
        "ort_edgerep_session": lambda: edgerep_p50(er_ort.run, feeds, args.seconds),
        "ort_hand_loop_edgerep_session": lambda: hand_loop(lambda: er_ort.run(feeds), args.seconds),
        "ort_hand_loop_raw_call": lambda: hand_loop(raw_ort_call, args.seconds),
        "ort_edgerep_harness_raw_call": lambda: edgerep_p50(
            lambda _: raw_ort_call(), None, args.seconds
        ),
        "ov_edgerep_session": lambda: runtime_p50(er_ov),
        "ov_hand_loop_edgerep_session": lambda: hand_loop(lambda: er_ov.run(feeds), args.seconds),
        "ov_hand_loop_raw_call": lambda: hand_loop(raw_ov_dyn, args.seconds),
        "ov_hand_loop_naive_infer_feeds": lambda: hand_loop(naive_ov_call, args.seconds),
        "ov_edgerep_harness_raw_call": lambda: edgerep_p50(
            lambda _: raw_ov_dyn(), None, args.seconds
        ),
        "ov_static_edgerep_session": lambda: runtime_p50(er_ov_static),
        "ov_static_hand_loop_edgerep_session": lambda: hand_loop(
            lambda: er_ov_static.run(feeds), args.seconds
        ),
        "ov_static_hand_loop_raw_call": lambda: hand_loop(raw_ov_static, args.seconds),
        "ov_static_edgerep_harness_preset_infer": lambda: edgerep_p50(
            lambda _: preset_call(), None, args.seconds
        ),
        "ov_static_hand_loop_preset_infer": lambda: hand_loop(preset_call, args.seconds),
        "ov_benchmark_app_dynamic": lambda: benchmark_app(xml, T, args.seconds, static=False),
        "ov_benchmark_app_static": lambda: benchmark_app(xml, T, args.seconds, static=True),
        "harness_empty_call": lambda: edgerep_p50(lambda _: None, None, min(args.seconds, 0.5)),
        # session overhead: edgerep Session.run and the raw call alternated in one loop
        "ort_paired": lambda: paired_loop(lambda: er_ort.run(feeds), raw_ort_call, args.seconds),
        "ov_paired": lambda: paired_loop(lambda: er_ov.run(feeds), raw_ov_dyn, args.seconds),
        "ov_static_paired": lambda: paired_loop(
            lambda: er_ov_static.run(feeds), raw_ov_static, args.seconds
        ),
    }
    results: dict[str, list[float]] = {k: [] for k in methods}
    runtime_timer: dict[str, list[float]] = {}
    spreads: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    paired: dict[str, list[list[float]]] = {}
    for _ in range(args.rounds):
        for name in rng.permutation(list(methods)):
            got = methods[name]()
            if isinstance(got, tuple):
                paired.setdefault(name, []).append(list(got))
                results.pop(name, None)
            elif isinstance(got, dict):
                results[name].append(got["p50_ms"])
                spreads.setdefault(name, []).append(got["spread"])
                if got.get("runtime_p50_ms") is not None:
                    runtime_timer.setdefault(name, []).append(got["runtime_p50_ms"])
            else:
                results[name].append(got)
    # other processes only ever add time, and they hit whole rounds (+25-75% seen at
    # load 6): compare the least-disturbed round of each method (min over rounds);
    # the median over rounds is recorded as well
    p50 = {k: min(v) for k, v in results.items()}
    p50_median = {k: statistics.median(v) for k, v in results.items()}
    rt50 = {k: min(v) for k, v in runtime_timer.items()}
    # per round (edgerep - raw) / raw, then the median over rounds
    overhead = {k: statistics.median((e - r) / r for e, r in v) for k, v in paired.items()}

    throughput: dict[str, dict] = {}
    for n in [int(v) for v in args.concurrency.split(",")]:
        streamed = get_runtime("openvino").load(
            xml,
            options={**ov_opts, "num_streams": n, "threads": T * n,
                     "shape": {"x": [1, 1, 32, 32]}},
        )  # fmt: skip
        rows = {
            "ort_shared_session": measure_throughput(
                er_ort.run,
                feeds,
                concurrency=n,
                seconds=max(args.seconds, 1.0),
                setup=f"one session shared by {n} threads",
            ),
            "ov_static_streams": measure_throughput(
                streamed.concurrent_runs(n),
                feeds,
                concurrency=n,
                seconds=max(args.seconds, 1.0),
                setup=f"{n} infer requests on {streamed.describe()['num_streams']} streams",
            ),
        }
        throughput[str(n)] = {k: v.to_dict() for k, v in rows.items()}
        throughput[str(n)]["ov_benchmark_app_async_fps"] = benchmark_app_throughput(
            xml, T, n, max(args.seconds, 1.0)
        )
        streamed.close()
    load_after = os.getloadavg()

    def rel(a: float, b: float) -> float:
        return (a - b) / b

    summary = {
        # 1. what the edgerep session adds to the raw runtime call: alternated in one
        # loop (paired), and as separate hand loops (drift between them shows here)
        "ort_session_overhead": overhead["ort_paired"],
        "ov_session_overhead": overhead["ov_paired"],
        "ov_static_session_overhead": overhead["ov_static_paired"],
        "ort_session_overhead_separate_loops": rel(
            p50["ort_hand_loop_edgerep_session"], p50["ort_hand_loop_raw_call"]
        ),
        "ov_session_overhead_separate_loops": rel(
            p50["ov_hand_loop_edgerep_session"], p50["ov_hand_loop_raw_call"]
        ),
        "ov_static_session_overhead_separate_loops": rel(
            p50["ov_static_hand_loop_edgerep_session"], p50["ov_static_hand_loop_raw_call"]
        ),
        "ov_session_vs_naive_infer_feeds": rel(
            p50["ov_hand_loop_edgerep_session"], p50["ov_hand_loop_naive_infer_feeds"]
        ),
        # 2. the timing method: the same call under edgerep's harness and a hand loop
        "ort_harness_vs_hand_loop_same_call": rel(
            p50["ort_edgerep_harness_raw_call"], p50["ort_hand_loop_raw_call"]
        ),
        "ov_harness_vs_hand_loop_same_call": rel(
            p50["ov_edgerep_harness_raw_call"], p50["ov_hand_loop_raw_call"]
        ),
        "ov_static_harness_vs_hand_loop_preset_infer": rel(
            p50["ov_static_edgerep_harness_preset_infer"], p50["ov_static_hand_loop_preset_infer"]
        ),
        "ort_edgerep_session_harness_vs_hand_loop": rel(
            p50["ort_edgerep_session"], p50["ort_hand_loop_edgerep_session"]
        ),
        "harness_empty_call_fraction_of_ort_p50": p50["harness_empty_call"]
        / p50["ort_edgerep_session"],
        # 3. benchmark_app: like with like (its median is OpenVINO's C++-side timer)
        "ov_static_runtime_timer_vs_benchmark_app_static": rel(
            rt50["ov_static_edgerep_session"], p50["ov_benchmark_app_static"]
        ),
        "ov_dynamic_runtime_timer_vs_benchmark_app_dynamic": rel(
            rt50["ov_edgerep_session"], p50["ov_benchmark_app_dynamic"]
        ),
        # ... and the wall-clock gaps (the Python binding; dynamic vs static shapes)
        "ov_static_session_wall_vs_benchmark_app_static": rel(
            p50["ov_static_edgerep_session"], p50["ov_benchmark_app_static"]
        ),
        "ov_static_preset_infer_wall_vs_benchmark_app_static": rel(
            p50["ov_static_edgerep_harness_preset_infer"], p50["ov_benchmark_app_static"]
        ),
        "ov_dynamic_session_wall_vs_benchmark_app_dynamic": rel(
            p50["ov_edgerep_session"], p50["ov_benchmark_app_dynamic"]
        ),
        "ov_dynamic_vs_static_shape_wall": rel(
            p50["ov_edgerep_session"], p50["ov_static_edgerep_session"]
        ),
    }
    for n, row in throughput.items():
        summary[f"ov_streams_vs_benchmark_app_async_throughput_c{n}"] = rel(
            row["ov_static_streams"]["inferences_per_s"], row["ov_benchmark_app_async_fps"]
        )
    targets = {
        "session_overhead_below_2pct": max(
            summary["ort_session_overhead"],
            summary["ov_session_overhead"],
            summary["ov_static_session_overhead"],
        )
        < 0.02,
        "harness_within_5pct_of_hand_loop": all(
            abs(summary[k]) <= 0.05
            for k in (
                "ort_harness_vs_hand_loop_same_call",
                "ov_harness_vs_hand_loop_same_call",
                "ov_static_harness_vs_hand_loop_preset_infer",
                "ort_edgerep_session_harness_vs_hand_loop",
            )
        ),
        "runtime_timer_within_5pct_of_benchmark_app": all(
            abs(summary[k]) <= 0.05
            for k in (
                "ov_static_runtime_timer_vs_benchmark_app_static",
                "ov_dynamic_runtime_timer_vs_benchmark_app_dynamic",
            )
        ),
        "wall_clock_within_5pct_of_benchmark_app": abs(
            summary["ov_static_session_wall_vs_benchmark_app_static"]
        )
        <= 0.05,
    }
    out = {
        "schema_version": 2,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "settings": {
            "threads": T,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "model": "edgerep.zoo.demo_net (folded, random weights), x 1x1x32x32",
            "openvino": "f32 precision hint, 1 stream, sync API, one reused infer request",
        },
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "p50_ms": p50,
        "p50_ms_median_over_rounds": p50_median,
        "runtime_timer_p50_ms": rt50,
        "p50_ms_per_round": results,
        "paired_p50_ms_per_round_edgerep_raw": paired,
        "edgerep_p50_spread_per_round": spreads,
        "throughput": throughput,
        "relative": summary,
        "targets_met": targets,
        "environment": environment_fingerprint(threads=T),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = path.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp_out, path)
    brief = {n: {k: (v["inferences_per_s"] if isinstance(v, dict) else v) for k, v in r.items()}
             for n, r in throughput.items()}  # fmt: skip
    print(json.dumps({"p50_ms": p50, "runtime_timer_p50_ms": rt50, "relative": summary,
                      "throughput_per_s": brief, "targets_met": targets,
                      "loadavg": [load_before, load_after]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
