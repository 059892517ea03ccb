"""What the Android runners print and write, in the real tools' formats, for the fakes.

onnxruntime_perf_test (onnxruntime/test/perftest/performance_runner.cc, 1.2x):
``PerformanceRunner::Run`` prints "Session creation time cost: S s", "First inference
time cost: N ms", "Total inference time cost: S s", "Total inference requests: N", ...,
"Peak working set size: N bytes"; ``PerformanceResult::DumpToFile`` *appends* to the
result file (the positional argument after the model) one line per timed call,
``model_name,seconds,peak_workingset_size,average_CPU_usage,index``, and with ``-s`` a
blank line and "P50 Latency: S s"-style statistics to the file and stdout.

executor_runner (examples/portable/executor_runner/executor_runner.cpp): one log line
"Model executed successfully N time(s) in T ms." (the total of N calls).
"""

from __future__ import annotations


def ort_times(run: int, iterations: int) -> list[float]:
    """Seconds per call of the `run`-th run: a median growing with `run`, spread within."""
    return [(1.0 + 0.1 * run) * 1e-3 * (1 + 0.05 * ((i * 7) % 5)) for i in range(iterations)]


def ort_run(run: int, iterations: int, *, statistics: bool) -> tuple[str, str]:
    """(stdout, text appended to the result file) of one onnxruntime_perf_test run."""
    times = ort_times(run, iterations)
    lines = [f"model,{t},31000000,97,{i}" for i, t in enumerate(times)]
    s = sorted(times)
    stats = [
        f"{name} Latency: {s[int(len(s) * q)] if q < 1 else s[-1]} s"
        for name, q in (("Min", 0.0), ("Max", 1.0), ("P50", 0.5), ("P90", 0.9), ("P99", 0.99))
    ]
    out = (
        "Session creation time cost: 0.02 s\n"
        "First inference time cost: 3 ms\n"
        f"Total inference time cost: {sum(times)} s\n"
        f"Total inference requests: {len(times)}\n"
        f"Average inference time cost: {sum(times) / len(times) * 1e3} ms\n"
        f"Total inference run time: {sum(times) * 1.01} s\n"
        f"Number of inferences per second: {len(times) / sum(times)} \n"
        "Avg CPU usage: 97 %\n"
        "Peak working set size: 31000000 bytes\n"
    )
    written = "\n".join(lines) + "\n"
    if statistics:
        out += "\n".join(stats) + "\n"
        written += "\n" + "\n".join(stats) + "\n"
    return out, written


def et_run(run: int, iterations: int) -> str:
    """executor_runner's output for `iterations` calls of 2.5 ms (+0.1 ms per run)."""
    total = (2.5 + 0.1 * run) * iterations
    return (
        "I 00:00:00.001 executorch:executor_runner.cpp:168] Model file m.pte is loaded.\n"
        f"I 00:00:00.050 executorch:executor_runner.cpp:261] Model executed successfully "
        f"{iterations} time(s) in {total:.6f} ms.\n"
    )
