"""Many devices at once: resolve ``--device`` values, discover, benchmark, merge one report.

Devices run concurrently, each device's jobs one after another. Every device
runs the same harness (`edgerep.devices.local.run_request`: locally, in an agent's
job process, or its adb equivalent) and returns an ``edgerep bench`` report with
its own environment; `merge_reports` puts their rows in one report, each row
tagged with its device name (``target``) and the device's fingerprint id, and
keeps every device's full environment under ``devices``. A device that fails is
an error row for that device; the others are still reported.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgerep.devices._base import BenchRequest, Device, get_transport
from edgerep.devices.config import load_devices_config, parse_device_spec
from edgerep.errors import ConfigError, EdgerepError

__all__ = [
    "bench_on_devices",
    "discover_devices",
    "fingerprint_id",
    "merge_reports",
    "resolve_devices",
]

logger = logging.getLogger(__name__)

#: environment keys that identify a machine and its software (not its load or git state)
_IDENTITY_KEYS = (
    "name",
    "cpu",
    "isa",
    "cores_logical",
    "cores_physical",
    "memory_bytes",
    "gpus",
    "os",
    "python",
    "packages",
    "isa_flags",
    "nvidia",
    "threads",
)


def fingerprint_id(environment: Mapping[str, Any]) -> str:
    """12 hex digits identifying a machine and its software from its environment."""
    identity = {k: environment.get(k) for k in _IDENTITY_KEYS}
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _specs(
    texts: Sequence[str], config: Mapping[str, Mapping[str, Any]], token_file: str | None
) -> list[tuple[str, dict[str, Any]]]:
    pairs: list[tuple[str, dict[str, Any]]] = []
    for text in texts:
        pairs += parse_device_spec(text, config)
    for transport, spec in pairs:
        if transport == "agent" and token_file and not spec.get("token_file"):
            spec["token_file"] = token_file
    return pairs


def resolve_devices(
    texts: Sequence[str],
    *,
    config_file: str | None = None,
    token_file: str | None = None,
    timeout_s: float = 2.0,
) -> list[Device]:
    """The devices ``--device`` values name (``all`` expands to every one known), unprobed
    except where listing them needs a probe (``all``'s adb devices, local).

    Raises:
        ConfigError: an unknown name or bad URL, before anything runs.
    """
    config = load_devices_config(config_file)
    out: list[Device] = []
    seen: set[str] = set()
    for transport_name, spec in _specs(texts, config, token_file):
        transport: Any = get_transport(transport_name)
        if spec.get("all"):
            found = transport.discover([], timeout_s=timeout_s)
        elif transport_name == "local":
            found = transport.discover([spec], timeout_s=timeout_s)
        else:
            found = [transport.device(spec)]
        for d in found:
            if d.name not in seen:
                seen.add(d.name)
                out.append(d)
    if not out:
        raise ConfigError("no device to run on: --device names none (is adb showing any?)")
    return out


def discover_devices(
    texts: Sequence[str] = (),
    *,
    config_file: str | None = None,
    token_file: str | None = None,
    timeout_s: float = 2.0,
) -> list[Device]:
    """Every device: local, adb-attached, the agents of the devices file and `texts`
    (``--device`` values), probed concurrently with at most `timeout_s` each.

    Raises:
        ConfigError: an unknown ``--device`` value, a bad devices file, or `token_file`
            with no agent to use it.
    """
    config = load_devices_config(config_file)
    specs: dict[str, list[dict[str, Any]]] = {"local": [{"name": "local"}], "adb": [], "agent": []}
    for name, entry in config.items():
        transport, spec = parse_device_spec(name, {name: entry})[0]
        specs[transport].append(spec)
    listed = {spec["name"] for group in specs.values() for spec in group}
    # devices-file names are accepted (and listed once); local and all add nothing: every
    # device is listed anyway
    for transport, spec in _specs(texts, config, token_file) if texts else []:
        if transport in ("agent", "adb") and spec["name"] not in listed and not spec.get("all"):
            listed.add(spec["name"])
            specs[transport].append(spec)
    if token_file:
        if not specs["agent"]:
            raise ConfigError(
                "--token-file is for agents, and none is configured or named: add an agent "
                "with --device agent://HOST:PORT (or url = ... in the devices file) or drop it"
            )
        for spec in specs["agent"]:
            spec.setdefault("token_file", token_file)

    def run(name: str) -> list[Device]:
        try:
            return get_transport(name).discover(specs[name], timeout_s=timeout_s)
        except EdgerepError as e:
            return [Device(name, name, "", {}, False, str(e))]

    with ThreadPoolExecutor(max_workers=3) as pool:
        found = list(pool.map(run, ["local", "adb", "agent"]))
    return [d for group in found for d in group]


def _run_device(
    device: Device, requests: Sequence[BenchRequest], timeout_s: float
) -> list[dict[str, Any] | EdgerepError]:
    transport = get_transport(device.transport)
    timeout_s = float(device.options.get("timeout_s", timeout_s))  # devices.toml / flag
    results: list[dict[str, Any] | EdgerepError] = []
    for request in requests:
        try:
            results.append(transport.bench(device, request, timeout_s=timeout_s))
        except EdgerepError as e:
            logger.warning("device %s: %s", device.name, e)
            results.append(e)
    return results


def bench_on_devices(
    devices: Sequence[Device], requests: Sequence[BenchRequest], *, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Run every request on every device (devices concurrently) and merge the reports.

    Each job may take the device's own ``timeout_s`` option (devices.toml, or
    ``--device-timeout``), else `timeout_s`.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        futures = [pool.submit(_run_device, d, requests, timeout_s) for d in devices]
        results = [f.result() for f in futures]
    pairs = [
        (device, request, result)
        for device, device_results in zip(devices, results)
        for request, result in zip(requests, device_results)
    ]
    return merge_reports(pairs)


def merge_reports(
    results: Sequence[tuple[Device, BenchRequest, dict[str, Any] | Exception]],
) -> dict[str, Any]:
    """One ``edgerep bench`` report from per-(device, request) reports or errors.

    Rows keep their statistics untouched and gain ``target`` (the device name) and
    ``fingerprint`` (`fingerprint_id` of that device's environment); ``devices``
    lists each device with its full environment.
    """
    from edgerep.bench.env import environment_fingerprint
    from edgerep.bench.report import REPORT_SCHEMA_VERSION

    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    devices: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] = {}
    quantization: list[dict[str, Any]] = []
    for device, request, result in results:
        entry = devices.setdefault(
            device.name,
            {
                "name": device.name,
                "transport": device.transport,
                "address": device.address,
                "fingerprint": None,
                "environment": None,
                "reference_rows": [],
                "errors": [],
            },
        )
        if isinstance(result, Exception):
            entry["errors"].append(str(result))
            errors.append(
                {
                    "variant": request.variant,
                    "runtime": "-",
                    "device": device.name,
                    "error": f"device {device.name}: {result}",
                }
            )
            continue
        env = result.get("environment") or {}
        fid = fingerprint_id(env)
        entry["fingerprint"], entry["environment"] = fid, env
        entry["reference_rows"].append(result.get("settings", {}).get("reference_row"))
        settings = settings or dict(result.get("settings", {}))
        for row in result.get("rows", []):
            rows.append({**row, "target": device.name, "fingerprint": fid})
        for err in result.get("errors", []):
            errors.append({**err, "device": device.name})
        quantization += [q for q in result.get("quantization", []) if q not in quantization]
    settings.pop("reference_row", None)
    settings["devices"] = list(devices)
    settings["reference"] = "per device and bundle: the first row each device measured"
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "edgerep-bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_fingerprint(),
        "settings": settings,
        "devices": list(devices.values()),
        "rows": rows,
        "errors": errors,
        "quantization": quantization,
    }
