"""``edgerep devices``, ``edgerep agent serve`` and ``edgerep bench --device`` through main(argv)."""

from __future__ import annotations

import json
import os
import time

import pytest

from edgerep.cli import EXIT_OK, EXIT_UNSUPPORTED, EXIT_USAGE, main
from edgerep.devices._cli import split_device_args
from edgerep.devices.fleet import fingerprint_id
from edgerep.errors import ConfigError
from tests._tiny_bundle import make_bundle
from tests.devices._agent import TOKEN, running_agent

FAST = ["--min-iters", "5", "--seconds", "0", "--warmup", "1", "--repeats", "2", "--no-roofline"]


@pytest.fixture
def token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    os.chmod(f, 0o600)
    return f


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEREP_DEVICES", str(tmp_path / "no-devices.toml"))
    monkeypatch.delenv("EDGEREP_AGENT_TOKEN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent-no-adb" + os.pathsep + "/usr/bin:/bin")


def test_devices_json_answers_fast_with_unreachable_agents(tmp_path, token_file, capsys):
    toml = tmp_path / "devices.toml"
    toml.write_text(
        f'[devices.gone]\nurl = "agent://127.0.0.1:9"\ntoken_file = "{token_file}"\n'
        f'[devices.blackhole]\nurl = "agent://192.0.2.1:8765"\ntoken_file = "{token_file}"\n'
    )
    start = time.monotonic()
    code = main(
        [
            "devices",
            "--json",
            "--devices-file",
            str(toml),
            "--timeout",
            "1",
            "--device",
            "agent://127.0.0.1:10",
            "--token-file",
            str(token_file),
        ]
    )
    elapsed = time.monotonic() - start
    out = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK
    assert elapsed < 3.0
    by = {d["name"]: d for d in out}
    assert by["local"]["reachable"] and by["local"]["description"]["cores_logical"] >= 1
    assert "isa_flags" in by["local"]["description"]
    assert "onnxruntime" in by["local"]["description"]["accelerators"]["runtimes"]
    for name in ("gone", "blackhole", "agent://127.0.0.1:10"):
        assert not by[name]["reachable"] and "cannot be reached" in by[name]["error"]
    assert all("_token" not in d["options"] for d in out)


def test_devices_lists_a_live_agent(tmp_path, token_file, capsys):
    with running_agent(tmp_path / "work") as server:
        code = main(["devices", "--device", server.url, "--token-file", str(token_file)])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    line = next(x for x in out.splitlines() if x.startswith(server.url))
    assert "UNREACHABLE" not in line and "agent runs onnxruntime" in line


def test_devices_bad_config_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[devices.x]\nurl = 'agent://h:1'\nadb = 'S'\n")
    assert main(["devices", "--devices-file", str(bad)]) == EXIT_USAGE
    assert "exactly one of" in capsys.readouterr().err
    bad.write_text("not = [toml")
    assert main(["devices", "--devices-file", str(bad)]) == EXIT_USAGE


def test_bench_local_and_two_agents_one_report(tmp_path, token_file, capsys):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    out_dir = tmp_path / "out"
    with running_agent(tmp_path / "w1") as a1, running_agent(tmp_path / "w2") as a2:
        toml = tmp_path / "devices.toml"
        toml.write_text(
            f'[devices.board]\nurl = "{a1.url}"\ntoken_file = "{token_file}"\n'
            f'[devices.second]\nurl = "{a2.url}"\n'
            f'[devices.phone_gone]\nurl = "agent://127.0.0.1:9"\ntoken_file = "{token_file}"\n'
        )
        code = main(
            [
                "bench",
                str(bundle),
                "--runtime",
                "onnxruntime",
                "--threads",
                "1",
                "--devices-file",
                str(toml),
                "--token-file",
                str(token_file),
                "--device",
                "all",
                "--out",
                str(out_dir),
                *FAST,
            ]
        )
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    report = json.loads((out_dir / "bench.json").read_text())
    assert [r["target"] for r in report["rows"]] == ["local", "board", "second"]
    assert all(len(r["fingerprint"]) == 12 for r in report["rows"])
    devices = {d["name"]: d for d in report["devices"]}
    assert set(devices) == {"local", "board", "second", "phone_gone"}
    # three fingerprints, each that of the environment its own device reported (all three
    # run on this machine, so their values may coincide; the agents' come from their jobs)
    for row in report["rows"]:
        device = devices[row["target"]]
        assert row["fingerprint"] == device["fingerprint"]
        assert device["fingerprint"] == fingerprint_id(device["environment"])
    assert devices["board"]["transport"] == devices["second"]["transport"] == "agent"
    assert devices["local"]["transport"] == "local"
    assert all(devices[n]["environment"]["cores_logical"] >= 1 for n in ("local", "board"))
    assert devices["phone_gone"]["fingerprint"] is None
    (err,) = report["errors"]
    assert err["device"] == "phone_gone" and "cannot be reached" in err["error"]
    # the same statistics for every row, whatever ran it
    for row in report["rows"]:
        assert row["latency"]["stats"]["n"] == 10 and len(row["latency"]["p50_ci_ms"]) == 2
    md = (out_dir / "bench.md").read_text()
    assert "| device | fingerprint | variant |" in md and "| board |" in md
    assert "device phone_gone" in md and "not measured" in md
    assert "plot-latency" in (out_dir / "bench.html").read_text()


