"""adb through the adb server (adbutils) against a FAKE adb server on loopback that
speaks the host protocol subset used (tests/devices/_fake_adb_server.py): discovery,
shell with exit status, sync push, a whole benchmark, errors. No adb executable."""

from __future__ import annotations

import pytest

pytest.importorskip("adbutils", reason="adbutils (the android extra) is not installed")

from edgerep.bench.latency import LatencyConfig, summarize_runs
from edgerep.devices._adb_host import _adb
from edgerep.devices._base import BenchRequest
from edgerep.devices.adb import AdbError, AdbTransport, adb_server, adb_unavailable_reason
from tests._tiny_bundle import make_bundle
from tests.devices._fake_adb_server import FakeAdbServer, canned_shell
from tests.devices._fake_runners import ort_times
from tests.devices.test_adb import DEVICES, canned_answers, closed_port


@pytest.fixture
def server(tmp_path, monkeypatch):
    empty = tmp_path / "no-adb-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no adb executable: only the server path works
    monkeypatch.delenv("EDGEREP_ADB", raising=False)
    monkeypatch.delenv("ANDROID_ADB_SERVER_HOST", raising=False)
    runs: list[str] = []
    fake = FakeAdbServer(DEVICES, canned_shell(canned_answers(), runs))
    fake.runs = runs
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(fake.port))
    with fake:
        yield fake


def test_discover_through_the_server(server):
    assert adb_server() == ("127.0.0.1", server.port)
    devices = {d.address: d for d in AdbTransport().discover([], timeout_s=5)}
    assert set(devices) == {"R58M1234ABC", "emulator-5554", "0123456789ABCDEF"}
    good = devices["R58M1234ABC"].description
    assert (good["model"], good["abi"], good["thermal_status"]) == ("SM-G973F", "arm64-v8a", 2)
    assert "offline" in devices["emulator-5554"].error
    assert "host:devices-l" in server.services
    assert "R58M1234ABC:shell:getprop; echo X4EXIT:$?" in server.services


def test_shell_status_and_unknown_device(server):
    with pytest.raises(AdbError, match=r"failed \(1\): boom"):
        _adb(["shell", "false"], serial="R58M1234ABC")
    with pytest.raises(AdbError, match="not found"):
        _adb(["shell", "getprop"], serial="NOPE")


def test_bench_through_the_server(server, tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = tmp_path / "cache" / "edgerep" / "runners" / "arm64-v8a" / "onnxruntime_perf_test"
    runner.parent.mkdir(parents=True)
    runner.write_bytes(b"\x7fELF fake runner")
    transport = AdbTransport()
    device = transport.device({"serial": "R58M1234ABC", "pin": "big", "cooldown_s": 0})
    latency = {"min_iters": 4, "min_seconds": 0.0, "warmup_iters": 1, "repeats": 3}
    report = transport.bench(
        device, BenchRequest(str(bundle), "tiny", {"latency": latency}), timeout_s=30
    )
    (row,) = report["rows"]
    assert report["errors"] == []
    assert len(server.runs) == 3 and all(
        r.startswith("taskset 3c /data/local/tmp/edgerep-") for r in server.runs
    )
    expected = summarize_runs(
        [[t * 1e9 for t in ort_times(run, 4)] for run in range(3)],
        config=LatencyConfig(**latency),
    ).to_dict()
    assert row["latency"]["stats"] == pytest.approx(expected["stats"])
    assert row["latency"]["p50_ci_ms"] == pytest.approx(expected["p50_ci_ms"])
    # the bytes pushed over the sync protocol are the runner and the model
    pushed = {path.rsplit("/", 1)[1]: data for path, (data, _) in server.files.items()}
    assert pushed["onnxruntime_perf_test"] == runner.read_bytes()
    assert pushed["model.onnx"] == (bundle / "onnx" / "model.onnx").read_bytes()
    work = next(p for p in server.files).rsplit("/", 1)[0]
    assert f"R58M1234ABC:shell:rm -rf {work}; echo X4EXIT:$?" in server.services


def test_no_server_and_no_adb(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("EDGEREP_ADB", raising=False)
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(closed_port()))
    assert adb_server() is None
    reason = adb_unavailable_reason()
    assert "not on PATH" in reason and "no adb server answers" in reason
    (only,) = AdbTransport().discover([{"serial": "X"}], timeout_s=5)
    assert not only.reachable and only.error == reason


def test_edgerep_adb_chooses_the_command_line(server, monkeypatch):
    monkeypatch.setenv("EDGEREP_ADB", "/nonexistent/adb")
    assert adb_server() is None  # the explicit executable wins over a running server
    with pytest.raises(AdbError, match="cannot run"):
        _adb(["devices", "-l"])


TWO_PHONES = """List of devices attached
R58M1234ABC            device usb:1-1 model:SM_G973F transport_id:2
RF8N90XYZ              device usb:1-2 model:SM_S911B transport_id:4

"""


def test_a_multi_device_bench_probes_the_server_once(tmp_path, monkeypatch, capsys):
    """Two phones, two runs each: every adb call (getprop, pushes, runs, clean-up) goes to
    the server, and the server is looked for once; a discovery looks again."""
    import json

    from edgerep.cli import EXIT_OK, main

    empty = tmp_path / "no-adb-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("EDGEREP_ADB", raising=False)
    monkeypatch.delenv("ANDROID_ADB_SERVER_HOST", raising=False)
    monkeypatch.setenv("EDGEREP_DEVICES", str(tmp_path / "no-devices.toml"))
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    runner = tmp_path / "onnxruntime_perf_test"
    runner.write_bytes(b"\x7fELF fake runner")
    runs: list[str] = []
    with FakeAdbServer(TWO_PHONES, canned_shell(canned_answers(), runs)) as fake:
        monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(fake.port))
        argv = ["bench", str(bundle), "--device", "adb:R58M1234ABC", "--device", "adb:RF8N90XYZ"]
        argv += ["--runner", str(runner), "--cooldown", "0", "--json", "--no-progress"]
        argv += ["--min-iters", "3", "--seconds", "0", "--warmup", "1", "--repeats", "2"]
        assert main(argv) == EXIT_OK
        report = json.loads(capsys.readouterr().out)
        assert sorted(r["target"] for r in report["rows"]) == ["adb:R58M1234ABC", "adb:RF8N90XYZ"]
        device_calls = [s for s in fake.services if ":shell:" in s or s.endswith(":sync:")]
        assert len(runs) == 4 and len(device_calls) > 20  # many adb calls ...
        assert fake.bare_connections == 1  # ... one probe
        # a discovery decides again (once), and the bench after it reuses that answer
        AdbTransport().discover([], timeout_s=5)
        assert fake.bare_connections == 2
        _adb(["shell", "getprop"], serial="RF8N90XYZ")
        assert fake.bare_connections == 2
        # a failed call through the server drops the decision: the next call looks again
        with pytest.raises(AdbError, match="not found"):
            _adb(["shell", "getprop"], serial="GONE")
        _adb(["shell", "getprop"], serial="RF8N90XYZ")
        assert fake.bare_connections == 3
