"""Devices: local discovery (remote agents and adb transports live beside it)."""

from __future__ import annotations

from edgerep.devices.local import describe_local

__all__ = ["describe_local"]
