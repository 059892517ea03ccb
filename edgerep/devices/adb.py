"""Android devices over adb: discovery, and a benchmark run by a native runner binary.

Two ways to reach the devices, one set of operations (list, shell, push; in
`edgerep.devices._adb_host`):

- the **adb server** through `adbutils` (the ``android`` extra), when it is installed
  and a server answers at ``$ANDROID_ADB_SERVER_HOST:$ANDROID_ADB_SERVER_PORT``
  (default 127.0.0.1:5037, where ``adb start-server`` or Android Studio runs it);
  edgerep never starts a server itself this way;
- else adb's documented **command line** (``adb devices -l``, ``adb -s SERIAL
  shell|push``), the executable being ``$EDGEREP_ADB`` or ``adb`` on PATH (it starts
  the server as adb does). Setting ``$EDGEREP_ADB`` always chooses this way.

A benchmark pushes the artifact and a runner into ``/data/local/tmp/edgerep-ID``,
records thermal status, battery temperature and CPU frequencies, runs the runner
``repeats`` times (optionally pinned with ``taskset`` to the big cores), reads
them again, waits `cooldown_s` between runs and removes the directory. Runners,
one per artifact format (registry `RUNNERS`):

- ``onnx``: onnxruntime's ``onnxruntime_perf_test`` (``-I -m times -r N [-x T] -s MODEL
  RESULT_FILE``). Given a result file it writes one line per timed call,
  ``model_name,seconds,peak_working_set,cpu_usage,index`` (``PerformanceResult::DumpToFile``
  in onnxruntime/test/perftest/performance_runner.cc; the README's usage
  ``onnxruntime_perf_test [options...] model_path result_file``); edgerep removes the
  file before each run (the tool appends), pulls it back and feeds the
  per-call times to `edgerep.bench.latency.summarize_runs`, the statistics of local rows
  (pooled p50..p99, bootstrap interval of p50, run-to-run spread and flag);
- ``executorch``: ExecuTorch's ``executor_runner`` (``--model_path --num_executions N
  --etdump_path FILE``) prints only the total time of its N calls
  (examples/portable/executor_runner/executor_runner.cpp); per-call times are in the
  ETDump it writes when built with the event tracer (``EXECUTORCH_ENABLE_EVENT_TRACER``,
  which defines ``--etdump_path``): one ``Execute`` block per call holding a
  ``Method::execute`` profile event (ticks; nanoseconds on the POSIX platform layer,
  checked against the printed total). edgerep pulls the file back and reads it with
  ExecuTorch's own deserializer (``executorch.devtools.etdump.serialize``), so those rows
  get the same statistics. The event tracer also records every operator call, a small
  cost inside each timed call. A runner built without it refuses the flag: edgerep
  runs it again without, and the row says ``mean_only`` with the reason (a mean per call
  from the total, no percentiles, no interval; its ``p50_ms`` field holds the median of
  the runs' means, shown as a mean). The Android benchmark app's
  ``benchmark_results.json`` holds only average and trimmed-mean latencies, so it is no
  better source.

The binary comes from ``--runner PATH``, else the device's ``runner_dir``
(devices.toml; ``DIR/BINARY`` or ``DIR/ABI/BINARY``), else the runner cache
``$XDG_CACHE_HOME/edgerep/runners/ABI/BINARY`` (``~/.cache/...``), for each ABI the
device lists (``ro.product.cpu.abilist``, e.g. ``arm64-v8a``). ``pin = "big"`` pins
every run to the cores whose maximum frequency is above the slowest cluster's
(``cpuinfo_max_freq``; all cores when they are all equal), or ``pin`` is a taskset
hex mask.

What an adb device cannot do is said, not dropped: ``--runtime`` selects runners
by the runtime they stand for (a runtime with no runner is an error entry), and
accuracy (``--data``), throughput (``--concurrency``) and OpenVINO's
``--precision`` hint are "not measured" entries of the report; warm-up calls and
``min_seconds``, which a runner cannot take, are listed in each row's
``session.not_applied``.
"""

from __future__ import annotations

