"""What this machine is: CPU, cores, memory, OS, Python and the relevant packages.

Reads /proc and importlib.metadata only: no package is imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "describe_local"]

#: packages whose versions a device description records
PACKAGES = (
    "edgerep",
    "numpy",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "coremltools",
    "tensorrt",
    "executorch",
)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo() -> tuple[str | None, int | None]:
    """CPU model name and physical core count from /proc/cpuinfo (Linux)."""
    text = _read("/proc/cpuinfo")
    model = None
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        # x86: 'model name'; many ARM kernels: 'Hardware', 'Model' or 'Processor'
        if model is None and key in ("model name", "Hardware", "Model", "Processor", "cpu model"):
            model = value or None
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            cores.add((physical, core))
    return model, (len(cores) or None)


def _memory_bytes() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _nvidia_gpus() -> list[str]:
    """GPU models the NVIDIA driver lists under /proc (no CUDA library is loaded)."""
    root = Path("/proc/driver/nvidia/gpus")
    names = []
    if root.is_dir():
        for info in sorted(root.glob("*/information")):
            for line in _read(str(info)).splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
    return names


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe_local() -> dict[str, Any]:
    """A plain, JSON-serializable description of this machine.

    Returns:
        ``kind`` ("local"), ``name`` (host name), ``cpu`` (model), ``isa``
        (machine architecture), ``cores_logical``, ``cores_physical``,
        ``memory_bytes``, ``gpus`` (NVIDIA models from the driver, if any), ``os``,
        ``python`` and ``packages`` (versions of the installed packages among
        `PACKAGES`). Unknown values are None.
    """
    model, physical = _cpuinfo()
    return {
        "kind": "local",
        "name": platform.node() or None,
        "cpu": model or platform.processor() or None,
        "isa": platform.machine() or None,
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "memory_bytes": _memory_bytes(),
        "gpus": _nvidia_gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": _versions(),
    }
