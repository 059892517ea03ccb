"""adb transport against a FAKE ``adb`` executable on PATH (no real adb, no device).

The fake logs every invocation (argv, one JSON line each) and answers from canned
outputs, so the tests check command construction, parsing and error handling.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from edgerep.bench.latency import LatencyConfig, summarize_runs
from edgerep.devices._base import BenchRequest
from edgerep.devices.adb import (
    AdbError,
    AdbTransport,
    adb_executable,
    big_core_mask,
    parse_devices,
    parse_getprop,
    parse_thermal,
)
from edgerep.errors import ConfigError, UnsupportedError
from tests._tiny_bundle import make_bundle
from tests.devices._fake_runners import ort_run, ort_times

DEVICES = """List of devices attached
R58M1234ABC            device usb:1-1 product:beyond1 model:SM_G973F device:beyond1 transport_id:2
emulator-5554          offline transport_id:1
0123456789ABCDEF       unauthorized usb:1-2 transport_id:3

"""
GETPROP = """[ro.product.model]: [SM-G973F]
[ro.product.manufacturer]: [samsung]
[ro.soc.model]: [Exynos 9820]
[ro.board.platform]: [exynos5]
[ro.product.cpu.abi]: [arm64-v8a]
[ro.product.cpu.abilist]: [arm64-v8a,armeabi-v7a,armeabi]
[ro.build.version.release]: [12]
[ro.build.version.sdk]: [31]
[ro.build.fingerprint]: [samsung/beyond1/beyond1:12/SP1A/G973F:user/release-keys]
garbage line
"""
THERMAL = "IsStatusOverride: false\nThermal Status: 2\nCached temperatures:\n"
BATTERY = "Current Battery Service state:\n  AC powered: false\n  level: 80\n  temperature: 312\n"
FREQS = "1950000\n1950000\n2314000\n2730000\n"
# a 4 + 3 + 1 phone (little, big, prime); cpu10/11 check numeric, not glob, order
MAX_FREQS = "".join(
    f"/sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq {f}\n"
    for c, f in [
        (0, 1800000),
        (1, 1800000),
        (10, 1800000),
        (11, 1800000),
        (2, 2400000),
        (3, 2400000),
        (4, 2400000),
        (5, 3000000),
    ]
)
FAKE = r"""#!{python}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
canned = json.loads(open(os.environ["FAKE_ADB_CANNED"]).read())
if os.environ.get("FAKE_ADB_FAIL") and os.environ["FAKE_ADB_FAIL"] in " ".join(argv):
    sys.stderr.write("error: device 'R58M1234ABC' not found\n")
    sys.exit(1)
if argv[:2] == ["devices", "-l"]:
    print(canned["devices"], end="")
    sys.exit(0)
if argv[0] == "-s":
    argv = argv[2:]
cmd = " ".join(argv)
for key in ("getprop", "thermalservice", "dumpsys battery", "scaling_cur_freq", "cpuinfo_max_freq"):
    if key in cmd:
        print(canned[key], end="")
        sys.exit(0)
# device files the runners write (base64), kept across invocations (a tool may append)
import base64
state = os.environ["FAKE_ADB_LOG"] + ".files.json"
files = json.loads(open(state).read()) if os.path.exists(state) else {}
if argv[:3] == ["shell", "rm", "-f"]:
    files.pop(argv[3], None)
elif argv[0] == "pull":
    if argv[1] not in files:
        sys.stderr.write(f"adb: error: failed to stat remote object '{argv[1]}': No such file\n")
        sys.exit(1)
    open(argv[2], "wb").write(base64.b64decode(files[argv[1]]))
