"""Device options of ``edgerep bench`` / ``devices`` / ``agent serve`` are used or refused,
never silently ignored; ``--pin``/``--cooldown`` and devices.toml share one check."""

from __future__ import annotations

import argparse
import math
import os

import pytest

from edgerep.cli import EXIT_USAGE, main
from edgerep.devices._cli import check_device_flags
from edgerep.devices.adb import AdbTransport
from edgerep.devices.config import PIN_CHOICES, check_cooldown, check_pin, load_devices_config
from edgerep.errors import ConfigError
from tests._tiny_bundle import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "tiny", openvino=False)


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEREP_DEVICES", str(tmp_path / "no-devices.toml"))
    monkeypatch.delenv("EDGEREP_AGENT_TOKEN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent-no-adb" + os.pathsep + "/usr/bin:/bin")


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("edgerep: error (ConfigError): "), err
    return err.strip().removeprefix("edgerep: error (ConfigError): ")


def _file_error(tmp_path, line: str) -> str:
    f = tmp_path / "devices.toml"
    f.write_text(f'[devices.phone]\nadb = "S"\n{line}\n')
    with pytest.raises(ConfigError) as e:
        load_devices_config(f)
    return str(e.value)


# --- one check for --pin/--cooldown and devices.toml -----------------------------------


@pytest.mark.parametrize("pin", ["fast", "0", "0x0", "0x", "f0g", "BIG", "big "])
def test_pin_flag_and_file_give_the_same_error(tmp_path, capsys, bundle, pin):
    flag = _cli_error(capsys, ["bench", str(bundle), "--device", "adb:S", "--pin", pin])
    in_file = _file_error(tmp_path, f'pin = "{pin}"')
    tail = f" {pin!r}: give {PIN_CHOICES}"
    assert flag == f"--pin{tail}"
    assert in_file.endswith(f"[devices.phone] pin ={tail}")
    # the library entry (a spec built in Python) says the same
    with pytest.raises(ConfigError) as lib:
        AdbTransport().device({"serial": "S", "pin": pin})
    assert str(lib.value) == f"device adb:S: pin{tail}"


@pytest.mark.parametrize(("flag", "toml"), [("-1", "-1"), ("600.5", "600.5"), ("nan", "nan")])
def test_cooldown_flag_and_file_give_the_same_error(tmp_path, capsys, bundle, flag, toml):
    cli = _cli_error(capsys, ["bench", str(bundle), "--device", "adb:S", "--cooldown", flag])
    in_file = _file_error(tmp_path, f"cooldown_s = {toml}")
    tail = f" {float(flag):g}: give seconds between 0 and 600"
    assert cli == f"--cooldown{tail}"
    assert in_file.endswith(f"[devices.phone] cooldown_s ={tail}")


def test_checks_accept_and_normalize():
    assert check_pin("big", "--pin") == "big"
    assert [check_pin(m, "--pin") for m in ("f0", "0xF0", "0XF0", "00f0")] == ["f0"] * 4
    assert check_cooldown(0, "x") == 0.0 and check_cooldown(600, "x") == 600.0
    for bad in (True, "5", math.inf, None):
        with pytest.raises(ConfigError, match="between 0 and 600"):
            check_cooldown(bad, "x")
    # what --help says --pin takes is the same text
    parser_help = _bench_help()
    assert "cpuinfo_max_freq" in parser_help and "slowest cluster" in parser_help


def _bench_help() -> str:
    from edgerep.devices._cli import add_bench_device_args

    p = argparse.ArgumentParser(prog="x")
    add_bench_device_args(p)
    return " ".join(p.format_help().split())


# --- flags with no target that uses them are refused ---------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--pin", "big"], "--pin applies only to adb devices"),
        (["--cooldown", "1"], "--cooldown applies only to adb devices"),
        (["--pin", "f0", "--cooldown", "1"], "--pin and --cooldown apply only to adb devices"),
        (["--runner", "/x/onnxruntime_perf_test"], "--runner applies only to adb devices"),
        (["--token-file", "/x/token"], "--token-file applies only to agents"),
        (["--device-timeout", "5"], "--device-timeout applies only to agents"),
        (["--devices-file", "/x/d.toml"], "--devices-file names devices for --device NAME"),
    ],
)
def test_device_flags_without_a_device_target_are_refused(capsys, bundle, extra, fragment):
    err = _cli_error(capsys, ["bench", str(bundle), *extra])
    assert fragment in err and "no --device target here" in err