import datetime
import os
import re
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerep.devices._adb_host import (
    AdbError,
    _adb,
    _pull_bytes,
    adb_executable,
    adb_server,
    adb_server_address,
    adb_unavailable_reason,
    forget_adb_server,
)
from edgerep.devices._base import BenchRequest, Device
from edgerep.errors import ConfigError, EdgerepError, UnsupportedError

__all__ = [
    "RUNNERS",
    "AdbError",
    "AdbTransport",
    "Runner",
    "adb_executable",
    "adb_server",
    "adb_server_address",
    "adb_unavailable_reason",
    "big_core_mask",
    "forget_adb_server",
    "parse_devices",
    "parse_getprop",
    "parse_thermal",
    "runner_cache_dir",
]

REMOTE_ROOT = "/data/local/tmp"


def parse_devices(text: str) -> list[dict[str, str]]:
    """``adb devices -l`` → ``[{"serial", "state", "model", ...}]`` (header and blanks skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        entry = {"serial": parts[0], "state": parts[1] if len(parts) > 1 else "unknown"}
        for item in parts[2:]:
            key, sep, value = item.partition(":")
            if sep:
                entry[key] = value
        out.append(entry)
    return out


_PROP = re.compile(r"^\[(?P<key>[^\]]+)\]:\s*\[(?P<value>.*)\]$")


def parse_getprop(text: str) -> dict[str, str]:
    """``adb shell getprop`` lines ``[key]: [value]`` → dict (other lines ignored)."""
    out = {}
    for line in text.splitlines():
        m = _PROP.match(line.strip())
        if m:
            out[m["key"]] = m["value"]
    return out


def parse_thermal(thermal: str, battery: str, freqs: str) -> dict[str, Any]:
    """Thermal status (``dumpsys thermalservice``: 0 none .. 6 shutdown), battery
    temperature in °C (``dumpsys battery``, tenths) and CPU frequencies in kHz."""
    status = re.search(r"Thermal Status:\s*(\d+)", thermal)
    temp = re.search(r"^\s*temperature:\s*(-?\d+)", battery, re.MULTILINE)
    return {
        "thermal_status": int(status[1]) if status else None,
        "battery_temp_c": int(temp[1]) / 10 if temp else None,
        "cpu_freq_khz": [int(v) for v in freqs.split() if v.isdigit()],
    }


def _describe(props: Mapping[str, str]) -> dict[str, Any]:
    return {
        "model": props.get("ro.product.model"),
        "manufacturer": props.get("ro.product.manufacturer"),
        "soc": props.get("ro.soc.model")
        or props.get("ro.board.platform")
        or props.get("ro.hardware"),
        "soc_manufacturer": props.get("ro.soc.manufacturer"),
        "abi": props.get("ro.product.cpu.abi"),
        "abilist": (props.get("ro.product.cpu.abilist") or "").split(",")
        if props.get("ro.product.cpu.abilist")
        else [],
        "android": props.get("ro.build.version.release"),
        "sdk": props.get("ro.build.version.sdk"),
        "fingerprint": props.get("ro.build.fingerprint"),
    }


def _thermal(serial: str, timeout_s: float) -> dict[str, Any]:
    def shell(cmd: str) -> str:
        try:
            return _adb(["shell", cmd], serial=serial, timeout_s=timeout_s)
        except AdbError:
            return ""

    return parse_thermal(
        shell("dumpsys thermalservice"),
        shell("dumpsys battery"),
        shell("cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq"),
    )


def runner_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgerep/runners`` (default ``~/.cache/edgerep/runners``); runners
    go in ``ABI/BINARY`` under it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgerep" / "runners"


def big_core_mask(max_freqs: str) -> tuple[str, list[int]]:
    """The taskset mask of the big cores from ``PATH FREQ`` lines of
    ``cpuN/cpufreq/cpuinfo_max_freq``: the cores faster than the slowest cluster (every
    core when all are equal, e.g. an emulator).

    Raises:
        AdbError: no frequency could be read.
    """
    freqs: dict[int, int] = {}
    for line in max_freqs.splitlines():
        m = re.search(r"/cpu(\d+)/cpufreq/cpuinfo_max_freq\s+(\d+)\s*$", line)
        if m:
            freqs[int(m[1])] = int(m[2])
    if not freqs:
        raise AdbError(
            "pin = 'big': the device shows no cpufreq/cpuinfo_max_freq; give a taskset hex "
            "mask instead"
        )
    slowest = min(freqs.values())
    big = sorted(c for c, f in freqs.items() if f > slowest) or sorted(freqs)
    return format(sum(1 << c for c in big), "x"), big


def describe_device(serial: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Model, SoC, ABI, Android version and thermal state of `serial`.

    Raises:
        AdbError: the device does not answer.
    """
    props = parse_getprop(_adb(["shell", "getprop"], serial=serial, timeout_s=timeout_s))
    return {"kind": "android", "serial": serial, **_describe(props), **_thermal(serial, timeout_s)}