elif argv[0] == "shell" and "chmod" not in cmd and ("-m" in argv or "executor_runner" in cmd):
    sys.path.insert(0, {root!r})
    from tests.devices._fake_runners import et_run, ort_run

    n = len(json.loads(open(state + ".runs").read())) if os.path.exists(state + ".runs") else 0
    if "executor_runner" in cmd:
        iters = int(next(a for a in argv if a.startswith("--num_executions=")).split("=")[1])
        dump = next((a.split("=", 1)[1] for a in argv if a.startswith("--etdump_path=")), None)
        tracer = os.environ.get("FAKE_ET_TRACER", "1") == "1"
        out = et_run(n, iters, tracer=tracer, etdump_flag=dump is not None)
        if dump is not None and tracer:
            files[dump] = canned["etdump"][str(n)]
    else:
        out, written = ort_run(n, int(argv[argv.index("-r") + 1]), statistics="-s" in argv)
        old = base64.b64decode(files.get(argv[-1], ""))
        files[argv[-1]] = base64.b64encode(old + written.encode()).decode()
    if "unknown command line flag" in out:  # gflags: to stderr, exit status 1
        open(state, "w").write(json.dumps(files))
        sys.stderr.write(out)
        sys.exit(1)
    open(state + ".runs", "w").write(json.dumps([0] * (n + 1)))
    print(out, end="")
