"""What the Android runners print and write, in the real tools' formats, for the fakes.

onnxruntime_perf_test (onnxruntime/test/perftest/performance_runner.cc, 1.2x):
``PerformanceRunner::Run`` prints "Session creation time cost: S s", "First inference
time cost: N ms", "Total inference time cost: S s", "Total inference requests: N", ...,
"Peak working set size: N bytes"; ``PerformanceResult::DumpToFile`` *appends* to the
result file (the positional argument after the model) one line per timed call,
``model_name,seconds,peak_workingset_size,average_CPU_usage,index``, and with ``-s`` a
blank line and "P50 Latency: S s"-style statistics to the file and stdout.

executor_runner (examples/portable/executor_runner/executor_runner.cpp): one log line
"Model executed successfully N time(s) in T ms." (the total of N calls); built with the
event tracer it defines ``--etdump_path`` and writes there an ETDump (size-prefixed
flatbuffer, devtools/etdump/etdump_schema_flatcc.fbs) with one ``Execute`` run-data block
per call holding a ``Method::execute`` profile event, next to the operator and delegate
events (as ExecuTorch 1.5's ETDumpGen wrote for a Linear run through the pybindings with
``enable_etdump=True``: blocks "Default" (Method::init, Program::load_method), then per
call "Execute" (a delegate event, DELEGATE_CALL, Method::execute)). Without the tracer
gflags refuses the flag: "ERROR: unknown command line flag 'etdump_path'".
"""

from __future__ import annotations

import functools
import struct


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


def et_call_ns(run: int, iterations: int) -> list[int]:
    """Ticks (ns) of each call of the `run`-th executor_runner run: ~2.5 ms + 0.1 ms/run."""
    return [
        int((2.5 + 0.1 * run) * 1e6 * (1 + 0.04 * ((i * 3) % 5 - 2))) for i in range(iterations)
    ]


def et_run(run: int, iterations: int, *, tracer: bool = True, etdump_flag: bool = False) -> str:
    """executor_runner's output; a build without the tracer refuses ``--etdump_path``."""
    if etdump_flag and not tracer:
        return "ERROR: unknown command line flag 'etdump_path'\n"
    total = sum(et_call_ns(run, iterations)) / 1e6 * 1.002  # around execute(), a bit more
    return (
        "I 00:00:00.001 executorch:executor_runner.cpp:168] Model file m.pte is loaded.\n"
        f"I 00:00:00.050 executorch:executor_runner.cpp:261] Model executed successfully "
        f"{iterations} time(s) in {total:.6f} ms.\n"
        + (
            "I 00:00:00.051 executorch:executor_runner.cpp:290] ETDump written to file.\n"
            if etdump_flag
            else ""
        )
    )


@functools.lru_cache(maxsize=16)
def et_etdump(run: int, iterations: int) -> bytes:
    """The ETDump of that run, built with ExecuTorch's own schema and serializer and
    size-prefixed as ETDumpGen writes it (needs executorch installed)."""
    from executorch.devtools.etdump.schema_flatcc import (
        ETDumpFlatCC,
        Event,
        ProfileEvent,
        RunData,
    )
    from executorch.devtools.etdump.serialize import serialize_to_etdump_flatcc

    def event(name: str, start: int, end: int, chain: int = 0) -> Event:
        profile = ProfileEvent(
            name=name,
            chain_index=chain,
            instruction_id=0,
            delegate_debug_id_int=-1,
            delegate_debug_id_str="",
            delegate_debug_metadata=b"",
            start_time=start,
            end_time=end,
        )
        return Event(profile_event=profile, allocation_event=None, debug_event=None)

    blocks = [
        RunData(
            name="Default",
            bundled_input_index=-1,
            allocators=[],
            events=[
                event("Method::init", 0, 300_000, -1),
                event("Program::load_method", 0, 310_000, -1),
            ],
        )
    ]
    t = 1_000_000
    for ns in et_call_ns(run, iterations):
        blocks.append(
            RunData(
                name="Execute",
                bundled_input_index=-1,
                allocators=[],
                events=[
                    event("DELEGATE_CALL", t + 100, t + ns - 100),
                    event("Method::execute", t, t + ns, -1),
                ],
            )
        )
        t += ns + 5_000
    flat = serialize_to_etdump_flatcc(ETDumpFlatCC(version=0, run_data=blocks))
    return struct.pack("<I", len(flat)) + flat