def test_adb_flags_with_only_local_or_agent_targets_are_refused(capsys, bundle):
    err = _cli_error(capsys, ["bench", str(bundle), "--device", "local", "--pin", "big"])
    assert "--pin applies only to adb devices" in err and "targets here are local devices" in err
    err = _cli_error(
        capsys,
        ["bench", str(bundle), "--device", "agent://127.0.0.1:9", "--cooldown", "0"],
    )
    assert "--cooldown applies only to adb devices" in err and "agent devices" in err


def test_device_flags_pass_when_a_target_uses_them():
    args = argparse.Namespace(
        pin="big", cooldown=1.0, runner="r", token_file="t", device_timeout=5.0, devices_file="d"
    )
    check_device_flags(args, ["local", "adb", "agent"])  # every flag has its device
    with pytest.raises(ConfigError, match="--token-file applies only to agents") as e:
        check_device_flags(args, ["local", "adb"])
    assert "--pin" not in str(e.value) and "--device-timeout" not in str(e.value)
    unused = argparse.Namespace(
        pin=None,
        cooldown=None,
        runner=None,
        token_file=None,
        device_timeout=None,
        devices_file=None,
    )
    check_device_flags(unused, [])


@pytest.mark.parametrize("value", ["0", "-3", "nan", "86401"])
def test_device_timeout_is_checked(capsys, bundle, value):
    err = _cli_error(capsys, ["bench", str(bundle), "--device", "adb:S", "--device-timeout", value])
    assert err.startswith(f"--device-timeout {float(value):g}: give seconds above 0")


# --- edgerep agent serve: bad values are named before anything binds -------------------


@pytest.fixture
def token_file(tmp_path):
    from tests.devices._agent import TOKEN

    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    os.chmod(f, 0o600)
    return f


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--port", "70000"], "--port 70000: give 1 to 65535, or 0 for any free port"),
        (["--port", "-1"], "--port -1: give 1 to 65535"),
        (["--max-upload-mib", "nan"], "--max-upload-mib nan: give a size in MiB above 0"),
        (["--max-upload-mib", "inf"], "--max-upload-mib inf"),
        (["--max-upload-mib", "0"], "--max-upload-mib 0"),
        (["--job-timeout", "inf"], "must be positive and finite"),
        (["--job-timeout", "nan"], "must be positive and finite"),
        (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "cannot load"),
    ],
)
def test_agent_serve_refuses_bad_values(capsys, tmp_path, token_file, extra, fragment):
    argv = ["agent", "serve", "--token-file", str(token_file), "--workdir", str(tmp_path / "w")]
    err = _cli_error(capsys, [*argv, "--port", "0", "--max-seconds", "0.1", *extra])
    assert fragment in err
    assert "cannot listen" not in err  # not mistaken for a busy port


def test_agent_serve_names_a_bad_workdir(capsys, tmp_path, token_file):
    afile = tmp_path / "a-file"
    afile.write_text("")
    argv = ["agent", "serve", "--token-file", str(token_file), "--port", "0"]
    err = _cli_error(capsys, [*argv, "--max-seconds", "0.1", "--workdir", str(afile)])
    assert err.startswith(f"cannot use --workdir {str(afile)!r}") and "cannot listen" not in err


def test_agent_refuses_an_empty_host(tmp_path):
    """An empty --host would listen on every interface (checked without binding)."""
    from edgerep.devices._server import AgentConfig

    with pytest.raises(ConfigError, match="--host is empty"):
        AgentConfig(token=b"x" * 32, workdir=tmp_path, host="")