open(state, "w").write(json.dumps(files))
sys.exit(0)
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def canned_answers() -> dict[str, str]:
    return {
        "devices": DEVICES,
        "getprop": GETPROP,
        "thermalservice": THERMAL,
        "dumpsys battery": BATTERY,
        "scaling_cur_freq": FREQS,
        "cpuinfo_max_freq": MAX_FREQS,
    }


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "adb"
    root = str(Path(__file__).resolve().parents[2])
    exe.write_text(FAKE.replace("{python}", sys.executable).replace("{root!r}", repr(root)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "adb.log"
    canned = tmp_path / "canned.json"
    canned.write_text(json.dumps(canned_answers()))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("EDGEREP_ADB", raising=False)
    # no adb server there: these tests exercise the command line (test_adb_server.py the other)
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(closed_port()))
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_CANNED", str(canned))

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def test_parsers():
    devices = parse_devices(DEVICES)
    assert [(d["serial"], d["state"]) for d in devices] == [
        ("R58M1234ABC", "device"),
        ("emulator-5554", "offline"),
        ("0123456789ABCDEF", "unauthorized"),
    ]
    assert devices[0]["model"] == "SM_G973F" and devices[0]["transport_id"] == "2"
    props = parse_getprop(GETPROP)
    assert props["ro.product.cpu.abi"] == "arm64-v8a" and "garbage line" not in str(props)
    assert props["ro.build.fingerprint"].endswith("release-keys")
    t = parse_thermal(THERMAL, BATTERY, FREQS)
    assert t == {
        "thermal_status": 2,
        "battery_temp_c": 31.2,
        "cpu_freq_khz": [1950000, 1950000, 2314000, 2730000],
    }
    assert parse_thermal("", "", "") == {
        "thermal_status": None,
        "battery_temp_c": None,
        "cpu_freq_khz": [],
    }


def test_discover_with_fake_adb(fake_adb):
    devices = AdbTransport().discover([{"serial": "MISSING1"}], timeout_s=5)
    by = {d.address: d for d in devices}
    assert set(by) == {"MISSING1", "R58M1234ABC", "emulator-5554", "0123456789ABCDEF"}
    good = by["R58M1234ABC"]
    assert good.reachable and good.name == "adb:R58M1234ABC"
    d = good.description
    assert (d["model"], d["soc"], d["abi"], d["android"], d["sdk"]) == (
        "SM-G973F",
        "Exynos 9820",
        "arm64-v8a",
        "12",
        "31",
    )
    assert d["thermal_status"] == 2 and d["battery_temp_c"] == 31.2
    assert not by["emulator-5554"].reachable and "offline" in by["emulator-5554"].error
    assert not by["0123456789ABCDEF"].reachable and "unauthorized" in by["0123456789ABCDEF"].error
    assert by["MISSING1"].error == "not attached"
    calls = fake_adb()
    assert calls[0] == ["devices", "-l"]
    assert ["-s", "R58M1234ABC", "shell", "getprop"] in calls
    # offline/unauthorized devices are not queried
    assert not any(c[:2] == ["-s", "emulator-5554"] for c in calls)


def test_discover_errors(fake_adb, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_FAIL", "devices -l")
    devices = AdbTransport().discover([{"serial": "X"}], timeout_s=5)
    assert len(devices) == 1 and not devices[0].reachable and "not found" in devices[0].error
    (failed,) = AdbTransport().discover([], timeout_s=5)
    assert failed.name == "adb" and not failed.reachable and "not found" in failed.error
    monkeypatch.setenv("PATH", "/nonexistent")
    assert adb_executable() is None
    assert AdbTransport().discover([], timeout_s=5) == []
    (only,) = AdbTransport().discover([{"serial": "X"}], timeout_s=5)
    assert "not on PATH" in only.error


def test_bench_command_construction_and_stats(fake_adb, tmp_path):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    runner = tmp_path / "onnxruntime_perf_test"
    runner.write_bytes(b"\x7fELF fake")
    transport = AdbTransport()
    device = transport.device(
        {"serial": "R58M1234ABC", "runner": str(runner), "cooldown_s": 0.01, "pin": "f0"}
    )
    latency = {"min_iters": 7, "min_seconds": 0.0, "warmup_iters": 1, "repeats": 3}
    report = transport.bench(
        device, BenchRequest(str(bundle), "tiny", {"latency": latency, "threads": 2}), timeout_s=30
    )
    (row,) = report["rows"]
    assert row["runtime"] == "onnxruntime_perf_test" and row["format"] == "onnx"
    lat = row["latency"]
    # the per-call times the runner wrote, through the statistics local rows get
    expected = summarize_runs(
        [[t * 1e9 for t in ort_times(run, 7)] for run in range(3)],
        config=LatencyConfig(**latency),
    ).to_dict()
    assert lat["stats"] == pytest.approx(expected["stats"])
    assert lat["stats"]["n"] == 21 and lat["runs"] == [pytest.approx(r) for r in expected["runs"]]
    assert lat["p50_ci_ms"] == pytest.approx(expected["p50_ci_ms"])
    assert lat["p50_ci_ms"][0] < lat["stats"]["p50_ms"] < lat["p50_ci_ms"][1]
    assert lat["p50_spread"] == pytest.approx(expected["p50_spread"]) and lat["unstable"]
    assert lat["stats"]["p99_ms"] > lat["stats"]["p90_ms"] > lat["stats"]["p50_ms"]
    assert "mean_only" not in lat and lat["samples"] == "per-call times written by the runner"
    assert lat["load_ms"] == pytest.approx(20.0) and lat["first_ms"] == 3.0
    assert lat["peak_working_set_bytes"] == 31000000
    assert row["samples_ms"] == pytest.approx([t * 1e3 for r in range(3) for t in ort_times(r, 7)])
    from edgerep.bench.report import validate_report

    assert validate_report(report) == []
    assert report["environment"]["model"] == "SM-G973F"
    assert report["environment"]["thermal_after"]["battery_temp_c"] == 31.2
    calls = fake_adb()
    work = next(c[-1] for c in calls if c[2:5] == ["shell", "mkdir", "-p"])
    assert work.startswith("/data/local/tmp/edgerep-")
    assert ["-s", "R58M1234ABC", "push", str(runner), f"{work}/onnxruntime_perf_test"] in calls
    assert [
        "-s",
        "R58M1234ABC",
        "push",
        str(bundle / "onnx" / "model.onnx"),
        f"{work}/model.onnx",
    ] in calls
    runs = [c for c in calls if "-m" in c]
    assert len(runs) == 3
    assert runs[0][2:] == [
        "shell",
        "taskset",
        "f0",
        f"{work}/onnxruntime_perf_test",
        "-I",
        "-m",
        "times",
        "-r",
        "7",
        "-x",
        "2",
        "-s",
        f"{work}/model.onnx",
        f"{work}/onnxruntime_perf_test.times",
    ]
    # the tool appends to its result file: removed before each run, pulled after it
    result = f"{work}/onnxruntime_perf_test.times"
    for run in runs:
        i = calls.index(run)
        assert calls[i - 1][2:] == ["shell", "rm", "-f", result]
        assert calls[i + 1][2:4] == ["pull", result]
    cleanup = calls.index(["-s", "R58M1234ABC", "shell", "rm", "-rf", work])
    assert cleanup > calls.index(runs[-1])  # removed after the last run


def test_bench_errors(fake_adb, tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    transport = AdbTransport()
    no_runner = transport.device({"serial": "R58M1234ABC"})
    report = transport.bench(no_runner, BenchRequest(str(bundle), "tiny", {}), timeout_s=30)
    assert report["rows"] == [] and "--runner PATH" in report["errors"][0]["error"]
    assert any(c[2:5] == ["shell", "rm", "-rf"] for c in fake_adb())  # cleaned up anyway
    monkeypatch.setenv("FAKE_ADB_FAIL", "getprop")
    with pytest.raises(AdbError, match="not found"):
        transport.bench(no_runner, BenchRequest(str(bundle), "tiny", {}), timeout_s=30)
    with pytest.raises(ConfigError):
        transport.bench(
            no_runner, BenchRequest(str(bundle), "tiny", {"latency": {"x": 1}}), timeout_s=30
        )


def test_runner_parsers():
    from edgerep.devices.adb import ET_MEAN_ONLY, RUNNERS

    out, written = ort_run(0, 5, statistics=True)
    ort = RUNNERS["onnx"].parse(out, written.encode())
    assert ort["samples_ms"] == pytest.approx([t * 1e3 for t in ort_times(0, 5)])
    assert ort["peak_working_set_bytes"] == 31000000 and ort["load_ms"] == pytest.approx(20)
    out2, written2 = ort_run(1, 5, statistics=False)
    with pytest.raises(AdbError, match="5 requests but its result file holds 10"):
        RUNNERS["onnx"].parse(out2, (written + written2).encode())  # a file not removed
    with pytest.raises(AdbError, match="no per-call times"):
        RUNNERS["onnx"].parse("Segmentation fault", b"")
    et = RUNNERS["executorch"].parse(
        "I 00:00:01 Model executed successfully 20 time(s) in 50.0 ms.", None
    )
    assert et == {"mean_ms": pytest.approx(2.5), "n": 20, "mean_only": ET_MEAN_ONLY}
    with pytest.raises(AdbError, match="timing"):
        RUNNERS["executorch"].parse("", None)
    assert RUNNERS["executorch"].command("/r", "/m.pte", 9, None, "/t") == [
        "/r",
        "--model_path=/m.pte",
        "--num_executions=10",  # one more: the first, cold call is kept apart
        "--etdump_path=/t",
    ]
    assert "--etdump_path" not in " ".join(RUNNERS["executorch"].command("/r", "/m", 9, 2, None))


def _pte_bundle(tmp_path):
    """The tiny bundle with an ExecuTorch artifact listed (bytes the fake runner ignores)."""
    from edgerep.bundle import read_manifest, sha256_file, write_manifest

    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    (bundle / "executorch").mkdir()
    (bundle / "executorch" / "model.pte").write_bytes(b"not read by the fake runner")
    manifest = read_manifest(bundle)
    pte = {
        **manifest["artifacts"][0],
        "format": "executorch",
        "file": "executorch/model.pte",
        "files": ["executorch/model.pte"],
        "sha256": sha256_file(bundle / "executorch" / "model.pte"),
    }
    body = {k: v for k, v in manifest.items() if k not in ("files", "checksum")}
    write_manifest(bundle, {**body, "artifacts": [pte]})
    return bundle


def _et_bench(tmp_path, latency):
    runner = tmp_path / "executor_runner"
    runner.write_bytes(b"\x7fELF fake")
    transport = AdbTransport()
    device = transport.device({"serial": "R58M1234ABC", "runner": str(runner), "cooldown_s": 0})
    request = BenchRequest(str(_pte_bundle(tmp_path)), "tiny", {"latency": latency})
    return transport.bench(device, request, timeout_s=30)


def test_executorch_per_call_times_from_the_etdump(fake_adb, tmp_path):
    """A runner built with the event tracer writes an ETDump: pulled back and read with
    ExecuTorch's deserializer, its Method::execute events are the per-call times, and the
    row gets the statistics of local rows."""
    pytest.importorskip("executorch.devtools.etdump.serialize")
    from tests.devices._fake_runners import et_call_ns, et_etdump

    path = Path(os.environ["FAKE_ADB_CANNED"])
    canned = json.loads(path.read_text())
    canned["etdump"] = {str(run): base64.b64encode(et_etdump(run, 9)).decode() for run in range(3)}
    path.write_text(json.dumps(canned))
    latency = {"min_iters": 8, "min_seconds": 0.0, "warmup_iters": 0, "repeats": 3}
    report = _et_bench(tmp_path, latency)
    assert report["errors"] == []
    (row,) = report["rows"]
    lat = row["latency"]
    # 9 calls a run (8 asked + the cold first one, kept apart as first_ms)
    expected = summarize_runs(
        [et_call_ns(run, 9)[1:] for run in range(3)], config=LatencyConfig(**latency)
    ).to_dict()
    assert "mean_only" not in lat
    assert lat["stats"] == pytest.approx(expected["stats"]) and lat["stats"]["n"] == 24
    assert lat["p50_ci_ms"] == pytest.approx(expected["p50_ci_ms"])
    assert lat["p50_spread"] == pytest.approx(expected["p50_spread"])
    from edgerep.devices.adb import RUNNERS
    from tests.devices._fake_runners import et_run

    parse = RUNNERS["executorch"].parse
    parsed = parse(et_run(0, 8, etdump_flag=True), et_etdump(0, 8))
    assert parsed["samples_ms"] == pytest.approx([ns / 1e6 for ns in et_call_ns(0, 8)[1:]])
    assert parsed["first_ms"] == pytest.approx(et_call_ns(0, 8)[0] / 1e6)
    with pytest.raises(AdbError, match=r"ran 7 time.*holds 8"):
        parse(et_run(0, 7, etdump_flag=True), et_etdump(0, 8))
    with pytest.raises(AdbError, match="disagree"):
        parse(et_run(2, 8, etdump_flag=True).replace("in 2", "in 9"), et_etdump(2, 8))
    with pytest.raises(AdbError, match="cannot be read"):
        parse(et_run(0, 8, etdump_flag=True), b"\x10\x00\x00\x00not an etdump....")
    calls = fake_adb()
    runs = [c for c in calls if any(a.startswith("--num_executions=") for a in c)]
    assert len(runs) == 3 and all(c[-1].startswith("--etdump_path=") for c in runs)
    dump = runs[0][-1].split("=", 1)[1]
    for run in runs:
        i = calls.index(run)
        assert calls[i - 1][2:] == ["shell", "rm", "-f", dump]
        assert calls[i + 1][2:4] == ["pull", dump]


def test_executorch_without_tracer_says_mean_only_with_the_reason(fake_adb, tmp_path, monkeypatch):
    """A runner built without the event tracer refuses --etdump_path: it is run again
    without, and the row is a mean per call that says so with the reason, claims no
    interval and no p99; the Markdown shows it as a mean with a footnote."""
    from edgerep.bench.report import markdown_table, render_html, validate_report
    from edgerep.devices.adb import ET_MEAN_ONLY
    from tests.devices._fake_runners import et_call_ns

    monkeypatch.setenv("FAKE_ET_TRACER", "0")
    latency = {"min_iters": 8, "min_seconds": 0.0, "warmup_iters": 0, "repeats": 3}
    report = _et_bench(tmp_path, latency)
    (row,) = report["rows"]
    lat = row["latency"]
    means = [sum(et_call_ns(run, 8)) / 8e6 * 1.002 for run in range(3)]
    assert lat["mean_only"] == ET_MEAN_ONLY
    assert lat["stats"]["mean_ms"] == pytest.approx(means[1], rel=1e-5) == lat["stats"]["p50_ms"]
    assert lat["stats"]["p99_ms"] is None and lat["p50_ci_ms"] == [None, None]
    assert lat["p50_spread"] == pytest.approx((means[2] - means[0]) / means[1], rel=1e-4)
    assert lat["stats"]["n"] == 24 and row["samples_ms"] == []
    assert "--etdump_path" not in " ".join(row["session"]["command"])
    refused = [c for c in fake_adb() if any(a.startswith("--etdump_path=") for a in c)]
    assert len(refused) == 1  # tried once, then every run without it
    assert not any(c[2:3] == ["pull"] for c in fake_adb())
    assert validate_report(report) == []
    assert f"mean {lat['stats']['p50_ms']:.3f}" in render_html(report)
    table = markdown_table({**report, "rows": [row]})
    assert f"| mean {lat['stats']['p50_ms']:.3f} (no CI)† | - |" in table
    assert f"a mean per call, not a p50: {ET_MEAN_ONLY}" in table


def test_real_device_skips_with_reason():
    """The README's set-up installs Debian's adb, so on CI this runs the real adb server
    and client through discovery; only the phone itself is missing there."""
    from edgerep.devices.adb import adb_unavailable_reason

    reason = adb_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the real-device check needs adb: {reason}")
    devices = [d for d in AdbTransport().discover([], timeout_s=5) if d.reachable]
    if not devices:
        pytest.skip("adb is installed but no Android device is attached")
    assert devices[0].description["abi"]


def test_big_core_mask():
    assert big_core_mask(MAX_FREQS) == ("3c", [2, 3, 4, 5])
    same = "".join(
        f"/sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq 2000000\n" for c in range(4)
    )
    assert big_core_mask(same) == ("f", [0, 1, 2, 3])  # one cluster: every core
    with pytest.raises(AdbError, match="hex mask"):
        big_core_mask("cat: No such file or directory\n")


def _bench(transport, device, bundle):
    latency = {"min_iters": 3, "min_seconds": 0.0, "warmup_iters": 1, "repeats": 2}
    return transport.bench(
        device, BenchRequest(str(bundle), "tiny", {"latency": latency}), timeout_s=30
    )


def test_pin_big_cores_and_runner_cache(fake_adb, tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    runner = cache / "edgerep" / "runners" / "armeabi-v7a" / "onnxruntime_perf_test"
    runner.parent.mkdir(parents=True)
    runner.write_bytes(b"\x7fELF fake")
    transport = AdbTransport()
    device = transport.device({"serial": "R58M1234ABC", "pin": "big", "cooldown_s": 0})
    assert device.options == {"pin": "big", "cooldown_s": 0}  # 0 is kept, not dropped
    (row,) = _bench(transport, device, bundle)["rows"]
    # the runner came from the cache, for the second ABI the device lists
    assert row["session"]["runner"] == str(runner)
    assert row["session"]["pinned_cores"] == [2, 3, 4, 5]
    calls = fake_adb()
    runs = [c for c in calls if "-m" in c]
    assert len(runs) == 2 and all(c[2:5] == ["shell", "taskset", "3c"] for c in runs)
    assert any(c[1:3] == ["R58M1234ABC", "push"] and c[3] == str(runner) for c in calls)


def test_runner_lookup_order_and_errors(fake_adb, tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    transport = AdbTransport()
    runners = tmp_path / "runners"
    by_abi = runners / "arm64-v8a" / "onnxruntime_perf_test"
    by_abi.parent.mkdir(parents=True)
    by_abi.write_bytes(b"\x7fELF fake")
    device = transport.device(
        {"serial": "R58M1234ABC", "runner_dir": str(runners), "cooldown_s": 0}
    )
    (row,) = _bench(transport, device, bundle)["rows"]
    assert row["session"]["runner"] == str(by_abi)
    assert row["session"]["pinned_cores"] is None
    assert not any("taskset" in c for c in fake_adb())
    missing = transport.device({"serial": "R58M1234ABC", "runner": str(tmp_path / "nope")})
    report = _bench(transport, missing, bundle)
    assert report["rows"] == [] and "is not a file" in report["errors"][0]["error"]
    nothing = transport.device({"serial": "R58M1234ABC"})
    (err,) = _bench(transport, nothing, bundle)["errors"]
    assert "empty-cache/edgerep/runners/ABI/" in err["error"]
    assert "empty-cache/edgerep/runners/arm64-v8a/onnxruntime_perf_test" in err["error"]


def test_cli_bench_on_an_adb_device(fake_adb, tmp_path, capsys):
    from edgerep.cli import EXIT_OK, EXIT_USAGE, main

    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    runner = tmp_path / "onnxruntime_perf_test"
    runner.write_bytes(b"\x7fELF fake")
    argv = ["bench", str(bundle), "--device", "adb:R58M1234ABC", "--runner", str(runner)]
    argv += ["--min-iters", "3", "--seconds", "0", "--warmup", "1", "--repeats", "2"]
    assert main([*argv, "--pin", "fast"]) == EXIT_USAGE
    assert "--pin 'fast'" in capsys.readouterr().err
    assert main([*argv, "--cooldown", "-1"]) == EXIT_USAGE
    assert main([*argv, "--pin", "big", "--cooldown", "0", "--out", str(tmp_path / "o")]) == EXIT_OK
    report = json.loads((tmp_path / "o" / "bench.json").read_text())
    (row,) = report["rows"]
    assert row["target"] == "adb:R58M1234ABC" and row["session"]["pinned_cores"] == [2, 3, 4, 5]
    assert row["session"]["cooldown_s"] == 0
    assert all(c[2:5] == ["shell", "taskset", "3c"] for c in fake_adb() if "-m" in c)


def test_what_adb_cannot_do_is_said_not_dropped(fake_adb, tmp_path):
    """--runtime selects runners; --data and --concurrency are "not measured" entries;
    warm-up and min_seconds are listed as not applied in the row."""
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    runner = tmp_path / "onnxruntime_perf_test"
    runner.write_bytes(b"\x7fELF fake")
    transport = AdbTransport()
    device = transport.device({"serial": "R58M1234ABC", "runner": str(runner), "cooldown_s": 0})
    latency = {"min_iters": 3, "min_seconds": 0.5, "warmup_iters": 2, "repeats": 1}

    def bench(settings, data=None):
        request = BenchRequest(str(bundle), "tiny", {"latency": latency, **settings}, data)
        return transport.bench(device, request, timeout_s=30)

    settings = {"runtimes": ["onnxruntime", "openvino"], "concurrency": [2], "precision": "f16"}
    report = bench(settings, "d.npz")
    (row,) = report["rows"]
    assert row["session"]["not_applied"]["warmup_iters"] == 2
    assert row["session"]["not_applied"]["min_seconds"] == 0.5
    errors = {e["runtime"] + ": " + e["error"] for e in report["errors"]}
    assert any(e.startswith("openvino: --runtime openvino does not run on adb") for e in errors)
    assert any("accuracy (--data)" in e for e in errors)
    assert any("throughput at concurrency [2]" in e for e in errors)
    assert any("--precision f16: an OpenVINO hint" in e for e in errors)
    before = len([c for c in fake_adb() if "-m" in c])
    with pytest.raises(UnsupportedError, match="--runtime executorch has no artifact"):
        bench({"runtimes": ["executorch"]})  # the bundle has no .pte: nothing runs
    assert len([c for c in fake_adb() if "-m" in c]) == before  # the ONNX runner did not run
    latency.update(min_seconds=0.0, warmup_iters=0)
    (plain,) = bench({})["rows"]
    assert plain["session"]["not_applied"] == {}