# --- runners ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """A native benchmark binary for one artifact format.

    Attributes:
        binary: the file name looked up in the runner directory.
        command: ``(remote_binary, remote_model, iterations, threads, result_file) ->
            argv``; `result_file` is a device path for the runner's per-call times, or
            None to run it without one.
        parse: ``(stdout, result_file_bytes or None) -> {"samples_ms": [...]} |
            {"mean_ms", "n", "mean_only"}`` for one run (plus runner extras such as the
            peak working set).
        runtime: the edgerep runtime it stands for (what ``--runtime`` selects).
        result_file: whether the runner writes `result_file` (removed before, pulled
            after each run).
        refuses_result_file: a line of its output meaning this build does not take the
            result-file option: the run is made again without it.
    """

    binary: str
    command: Callable[[str, str, int, int | None, str | None], list[str]]
    parse: Callable[[str, bytes | None], dict[str, Any]]
    runtime: str
    result_file: bool = False
    refuses_result_file: str | None = None


def _ort_command(
    binary: str, model: str, iterations: int, threads: int | None, result_file: str | None
) -> list[str]:
    return [
        binary,
        "-I",
        "-m",
        "times",
        "-r",
        str(iterations),
        *(["-x", str(threads)] if threads else []),
        "-s",
        model,
        *([result_file] if result_file else []),
    ]


def _ort_parse(text: str, result: bytes | None) -> dict[str, Any]:
    """Per-call seconds from the result file's ``name,seconds,peak_ws,cpu,index`` lines
    (the statistics block after them, written with ``-s``, is skipped); stdout gives the
    request count (checked) and the peak working set."""

    def value(name: str) -> float | None:
        m = re.search(rf"^{name}:\s*([0-9.eE+-]+)", text, re.MULTILINE)
        return float(m[1]) if m else None

    samples_ms = []
    for line in (result or b"").decode("utf-8", "replace").splitlines():
        parts = line.strip().rsplit(",", 4)
        if len(parts) == 5 and parts[4].isdigit():
            try:
                samples_ms.append(float(parts[1]) * 1e3)
            except ValueError:
                continue
    if not samples_ms:
        raise AdbError(
            "onnxruntime_perf_test wrote no per-call times to its result file; it printed: "
            f"{text.strip()[-300:]}"
        )
    requests = value("Total inference requests") or value("Total iterations")
    if requests is not None and int(requests) != len(samples_ms):
        raise AdbError(
            f"onnxruntime_perf_test reported {int(requests)} requests but its result file "
            f"holds {len(samples_ms)} times"
        )
    if min(samples_ms) < 0:
        raise AdbError("onnxruntime_perf_test's result file holds a negative time")
    load_s, first_ms = value("Session creation time cost"), value("First inference time cost")
    return {
        "samples_ms": samples_ms,
        "peak_working_set_bytes": value("Peak working set size"),
        "load_ms": None if load_s is None else load_s * 1e3,
        "first_ms": first_ms,
    }


def _et_command(
    binary: str, model: str, iterations: int, threads: int | None, result_file: str | None
) -> list[str]:
    # with the tracer, one call more: the first (no warm-up in executor_runner) is kept
    # apart as first_ms by `_et_parse`, so `iterations` timed calls remain
    return [
        binary,
        f"--model_path={model}",
        f"--num_executions={iterations + 1 if result_file else iterations}",
        *([f"--cpu_threads={threads}"] if threads else []),
        *([f"--etdump_path={result_file}"] if result_file else []),
    ]


ET_MEAN_ONLY = (
    "this executor_runner was built without the event tracer (it refuses --etdump_path) "
    "and prints only the total time of its --num_executions calls: each run gives a mean "
    "per call, so no percentiles and no interval (build it with "
    "-DEXECUTORCH_ENABLE_EVENT_TRACER=ON for per-call times)"
)
ET_NO_READER = (
    "the runner wrote an ETDump but reading it needs ExecuTorch on this machine "
    "(pip install 'edgerep[executorch]'): each run gives a mean per call from the printed "
    "total, so no percentiles and no interval"
)


def _etdump_call_ms(data: bytes) -> list[float] | None:
    """The duration of each ``Method::execute`` event of an ETDump, in ms (ticks taken as
    nanoseconds); None when ExecuTorch's deserializer is not installed.

    Raises:
        AdbError: the bytes are not an ETDump.
    """
    try:
        from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc
    except ImportError:
        return None
    try:
        dump = deserialize_from_etdump_flatcc(data)  # size-prefixed, as ETDumpGen writes
    except Exception as e:  # flatc's failure on foreign bytes: a CalledProcessError
        raise AdbError(f"the runner's ETDump ({len(data)} bytes) cannot be read: {e}") from e
    return [
        (e.profile_event.end_time - e.profile_event.start_time) / 1e6
        for block in dump.run_data
        if block.name == "Execute"
        for e in block.events or []
        if e.profile_event is not None and e.profile_event.name == "Method::execute"
    ]


def _et_parse(text: str, result: bytes | None) -> dict[str, Any]:
    m = re.search(r"executed successfully\s+(\d+)\s+time\(s\)\s+in\s+([0-9.]+)\s*ms", text)
    if not m:
        raise AdbError(f"executor_runner printed no timing line: {text.strip()[-300:]}")
    n, total = int(m[1]), float(m[2])
    calls = None if result is None else _etdump_call_ms(result)
    if calls is None:
        why = ET_MEAN_ONLY if result is None else ET_NO_READER
        return {"mean_ms": total / max(n, 1), "n": n, "mean_only": why}
    if len(calls) != n:
        raise AdbError(
            f"executor_runner ran {n} time(s) but its ETDump holds {len(calls)} "
            "Method::execute events"
        )
    if min(calls) < 0 or not 0.75 <= sum(calls) / max(total, 1e-9) <= 1.25:
        raise AdbError(
            f"the ETDump's Method::execute times (sum {sum(calls):.3f}, ticks read as ns) "
            f"disagree with the runner's total of {total:.3f} ms"
        )
    if len(calls) > 1:
        # executor_runner has no warm-up: its first call (cold caches, first allocations)
        # is kept apart as first_ms, as onnxruntime_perf_test leaves its warm-up call out
        return {"samples_ms": calls[1:], "first_ms": calls[0]}
    return {"samples_ms": calls}


#: artifact format -> its runner
RUNNERS: dict[str, Runner] = {
    "onnx": Runner(
        "onnxruntime_perf_test", _ort_command, _ort_parse, "onnxruntime", result_file=True
    ),
    "executorch": Runner(
        "executor_runner",
        _et_command,
        _et_parse,
        "executorch",
        result_file=True,
        refuses_result_file="unknown command line flag 'etdump_path'",
    ),
}


def _latency_from_runs(
    runs: Sequence[Mapping[str, Any]], config: Any
) -> tuple[dict[str, Any], list[float]]:
    """The row's latency and its pooled samples (ms).

    Per-call times go through `summarize_runs`, as local rows do. Runs that give only a
    mean per call: the median of the means stands in the ``p50_ms`` field (the report
    shows it as a mean), the spread is that of the means, and no interval is claimed.
    """
    from edgerep.bench.latency import summarize_runs

    peaks = [r["peak_working_set_bytes"] for r in runs if r.get("peak_working_set_bytes")]
    extras = {"peak_working_set_bytes": max(peaks)} if peaks else {}  # the largest run's
    if all("samples_ms" in r for r in runs):
        result = summarize_runs(
            [[v * 1e6 for v in r["samples_ms"]] for r in runs], config=config
        ).to_dict()
        for key in ("first_ms", "load_ms", "warmup_iters", "peak_rss_bytes"):
            result.pop(key, None)  # summarize_runs' placeholders; the runner's own below
        for key in ("load_ms", "first_ms"):  # what the runner printed, median over runs
            got = [float(r[key]) for r in runs if r.get(key) is not None]
            if got:
                result[key] = statistics.median(got)
        result["samples"] = "per-call times written by the runner"
        result.update(extras)
        return result, [v for r in runs for v in r["samples_ms"]]
    means = [float(r["mean_ms"]) for r in runs]
    median = statistics.median(means)
    spread = (max(means) - min(means)) / median if median > 0 else 0.0
    return {
        "stats": {
            "n": sum(int(r["n"]) for r in runs),
            "p50_ms": median,
            "p99_ms": None,
            "mean_ms": median,
        },
        "runs": [dict(r) for r in runs],
        "p50_ci_ms": [None, None],
        "p50_spread": spread,
        "unstable": spread > config.spread_threshold,
        "mean_only": runs[0].get("mean_only") or "the runner gives a mean per call",
        "samples": "one mean per run",
        "config": config.to_dict(),
        **extras,
    }, []


def _unmeasured(
    request: BenchRequest, settings: Mapping[str, Any], wanted: Sequence[str] | None
) -> list[dict[str, Any]]:
    """What the request asks that an adb device cannot measure, as report error entries
    (shown as "not measured" with the reason), instead of leaving it out silently."""
    out = []

    def note(runtime: str, text: str) -> None:
        out.append({"variant": request.variant, "runtime": runtime, "error": text})

    runners = ", ".join(f"{r.runtime} ({r.binary})" for r in RUNNERS.values())
    for name in wanted or []:
        if name not in {r.runtime for r in RUNNERS.values()}:
            note(name, f"--runtime {name} does not run on adb devices; runners exist for {runners}")
    if request.data is not None:
        note("-", "accuracy (--data): the Android runners print timings, not outputs")
    if settings.get("precision"):
        note("-", f"--precision {settings['precision']}: an OpenVINO hint; no adb runner takes it")
    if settings.get("concurrency"):
        note(
            "-",
            f"throughput at concurrency {settings['concurrency']}: the Android runners time one "
            "call at a time",
        )
    return out


def _not_applied(config: Any) -> dict[str, Any]:
    """Latency settings a runner cannot take (it times the iterations it runs itself, one
    process per run), recorded in the row rather than dropped unsaid."""
    out: dict[str, Any] = {
        k: getattr(config, k) for k in ("warmup_iters", "min_seconds") if getattr(config, k)
    }
    if out:
        out["why"] = (
            "the runner is one process per run that times its own iterations: edgerep's "
            "warm-up calls and time floor cannot be passed to it (min_iters and repeats are)"
        )
    return out


class AdbTransport:
    """adb-attached Android devices."""

    name = "adb"

    def device(self, spec: Mapping[str, Any]) -> Device:
        from edgerep.devices.config import check_cooldown, check_pin

        serial = str(spec["serial"])
        name = str(spec.get("name", f"adb:{serial}"))
        options = {
            k: spec[k]
            for k in ("runner_dir", "runner", "cooldown_s", "pin", "timeout_s")
            if spec.get(k) is not None
        }
        if "pin" in options:  # the checks devices.toml and --pin go through, for library callers
            options["pin"] = check_pin(options["pin"], f"device {name}: pin")
        if "cooldown_s" in options:
            options["cooldown_s"] = check_cooldown(
                options["cooldown_s"], f"device {name}: cooldown_s"
            )
        return Device("adb", name, serial, {}, True, "", options)

    def discover(self, specs: Sequence[Mapping[str, Any]], *, timeout_s: float) -> list[Device]:
        wanted = [self.device(s) for s in specs if not s.get("all")]
        forget_adb_server()  # a discovery looks again; the bench after it reuses the answer
        unavailable = adb_unavailable_reason()
        if unavailable is not None:
            return [
                Device("adb", d.name, d.address, {}, False, unavailable, d.options) for d in wanted
            ]
        try:
            attached = parse_devices(_adb(["devices", "-l"], timeout_s=timeout_s))
        except AdbError as e:  # e.g. the adb server does not start: say so, do not hide it
            return [
                Device("adb", d.name, d.address, {}, False, str(e), d.options)
                for d in wanted or [Device("adb", "adb", "")]
            ]
        states = {a["serial"]: a["state"] for a in attached}
        named = {d.address for d in wanted}
        devices = wanted + [
            self.device({"serial": a["serial"]}) for a in attached if a["serial"] not in named
        ]
        out = []
        for d in devices:
            state = states.get(d.address)
            if state != "device":
                why = "not attached" if state is None else f"adb reports it {state!r}"
                out.append(Device("adb", d.name, d.address, {}, False, why, d.options))
                continue
            try:
                out.append(
                    Device(
                        "adb",
                        d.name,
                        d.address,
                        describe_device(d.address, timeout_s=timeout_s),
                        True,
                        "",
                        d.options,
                    )
                )
            except AdbError as e:
                out.append(Device("adb", d.name, d.address, {}, False, str(e), d.options))
        return out

    def _runner_path(self, device: Device, runner: Runner, abis: Sequence[str]) -> Path:
        given = device.options.get("runner")
        if given:  # an explicit path is used or refused, never silently replaced
            path = Path(given).expanduser()
            if not path.is_file():
                raise ConfigError(f"--runner {str(path)!r} is not a file")
            return path
        candidates = []
        if device.options.get("runner_dir"):
            root = Path(device.options["runner_dir"]).expanduser()
            candidates += [root / runner.binary, *(root / abi / runner.binary for abi in abis)]
        cache = runner_cache_dir()
        candidates += [cache / abi / runner.binary for abi in abis]
        for c in candidates:
            if c.is_file():
                return c
        tried = ", ".join(str(c) for c in candidates) or "nothing (the device reports no ABI)"
        raise ConfigError(
            f"no {runner.binary} for {device.name}: give --runner PATH (an Android build of it), "
            f"runner_dir in devices.toml, or put it in {cache}/ABI/ (tried {tried})"
        )

    def _pin_mask(self, device: Device) -> tuple[str | None, list[int] | None]:
        pin = device.options.get("pin")
        if not pin:
            return None, None
        if pin != "big":
            return str(pin), None
        text = _adb(
            [
                "shell",
                "for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; "
                'do echo "$f $(cat $f)"; done',
            ],
            serial=device.address,
        )
        return big_core_mask(text)

    def bench(self, device: Device, request: BenchRequest, *, timeout_s: float) -> dict[str, Any]:
        from edgerep.bench.latency import LatencyConfig
        from edgerep.bundle import read_manifest

        serial = device.address
        manifest = read_manifest(request.bundle)
        settings = dict(request.settings)
        config = (
            LatencyConfig.from_dict(settings["latency"])
            if settings.get("latency")
            else LatencyConfig()
        )
        threads = settings.get("threads")
        cooldown_s = float(device.options.get("cooldown_s", 2.0))
        wanted = settings.get("runtimes")  # None: every artifact an adb runner takes
        unmeasured = _unmeasured(request, settings, wanted)
        before = describe_device(serial, timeout_s=min(timeout_s, 10.0))
        abis = list(before.get("abilist") or []) or ([before["abi"]] if before.get("abi") else [])
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        work = f"{REMOTE_ROOT}/edgerep-{uuid.uuid4().hex[:12]}"
        _adb(["shell", "mkdir", "-p", work], serial=serial)
        try:
            pin = self._pin_mask(device)
            for art in manifest["artifacts"]:
                runner = RUNNERS.get(art["format"])
                if runner is None or (wanted is not None and runner.runtime not in wanted):
                    continue
                if rows:  # the previous artifact's runs warmed the device
                    time.sleep(cooldown_s)
                try:
                    rows.append(
                        self._bench_artifact(
                            device,
                            request,
                            art,
                            self._runner_path(device, runner, abis),
                            runner,
                            work,
                            config,
                            threads,
                            cooldown_s,
                            timeout_s,
                            pin,
                        )
                    )
                except EdgerepError as e:
                    errors.append(
                        {"variant": request.variant, "runtime": runner.binary, "error": str(e)}
                    )
        finally:
            try:
                _adb(["shell", "rm", "-rf", work], serial=serial)
            except AdbError as e:
                errors.append(
                    {"variant": request.variant, "runtime": "-", "error": f"clean-up: {e}"}
                )
        errors += unmeasured
        if not rows and not errors:
            formats = ", ".join(a["format"] for a in manifest["artifacts"])
            if wanted is not None:
                raise UnsupportedError(
                    f"nothing to run on {device.name}: --runtime {','.join(wanted)} has no "
                    f"artifact in this bundle (formats: {formats}); adb runners: "
                    + ", ".join(f"{r.runtime} for {f}" for f, r in RUNNERS.items())
                )
            raise UnsupportedError(
                f"no adb runner for this bundle's formats ({formats}); runners exist for "
                f"{', '.join(RUNNERS)}"
            )
        after = _thermal(serial, 10.0)
        env = {**before, "thermal_after": after, "name": device.name}
        return {
            "schema_version": 1,
            "kind": "edgerep-bench",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": env,
            "settings": {
                "latency": config.to_dict(),
                "threads": threads,
                "device": "android-cpu",
                "reference_row": None,
                "cooldown_s": cooldown_s,
            },
            "rows": rows,
            "errors": errors,
        }

    def _bench_artifact(
        self,
        device: Device,
        request: BenchRequest,
        art: Mapping[str, Any],
        local_runner: Path,
        runner: Runner,
        work: str,
        config: Any,
        threads: int | None,
        cooldown_s: float,
        timeout_s: float,
        pinned: tuple[str | None, list[int] | None],
    ) -> dict[str, Any]:
        serial = device.address
        remote_bin = f"{work}/{runner.binary}"
        remote_model = f"{work}/{Path(art['file']).name}"
        _adb(["push", str(local_runner), remote_bin], serial=serial, timeout_s=timeout_s)
        _adb(["shell", "chmod", "755", remote_bin], serial=serial)
        _adb(
            ["push", str(Path(request.bundle) / art["file"]), remote_model],
            serial=serial,
            timeout_s=timeout_s,
        )
        result_file = f"{work}/{runner.binary}.times"
        pin, cores = pinned
        use_file = runner.result_file

        def argv_for(with_file: bool) -> list[str]:
            argv = runner.command(
                remote_bin,
                remote_model,
                config.min_iters,
                threads,
                result_file if with_file else None,
            )
            return ["taskset", pin, *argv] if pin else argv

        thermal_before = _thermal(serial, 10.0)
        runs = []
        for i in range(config.repeats):
            if i:
                time.sleep(cooldown_s)
            if use_file:  # a runner may append: each run starts from no file
                _adb(["shell", "rm", "-f", result_file], serial=serial)
            refusal = runner.refuses_result_file if use_file else None
            try:
                out = _adb(["shell", *argv_for(use_file)], serial=serial, timeout_s=timeout_s)
            except AdbError as e:  # gflags refuses an unknown flag with exit status 1
                if refusal is None or refusal not in str(e):
                    raise
                out = refusal
            if refusal is not None and refusal in out:
                use_file = False  # this build lacks the option: its runs go without it
                out = _adb(["shell", *argv_for(False)], serial=serial, timeout_s=timeout_s)
            written = (
                _pull_bytes(result_file, serial=serial, timeout_s=timeout_s) if use_file else None
            )
            runs.append(runner.parse(out, written))
        argv = argv_for(use_file)
        latency, samples_ms = _latency_from_runs(runs, config)
        return {
            "variant": request.variant,
            "runtime": runner.binary,
            "format": art["format"],
            "precision": art["precision"],
            "device": "android-cpu" + (f" (taskset {pin})" if pin else ""),
            "bundle": None,
            "session": {
                "command": argv,
                "runner": str(local_runner),
                "not_applied": _not_applied(config),
                "pinned_cores": cores,
                "cooldown_s": cooldown_s,
                "thermal_before": thermal_before,
                "thermal_after": _thermal(serial, 10.0),
            },
            "latency": latency,
            "accuracy": None,
            "reference": None,
            "roofline": None,
            "samples_ms": samples_ms,
        }
