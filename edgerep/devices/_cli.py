"""The device verbs of the ``edgerep`` command: ``devices``, ``agent serve``, and
``bench --device`` across devices. `edgerep.cli` only calls `add_commands`,
`add_bench_device_args` and `bench_devices`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from edgerep.errors import ConfigError

__all__ = [
    "add_bench_device_args",
    "add_commands",
    "bench_devices",
    "check_device_flags",
    "split_device_args",
]

#: what a runtime device string starts with (OpenVINO's AUTO/HETERO/MULTI included)
_RUNTIME_DEVICE_KINDS = {
    "cpu",
    "gpu",
    "cuda",
    "npu",
    "mps",
    "auto",
    "hetero",
    "multi",
    "dla",
    "ane",
    # onnxruntime provider devices
    "tensorrt",
    "rocm",
    "coreml",
    "openvino",
    "directml",
    "qnn",
    "xnnpack",
}
_TARGET_PREFIXES = ("agent://", "agents://", "http://", "https://", "adb:")
DEFAULT_DEVICE_TIMEOUT_S = 600.0
MAX_PROBE_TIMEOUT_S = 60.0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``devices`` and ``agent`` to the ``edgerep`` subparsers."""
    p = sub.add_parser(
        "devices",
        parents=[common],
        help="list local CPU/accelerators, adb devices and remote agents",
        description="List every benchmark target: this machine (CPU, ISA flags, governor, what "
        "each runtime can run on), adb-attached Android devices, and the agents of "
        "~/.config/edgerep/devices.toml or --device URL, each probed with a short timeout.",
    )
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="URL|adb:SERIAL",
        help="also probe this agent URL or adb serial",
    )
    p.add_argument(
        "--devices-file",
        metavar="TOML",
        help="devices file (default ~/.config/edgerep/devices.toml)",
    )
    p.add_argument("--token-file", metavar="FILE", help="token for agents without token_file")
    p.add_argument(
        "--timeout", type=float, default=2.0, metavar="S", help="probe timeout (default 2)"
    )
    p.add_argument("--json", action="store_true", help="print the devices as JSON")
    p.set_defaults(handler=_cmd_devices)

    agent = sub.add_parser("agent", parents=[common], help="run the benchmark agent on this device")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    p = agent_sub.add_parser(
        "serve",
        parents=[common],
        help="serve benchmark jobs (token-authenticated; loopback unless --host)",
        description="Accept bundle uploads from `edgerep bench --device`, check them against their "
        "manifest, and benchmark them here with the runtimes installed (never torch). Binds "
        "127.0.0.1 unless --host; use --tls-cert/--tls-key or an SSH tunnel off loopback.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    p.add_argument(
        "--token-file", required=True, metavar="F", help="file holding the bearer token (mode 600)"
    )
    p.add_argument("--tls-cert", metavar="C", help="TLS certificate (PEM)")
    p.add_argument("--tls-key", metavar="K", help="TLS private key (PEM)")
    p.add_argument(
        "--workdir", default="~/.cache/edgerep/agent", metavar="D", help="job directories go here"
    )
    p.add_argument(
        "--max-upload-mib",
        type=float,
        default=512,
        metavar="MIB",
        help="largest upload (default 512)",
    )
    p.add_argument(
        "--job-timeout", type=float, default=600, metavar="S", help="per-job limit (default 600 s)"
    )
    p.add_argument(
        "--max-queue", type=int, default=4, metavar="N", help="jobs queued or running (default 4)"
    )
    p.add_argument(
        "--runtime",
        action="append",
        default=[],
        metavar="NAME",
        help="runtimes jobs may use (default: onnxruntime, openvino, executorch, tensorrt, coreml)",
    )
    p.add_argument(
        "--bundle-key-file",
        metavar="KEY",
        help="run only bundles signed with this key (edgerep sign --key-file KEY)",
    )
    p.add_argument(
        "--max-failed-logins",
        type=int,
        default=10,
        metavar="N",
        help="wrong or missing tokens from one address before it gets 429 (default 10)",
    )
    p.add_argument(
        "--failed-login-window",
        type=float,
        default=60.0,
        metavar="S",
        help="the sliding window those failures are counted in (default 60 s)",
    )
    p.add_argument("--max-requests", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--max-seconds", type=float, metavar="S", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_agent_serve)


def add_bench_device_args(p: argparse.ArgumentParser) -> None:
    """``bench``'s device options (``--device`` itself is declared by the caller)."""
    from edgerep.devices.config import PIN_CHOICES

    p.add_argument(
        "--token-file", metavar="FILE", help="agents: token file (else $EDGEREP_AGENT_TOKEN)"
    )
    p.add_argument(
        "--devices-file",
        metavar="TOML",
        help="devices file (default ~/.config/edgerep/devices.toml)",
    )
    p.add_argument(
        "--device-timeout",
        type=float,
        metavar="S",
        help=f"agent and adb devices: per job limit (default {DEFAULT_DEVICE_TIMEOUT_S:g} s)",
    )
    p.add_argument("--runner", metavar="PATH", help="adb devices: the Android runner binary")
    p.add_argument(
        "--pin",
        metavar="big|MASK",
        help="adb devices: run under taskset, pinned to " + PIN_CHOICES,
    )
    p.add_argument(
        "--cooldown", type=float, metavar="S", help="adb devices: pause between runs (default 2)"
    )


#: ``bench`` flags only some transports use: (flag, args attribute, the transports)
_TRANSPORT_FLAGS = (
    ("--runner", "runner", ("adb",)),
    ("--pin", "pin", ("adb",)),
    ("--cooldown", "cooldown", ("adb",)),
    ("--token-file", "token_file", ("agent",)),
    ("--device-timeout", "device_timeout", ("agent", "adb")),
)
_TRANSPORT_WORDS = {
    "adb": "adb devices (--device adb:SERIAL, an adb entry of devices.toml, or all while "
    "adb lists a device)",
    "agent": "agents (--device agent://HOST:PORT, https://HOST:PORT or an agent entry of "
    "devices.toml)",
}


def check_device_flags(args: argparse.Namespace, transports: Sequence[str]) -> None:
    """Refuse the device flags of ``bench`` that none of the targets would use.

    Args:
        args: the parsed ``bench`` arguments.
        transports: the transports of the resolved targets (empty: no ``--device``
            target, the local harness runs in this process).

    Raises:
        ConfigError: every flag given that applies to none of `transports` (named, with
            the devices it applies to), instead of ignoring it silently.
    """
    present = set(transports)
    unused: dict[tuple[str, ...], list[str]] = {}
    for flag, attr, applies in _TRANSPORT_FLAGS:
        if getattr(args, attr, None) is not None and not present & set(applies):
            unused.setdefault(applies, []).append(flag)
    problems = [
        f"{' and '.join(flags)} appl{'y' if len(flags) > 1 else 'ies'} only to "
        + " and ".join(_TRANSPORT_WORDS[t] for t in applies)
        for applies, flags in unused.items()
    ]
    if not transports and getattr(args, "devices_file", None) is not None:
        problems.append("--devices-file names devices for --device NAME")
    if problems:
        here = (
            f"the targets here are {', '.join(sorted(present))} devices"
            if present
            else "no --device target here (the bench runs on this machine, in this process)"
        )
        raise ConfigError("; ".join(problems) + f"; {here}: drop the flag or add such a --device")


def adb_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--runner``, ``--pin`` and ``--cooldown`` as adb device options (over devices.toml's).

    Raises:
        ConfigError: a pin or cool-down `edgerep.devices.config.check_pin` /
            `check_cooldown` refuse (the same messages as for devices.toml).
    """
    from edgerep.devices.config import check_cooldown, check_pin

    out: dict[str, Any] = {}
    if getattr(args, "runner", None) is not None:
        out["runner"] = args.runner
    if getattr(args, "pin", None) is not None:
        out["pin"] = check_pin(args.pin, "--pin")
    if getattr(args, "cooldown", None) is not None:
        out["cooldown_s"] = check_cooldown(args.cooldown, "--cooldown")
    return out


def split_device_args(
    values: Sequence[str], devices_file: str | None = None
) -> tuple[str, list[str]]:
    """``--device`` values → (runtime device, device targets).

    A value is a *target* when it is ``local``, ``all``, an agent URL, ``adb:SERIAL``
    or a name in the devices file; anything else (``cpu``, ``cuda:0``, ``gpu``) is
    the runtime device, as before devices existed (one at most; default cpu).

    Raises:
        ConfigError: two runtime devices.
    """
    from edgerep.devices.config import load_devices_config

    names: set[str] = set()
    if any(v not in ("local", "all") and not v.startswith(_TARGET_PREFIXES) for v in values):
        names = set(load_devices_config(devices_file))
    targets = [
        v for v in values if v in ("local", "all") or v.startswith(_TARGET_PREFIXES) or v in names
    ]
    runtime_devices = [v for v in values if v not in targets]
    for v in runtime_devices:
        head = re.split(r"[:.,]", v, maxsplit=1)[0].lower()
        if head not in _RUNTIME_DEVICE_KINDS:
            from edgerep.errors import did_you_mean

            raise ConfigError(
                f"unknown device {v!r};{did_you_mean(v, ['local', 'all', *names])} give a runtime "
                "device (cpu, cuda:0, gpu, npu) or a target: local, all, agent://HOST:PORT, "
                "adb:SERIAL or a name from the devices file"
            )
    if len(runtime_devices) > 1:
        raise ConfigError(
            f"--device got several runtime devices {runtime_devices}; give one (cpu, cuda:0, gpu) "
            "plus any number of targets (local, all, agent://HOST:PORT, adb:SERIAL, a name)"
        )
    return (runtime_devices[0] if runtime_devices else "cpu"), targets


def bench_devices(
    args: argparse.Namespace, targets: Sequence[str], settings: dict[str, Any]
) -> dict[str, Any]:
    """Run ``edgerep bench`` on the device `targets` and merge one report."""
    from edgerep.bench.suite import parse_target
    from edgerep.devices._base import BenchRequest, Device
    from edgerep.devices.fleet import bench_on_devices, resolve_devices

    bundles = [parse_target(t) for t in [*args.targets, *args.compare]]
    sources = [b.path for b in bundles if not b.is_bundle]
    if sources:
        raise ConfigError(
            f"--device runs bundles only; {sources} are model sources: make a bundle with "
            "`edgerep convert` first"
        )
    overrides = adb_overrides(args)  # bad values first: they need no device
    timeout_s = _device_timeout(args)
    devices = resolve_devices(targets, config_file=args.devices_file, token_file=args.token_file)
    check_device_flags(args, [d.transport for d in devices])

    def options(d: Device) -> dict[str, Any]:
        """The flags over devices.toml: --runner/--pin/--cooldown (adb), --device-timeout."""
        out = {**d.options, **(overrides if d.transport == "adb" else {})}
        if timeout_s is not None and d.transport in ("adb", "agent"):
            out["timeout_s"] = timeout_s
        return out

    devices = [
        Device(d.transport, d.name, d.address, d.description, d.reachable, d.error, options(d))
        for d in devices
    ]
    requests = [BenchRequest(b.path, b.name, settings, args.data) for b in bundles]
    return bench_on_devices(devices, requests, timeout_s=DEFAULT_DEVICE_TIMEOUT_S)


def _device_timeout(args: argparse.Namespace) -> float | None:
    """``--device-timeout`` checked, or None when not given."""
    from edgerep.devices.config import check_device_timeout

    value = getattr(args, "device_timeout", None)
    return None if value is None else check_device_timeout(value, "--device-timeout")


def _cmd_devices(args: argparse.Namespace) -> int:
    from edgerep.devices.fleet import discover_devices

    if not 0 < args.timeout <= MAX_PROBE_TIMEOUT_S:  # NaN fails too
        raise ConfigError(
            f"--timeout {args.timeout:g}: give seconds above 0 and at most "
            f"{MAX_PROBE_TIMEOUT_S:g} (each device is probed with it; default 2)"
        )
    devices = discover_devices(
        args.device,
        config_file=args.devices_file,
        token_file=args.token_file,
        timeout_s=args.timeout,
    )
    if args.json:
        print(json.dumps([d.to_dict() for d in devices], indent=2, default=str))
        return 0
    for d in devices:
        where = f" {d.address}" if d.address else ""
        if not d.reachable:
            print(f"{d.name:<20} {d.transport:<6}{where}  UNREACHABLE: {d.error}")
            continue
        print(f"{d.name:<20} {d.transport:<6}{where}  {_summary(d.description)}")
    return 0


def _summary(desc: Mapping[str, Any]) -> str:
    if desc.get("kind") == "android":
        return (
            f"{desc.get('manufacturer') or ''} {desc.get('model') or '?'}, SoC {desc.get('soc') or '?'}, "
            f"{desc.get('abi') or '?'}, Android {desc.get('android') or '?'}, thermal status "
            f"{desc.get('thermal_status')}, battery {desc.get('battery_temp_c')} C"
        )
    flags = [
        f
        for f in desc.get("isa_flags") or []
        if f.startswith(("avx512", "amx", "avx_vnni", "asimd", "neon", "sve", "i8mm"))
    ]
    parts = [
        f"{desc.get('cpu') or '?'} ({desc.get('isa') or '?'}, {desc.get('cores_physical') or '?'} cores / "
        f"{desc.get('cores_logical') or '?'} threads)",
        "ISA " + (" ".join(sorted(flags)[:8]) or "-"),
    ]
    if desc.get("governor"):
        parts.append("governor " + ",".join(desc["governor"]))
    acc = desc.get("accelerators") or {}
    for gpu in acc.get("nvidia") or []:
        parts.append(f"GPU {gpu['name']} ({gpu['memory']})")
    for rt, devs in (acc.get("runtimes") or desc.get("agent_runtimes_devices") or {}).items():
        parts.append(f"{rt}: {','.join(devs) if isinstance(devs, list) else devs}")
    if desc.get("agent_runtimes"):
        parts.append("agent runs " + ",".join(desc["agent_runtimes"]))
    return "; ".join(parts)


def _cmd_agent_serve(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from edgerep.bundle import read_key_file
    from edgerep.devices._server import AGENT_RUNTIMES, AgentConfig, make_server, read_token

    runtimes = tuple(r.strip() for item in args.runtime for r in item.split(",") if r.strip())
    if args.runtime and not runtimes:  # `--runtime ""` must not mean "every runtime"
        raise ConfigError(
            f"--runtime {args.runtime[0]!r} names no runtime; give some of "
            f"{', '.join(AGENT_RUNTIMES)}, or leave --runtime out for all of them"
        )
    if not 0 < args.max_upload_mib < math.inf:  # NaN fails too
        raise ConfigError(
            f"--max-upload-mib {args.max_upload_mib:g}: give a size in MiB above 0 (default 512)"
        )
    config = AgentConfig(
        token=read_token(args.token_file),
        workdir=Path(args.workdir).expanduser(),
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_upload_bytes=int(args.max_upload_mib * 1024 * 1024),
        job_timeout_s=args.job_timeout,
        max_queue=args.max_queue,
        runtimes=runtimes or AGENT_RUNTIMES,
        bundle_key=read_key_file(args.bundle_key_file) if args.bundle_key_file else None,
        max_failed_logins=args.max_failed_logins,
        failed_login_window_s=args.failed_login_window,
    )
    logging.getLogger("edgerep").setLevel(min(logging.getLogger("edgerep").level, logging.INFO))
    try:
        server = make_server(config)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e}") from e
    print(
        f"edgerep agent: serving {server.url} (workdir {server.workdir})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve(max_requests=args.max_requests, max_seconds=args.max_seconds)
    finally:
        server.close()
    return 0
