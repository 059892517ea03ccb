"""Devices: discovery and benchmarking on this machine, remote agents and adb devices.

One module per transport (`local`, `agent`, `adb`) behind the `Transport` registry;
`fleet` resolves ``--device`` values, probes devices and merges one report across
them; the agent's service lives in `_server` (``edgerep agent serve``). Transports
and their dependencies load on first use.
"""

from __future__ import annotations

from edgerep.devices._base import (
    BenchRequest,
    Device,
    Transport,
    available_transports,
    get_transport,
    register_transport,
)
from edgerep.devices.local import describe_local

__all__ = [
    "BenchRequest",
    "Device",
    "Transport",
    "available_transports",
    "describe_local",
    "get_transport",
    "register_transport",
]