# --- edgerep devices ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "nan", "61"])
def test_devices_timeout_is_checked(capsys, value):
    err = _cli_error(capsys, ["devices", "--timeout", value])
    assert err.startswith(f"--timeout {float(value):g}: give seconds above 0 and at most 60")


def test_devices_takes_names_from_the_devices_file_and_needs_an_agent_for_a_token(
    tmp_path, capsys, token_file
):
    import json

    toml = tmp_path / "devices.toml"
    toml.write_text(f'[devices.gone]\nurl = "agent://127.0.0.1:9"\ntoken_file = "{token_file}"\n')
    argv = ["devices", "--json", "--devices-file", str(toml), "--timeout", "1"]
    assert main([*argv, "--device", "gone", "--device", "local", "--device", "all"]) == 0
    names = [d["name"] for d in json.loads(capsys.readouterr().out)]
    assert names.count("gone") == 1 and names.count("local") == 1
    toml.write_text('[devices.phone]\nadb = "S"\n')
    err = _cli_error(capsys, [*argv, "--token-file", str(token_file)])
    assert err.startswith("--token-file is for agents, and none is configured or named")


def test_agent_serve_refuses_an_empty_runtime_list(capsys, tmp_path, token_file):
    argv = ["agent", "serve", "--token-file", str(token_file), "--workdir", str(tmp_path / "w")]
    err = _cli_error(capsys, [*argv, "--port", "0", "--max-seconds", "0.1", "--runtime", ","])
    assert err.startswith("--runtime ',' names no runtime")


# --- devices.toml timeout_s and ca_file are used or refused ------------------------------


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ('adb = "S"\ntimeout_s = 0', "timeout_s = 0: give seconds above 0"),
        ('adb = "S"\ntimeout_s = "5"', "timeout_s = '5': give seconds above 0"),
        ('url = "agent://h:1"\ntimeout_s = 90000', "timeout_s = 90000: give"),
        ('url = "agent://h:1"\nca_file = "/ca.pem"', "ca_file verifies a TLS agent"),
        ('url = "http://h:1"\nca_file = "/ca.pem"', "is plaintext; use agents://"),
        ('adb = "S"\nca_file = "/ca.pem"', r"adb device; \['ca_file'\] apply to agents only"),
        ('adb = "S"\ntoken_file = "/t"', r"\['token_file'\] apply to agents only"),
    ],
)
def test_devices_file_timeout_and_ca_file_checked(tmp_path, entry, fragment):
    f = tmp_path / "devices.toml"
    f.write_text(f"[devices.d]\n{entry}\n")
    with pytest.raises(ConfigError, match=fragment):
        load_devices_config(f)


def test_device_timeout_from_the_file_and_the_flag_reach_the_jobs(tmp_path, monkeypatch, bundle):
    """devices.toml's timeout_s is each job's limit on that device; --device-timeout wins."""
    from edgerep.devices import fleet
    from edgerep.devices._base import Device

    toml = tmp_path / "devices.toml"
    toml.write_text(
        '[devices.phone]\nadb = "S"\ntimeout_s = 42\n'
        '[devices.board]\nurl = "agent://127.0.0.1:9"\ntimeout_s = 7\n'
    )
    seen: dict[str, float] = {}

    real = fleet.get_transport

    class Recorder:
        def __init__(self, name):
            self.device = real(name).device  # resolving is the real transport's

        def bench(self, device, request, *, timeout_s):
            seen[device.name] = timeout_s
            raise fleet.EdgerepError("recorded")

    monkeypatch.setattr(fleet, "get_transport", Recorder)
    argv = ["bench", str(bundle), "--device", "phone", "--device", "board", "--no-progress"]
    main([*argv, "--devices-file", str(toml)])
    assert seen == {"phone": 42.0, "board": 7.0}
    main([*argv, "--devices-file", str(toml), "--device-timeout", "30"])
    assert seen == {"phone": 30.0, "board": 30.0}
    # a device without its own limit gets the run's
    fleet._run_device(Device("adb", "x", "S"), [object()], 600.0)  # type: ignore[list-item]
    assert seen["x"] == 600.0
