"""Named devices (``~/.config/edgerep/devices.toml``) and ``--device`` specs.

The file maps names to how to reach each device::

    [devices.jetson]
    url = "https://jetson.lan:8765"        # agent; https:// or agents:// use TLS
    token_file = "~/.config/edgerep/jetson.token"
    ca_file = "~/.config/edgerep/jetson-ca.pem"   # optional: a self-signed TLS agent
    timeout_s = 1800                       # optional: per-job limit here (agent or adb;
                                           # default 600; bench --device-timeout overrides)

    [devices.pixel]
    adb = "R58M1234ABC"                    # adb serial
    runner_dir = "~/android-runners"       # optional: onnxruntime_perf_test, executor_runner
    pin = "big"                            # optional: taskset to the fast cores, or a hex mask
                                           # (see PIN_CHOICES)
    cooldown_s = 5                         # optional: pause between runs (default 2)

A ``--device`` spec is ``local``, ``all`` (every configured device plus local and
the attached adb devices), an agent URL (``agent://host:port``, ``agents://``,
``http://``, ``https://``), ``adb:SERIAL``, or a name from the file. The file holds
paths to tokens, never tokens: it is read, never evaluated.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgerep.errors import ConfigError, MissingDependencyError, did_you_mean

__all__ = [
    "DEFAULT_CONFIG",
    "PIN_CHOICES",
    "check_cooldown",
    "check_device_timeout",
    "check_pin",
    "config_path",
    "load_devices_config",
    "parse_device_spec",
]

DEFAULT_CONFIG = "~/.config/edgerep/devices.toml"
_URL_SCHEMES = ("agent://", "agents://", "http://", "https://")
_KEYS = {"url", "token_file", "ca_file", "adb", "runner_dir", "timeout_s", "pin", "cooldown_s"}
#: keys only an adb device takes, and only an agent
_ADB_KEYS = {"runner_dir", "pin", "cooldown_s"}
_AGENT_KEYS = {"token_file", "ca_file"}


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """`path`, else ``$EDGEREP_DEVICES``, else `DEFAULT_CONFIG`, with ``~`` expanded."""
    chosen = path or os.environ.get("EDGEREP_DEVICES") or DEFAULT_CONFIG
    return Path(chosen).expanduser()


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError as e:  # pragma: no cover - Python 3.10 only
        raise MissingDependencyError(
            "reading devices.toml on Python 3.10 needs tomli (pip install 'edgerep[agent]')"
        ) from e
    return tomli  # pragma: no cover


def load_devices_config(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """The ``[devices.NAME]`` tables of the devices file (empty when it does not exist).

    Raises:
        ConfigError: the file is not TOML, a table has unknown keys, or names neither
            ``url`` nor ``adb``.
    """
    p = config_path(path)
    if not p.is_file():
        if path is not None:
            raise ConfigError(f"devices file {str(p)!r} does not exist; create it or drop it")
        return {}
    toml = _toml()
    try:
        data = toml.loads(p.read_text(encoding="utf-8"))
    except (toml.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"devices file {str(p)!r} is not valid TOML: {e}") from e
    devices = data.get("devices", {})
    if not isinstance(devices, dict):
        raise ConfigError(f"{str(p)!r}: 'devices' must be a table of [devices.NAME] tables")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in devices.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{str(p)!r}: [devices.{name}] must be a table")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise ConfigError(
                f"{str(p)!r}: [devices.{name}] has unknown keys {unknown}; allowed: "
                f"{', '.join(sorted(_KEYS))}"
            )
        if ("url" in entry) == ("adb" in entry):
            raise ConfigError(
                f"{str(p)!r}: [devices.{name}] needs exactly one of url = 'agent://host:port' "
                "or adb = 'SERIAL'"
            )
        if "url" in entry and set(entry) & _ADB_KEYS:
            raise ConfigError(
                f"{str(p)!r}: [devices.{name}] is an agent; {sorted(set(entry) & _ADB_KEYS)} "
                "apply to adb devices only"
            )
        if name in ("local", "all"):
            raise ConfigError(f"{str(p)!r}: {name!r} is reserved; rename [devices.{name}]")
        if "adb" in entry and set(entry) & _AGENT_KEYS:
            raise ConfigError(
                f"{str(p)!r}: [devices.{name}] is an adb device; "
                f"{sorted(set(entry) & _AGENT_KEYS)} apply to agents only"
            )
        if "ca_file" in entry and not str(entry["url"]).startswith(("agents://", "https://")):
            raise ConfigError(
                f"{str(p)!r}: [devices.{name}] ca_file verifies a TLS agent, and url = "
                f"{entry['url']!r} is plaintext; use agents:// or https://, or drop ca_file"
            )
        out[name] = dict(entry)
        _check_adb_options(str(p), name, out[name])
        if entry.get("timeout_s") is not None:
            out[name]["timeout_s"] = check_device_timeout(
                entry["timeout_s"], f"{str(p)!r}: [devices.{name}] timeout_s ="
            )
    return out


#: what ``--pin`` / ``pin =`` take: the one text both entry points show
PIN_CHOICES = (
    "'big' (the cores whose maximum frequency, cpufreq/cpuinfo_max_freq, is above the "
    "slowest cluster's; every core when all are equal) or a nonzero taskset hex mask such as f0"
)
#: the longest pause between runs on a device
MAX_COOLDOWN_S = 600.0


def check_pin(value: object, label: str) -> str:
    """`value` as an adb ``pin``: ``"big"`` or a hex mask, returned as lowercase hex
    without ``0x`` (what both util-linux's and toybox's ``taskset`` read).

    Args:
        value: what the user gave (``--pin`` or devices.toml's ``pin``).
        label: how the error names where it came from, e.g. ``"--pin"``.

    Raises:
        ConfigError: anything else (the message ends with `PIN_CHOICES`).
    """
    if value == "big":
        return "big"
    if isinstance(value, str):
        m = re.fullmatch(r"(?:0[xX])?([0-9a-fA-F]+)", value)
        if m and int(m[1], 16):
            return format(int(m[1], 16), "x")
    raise ConfigError(f"{label} {value!r}: give {PIN_CHOICES}")


def check_cooldown(value: object, label: str) -> float:
    """`value` as an adb cool-down in seconds, 0 to `MAX_COOLDOWN_S`.

    Raises:
        ConfigError: not a number (booleans and strings included), NaN, or out of range.
    """
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not 0 <= value <= MAX_COOLDOWN_S:  # type: ignore[operator]
        shown = f"{value:g}" if number else repr(value)  # 5 and 5.0 read the same
        raise ConfigError(f"{label} {shown}: give seconds between 0 and {MAX_COOLDOWN_S:g}")
    return float(value)  # type: ignore[arg-type]


#: the longest per-job limit on a device (a day)
MAX_DEVICE_TIMEOUT_S = 86400.0


def check_device_timeout(value: object, label: str) -> float:
    """`value` as a device's per-job limit in seconds: above 0, at most a day.

    Raises:
        ConfigError: not a number, NaN, or out of range.
    """
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not 0 < value <= MAX_DEVICE_TIMEOUT_S:  # type: ignore[operator]
        shown = f"{value:g}" if number else repr(value)
        raise ConfigError(
            f"{label} {shown}: give seconds above 0 and at most {MAX_DEVICE_TIMEOUT_S:g} (a day)"
        )
    return float(value)  # type: ignore[arg-type]


def _check_adb_options(path: str, name: str, entry: dict[str, Any]) -> None:
    where = f"{path!r}: [devices.{name}]"
    if entry.get("pin") is not None:
        entry["pin"] = check_pin(entry["pin"], f"{where} pin =")
    if entry.get("cooldown_s") is not None:
        entry["cooldown_s"] = check_cooldown(entry["cooldown_s"], f"{where} cooldown_s =")


def _entry_spec(name: str, entry: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    spec = {"name": name, **entry}
    if "url" in entry:
        return "agent", spec
    spec["serial"] = spec.pop("adb")
    return "adb", spec


def parse_device_spec(
    text: str, config: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    """``(transport, spec)`` pairs for one ``--device`` value (``all`` gives several).

    Raises:
        ConfigError: an empty ``adb:`` serial, or a name the devices file lacks.
    """
    text = text.strip()
    if text == "local":
        return [("local", {"name": "local"})]
    if text == "all":
        pairs: list[tuple[str, dict[str, Any]]] = [
            ("local", {"name": "local"}),
            ("adb", {"name": "adb", "all": True}),
        ]
        return pairs + [_entry_spec(n, e) for n, e in config.items()]
    if text.startswith(_URL_SCHEMES):
        return [("agent", {"name": text, "url": text})]
    if text.startswith("adb:"):
        serial = text[4:]
        if not serial:
            raise ConfigError(
                "--device adb: needs a serial, e.g. adb:R58M1234ABC (see adb devices)"
            )
        return [("adb", {"name": text, "serial": serial})]
    if text in config:
        return [_entry_spec(text, config[text])]
    names = ["local", "all", *config]
    raise ConfigError(
        f"unknown device {text!r};{did_you_mean(text, names)} give local, all, "
        "agent://HOST:PORT, https://HOST:PORT, adb:SERIAL or a name from "
        f"{DEFAULT_CONFIG} (known: {', '.join(names)})"
    )
