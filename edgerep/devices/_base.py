"""What a device is, and the transports that reach one, found by name.

A `Device` is a plain description (kind, name, address, what it is, what it can
run) plus whether it answered. A *transport* (``local``, ``agent``, ``adb``) knows
how to find its devices and how to run ``edgerep bench`` on one; transports are
registered by name like runtimes and exporters, and imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from edgerep.errors import ConfigError, did_you_mean

__all__ = [
    "BenchRequest",
    "Device",
    "Transport",
    "available_transports",
    "get_transport",
    "register_transport",
]


@dataclass(frozen=True)
class Device:
    """One benchmark target and how to reach it.

    Attributes:
        transport: the transport's registry name (``local``, ``agent``, ``adb``).
        name: what the user calls it (``local``, a devices.toml name, ``adb:SERIAL``).
        address: how the transport reaches it (agent URL, adb serial; "" for local).
        description: what it is (CPU, ISA flags, accelerators, SoC, OS ...).
        reachable: it answered the probe.
        error: why it did not (``""`` when reachable).
        options: transport settings (token file, CA file, runner path ...); never
            the token itself.
    """

    transport: str
    name: str
    address: str = ""
    description: Mapping[str, Any] = field(default_factory=dict)
    reachable: bool = True
    error: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        out = asdict(self)
        out["description"] = dict(self.description)
        out["options"] = dict(self.options)
        return out


@dataclass(frozen=True)
class BenchRequest:
    """What to run on a device: one bundle and the `edgerep.bench.suite.run_bench` settings.

    ``settings`` holds only plain JSON values (runtimes, metrics, latency config,
    threads, runtime device, roofline, seed, concurrency, precision), so the same
    request can travel to an agent and be checked there against `SETTINGS_KEYS`.
    """

    bundle: str
    variant: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    data: str | None = None


#: the run_bench keyword arguments a request may carry (and an agent accepts)
SETTINGS_KEYS = (
    "runtimes",
    "metrics",
    "latency",
    "threads",
    "device",
    "roofline",
    "seed",
    "concurrency",
    "precision",
)


class Transport(Protocol):
    """How devices of one kind are found and benchmarked."""

    name: str

    def discover(
        self, specs: Sequence[Mapping[str, Any]], *, timeout_s: float
    ) -> list[Device]:  # pragma: no cover - protocol
        """The devices this transport reaches: those it finds itself plus `specs`
        (entries of devices.toml or ``--device`` for this transport), each probed
        with at most `timeout_s` per probe. Unreachable ones are returned with their
        error, never raised."""
        ...

    def bench(
        self, device: Device, request: BenchRequest, *, timeout_s: float
    ) -> dict[str, Any]:  # pragma: no cover - protocol
        """Run `request` on `device`; returns an ``edgerep bench`` report whose
        ``environment`` is the device's own fingerprint.

        Raises:
            EdgerepError: the device cannot be reached or refused the job.
        """
        ...


_BUILTIN: dict[str, str] = {
    "local": "edgerep.devices.local:LocalTransport",
    "agent": "edgerep.devices.agent:AgentTransport",
    "adb": "edgerep.devices.adb:AdbTransport",
}
_REGISTRY: dict[str, Transport] = {}


def register_transport(transport: Transport, *, replace: bool = False) -> None:
    """Register `transport` under its ``name``.

    Raises:
        ConfigError: the name is taken and `replace` is False.
    """
    if not replace and (transport.name in _REGISTRY or transport.name in _BUILTIN):
        raise ConfigError(
            f"a device transport named {transport.name!r} is already registered; pass "
            "replace=True to replace it, or choose another name"
        )
    _REGISTRY[transport.name] = transport


def get_transport(name: str) -> Transport:
    """The transport registered as `name`.

    Raises:
        ConfigError: no such transport.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        module_name, _, attr = _BUILTIN[name].partition(":")
        transport: Transport = getattr(importlib.import_module(module_name), attr)()
        _REGISTRY[name] = transport
        return transport
    names = available_transports()
    raise ConfigError(
        f"unknown device transport {name!r};{did_you_mean(name, names)} available: "
        f"{', '.join(names)}"
    )


def available_transports() -> list[str]:
    """Names of the registered and built-in transports, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))