def test_bench_device_errors(tmp_path, token_file, capsys):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    assert main(["bench", str(bundle), "--device", "gpu", "--device", "cpu", *FAST]) == EXIT_USAGE
    assert "several runtime devices" in capsys.readouterr().err
    assert main(["bench", str(bundle), "--device", "nosuchname", *FAST]) == EXIT_USAGE
    assert "unknown device 'nosuchname'" in capsys.readouterr().err
    # every device unreachable: nothing measured
    code = main(
        [
            "bench",
            str(bundle),
            "--device",
            "agent://127.0.0.1:9",
            "--token-file",
            str(token_file),
            *FAST,
        ]
    )
    assert code == EXIT_UNSUPPORTED
    assert "cannot be reached" in capsys.readouterr().err
    # no token at all: a clear message for that device
    code = main(["bench", str(bundle), "--device", "agent://127.0.0.1:9", *FAST])
    assert code == EXIT_UNSUPPORTED
    assert "EDGEREP_AGENT_TOKEN" in capsys.readouterr().err
    assert main(["bench", "x.py:f", "--device", "local", *FAST]) == EXIT_USAGE


def test_split_device_args(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[devices.jetson]\nurl = "agents://j:8765"\n')
    assert split_device_args([]) == ("cpu", [])
    assert split_device_args(["cuda:0"]) == ("cuda:0", [])
    assert split_device_args(["gpu", "local", "adb:S1", "jetson"], str(toml)) == (
        "gpu",
        ["local", "adb:S1", "jetson"],
    )
    assert split_device_args(["HETERO:GPU,CPU"]) == ("HETERO:GPU,CPU", [])
    with pytest.raises(ConfigError):
        split_device_args(["cpu", "gpu"])
    with pytest.raises(ConfigError, match="did you mean 'jetson'"):
        split_device_args(["jetsn"], str(toml))


def test_agent_serve_command(tmp_path, token_file, capsys):
    code = main(
        [
            "agent",
            "serve",
            "--token-file",
            str(token_file),
            "--port",
            "0",
            "--workdir",
            str(tmp_path / "w"),
            "--max-seconds",
            "0.3",
        ]
    )
    assert code == EXIT_OK
    assert "serving http://127.0.0.1:" in capsys.readouterr().err
    os.chmod(token_file, 0o644)
    code = main(
        ["agent", "serve", "--token-file", str(token_file), "--port", "0", "--max-seconds", "0.3"]
    )
    assert code == EXIT_USAGE
    assert "chmod 600" in capsys.readouterr().err
    os.chmod(token_file, 0o600)
    code = main(
        [
            "agent",
            "serve",
            "--token-file",
            str(token_file),
            "--runtime",
            "torch",
            "--max-seconds",
            "0.3",
        ]
    )
    assert code == EXIT_USAGE


def test_agent_serve_subprocess_and_bench_through_it(tmp_path, token_file, capsys):
    """`edgerep agent serve` as its own process (ephemeral port, bounded), benchmarked via the CLI."""
    import subprocess
    import sys

    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgerep",
            "agent",
            "serve",
            "--token-file",
            str(token_file),
            "--port",
            "0",
            "--workdir",
            str(tmp_path / "w"),
            "--max-seconds",
            "60",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        line = proc.stderr.readline()
        assert "serving http://127.0.0.1:" in line, line
        url = line.split("serving ", 1)[1].split()[0]
        code = main(
            [
                "bench",
                str(bundle),
                "--device",
                url,
                "--token-file",
                str(token_file),
                "--json",
                "--no-progress",
                *FAST,
            ]
        )
        out = capsys.readouterr().out
        assert code == EXIT_OK
        report = json.loads(out)
        assert [r["target"] for r in report["rows"]] == [url]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()
