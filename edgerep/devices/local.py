"""What this machine is: CPU, cores, memory, OS, Python and the relevant packages.

Reads /proc and importlib.metadata only: no package is imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "LocalTransport", "describe_local", "describe_local_device", "run_request"]

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


def _governors() -> list[str]:
    """The cpufreq governors in use (e.g. ``["performance"]``), where readable."""
    found = set()
    for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor"):
        value = _read(str(p)).strip()
        if value:
            found.add(value)
    return sorted(found)


def _accelerators() -> dict[str, Any]:
    """What each installed runtime can run on here (its ``devices()``), and the NVIDIA GPUs.

    torch is consulted only when it is already imported (importing it takes seconds);
    CUDA GPUs come from ``nvidia-smi`` otherwise.
    """
    import sys

    from edgerep.bench.env import _nvidia_smi
    from edgerep.runtimes import available_runtimes, get_runtime

    runtimes: dict[str, Any] = {}
    for name in available_runtimes():
        if name == "torch" and "torch" not in sys.modules:
            continue
        rt = get_runtime(name)
        why = rt.unavailable_reason()
        if why:
            continue
        try:
            runtimes[name] = rt.devices()
        except Exception as e:  # a broken driver must not hide the other runtimes
            runtimes[name] = {"error": f"{type(e).__name__}: {e}"}
    return {"runtimes": runtimes, "nvidia": _nvidia_smi()}


def describe_local_device(*, accelerators: bool = True) -> dict[str, Any]:
    """`describe_local` plus ISA flags, the cpufreq governor and (optionally) the
    devices each installed runtime sees (imports those runtimes)."""
    from edgerep.bench.env import isa_flags

    out = describe_local()
    out["isa_flags"] = isa_flags()
    out["governor"] = _governors()
    if accelerators:
        out["accelerators"] = _accelerators()
    return out


def _runnable(bundle: str, allowed: Sequence[str]) -> list[str]:
    """The runtimes among `allowed` that are installed here and have an artifact in `bundle`."""
    from edgerep.bundle import read_manifest
    from edgerep.runtimes import get_runtime

    formats = {a["format"] for a in read_manifest(bundle, verify_files=False)["artifacts"]}
    out = []
    for name in allowed:
        rt = get_runtime(name)
        if not rt.unavailable_reason() and formats & set(rt.formats):
            out.append(name)
    return out


def run_request(request: Any, *, allowed_runtimes: Sequence[str] | None = None) -> dict[str, Any]:
    """Run a `edgerep.devices.BenchRequest` here with `edgerep.bench.suite.run_bench`.

    The one place a request's settings become run_bench arguments: the local
    transport and the agent's job both call it, so both run the same harness code.

    Args:
        request: the bundle, variant name, settings and dataset.
        allowed_runtimes: when given, only these runtimes may run (an agent never
            runs torch); with no runtimes in the settings, those of them installed
            here that have an artifact in the bundle.

    Raises:
        ConfigError: a setting outside `SETTINGS_KEYS` or of the wrong type, or a
            runtime outside `allowed_runtimes`.
    """
    from edgerep.bench.latency import LatencyConfig
    from edgerep.bench.suite import BenchTarget, run_bench
    from edgerep.devices._base import SETTINGS_KEYS
    from edgerep.errors import ConfigError

    settings = dict(request.settings)
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise ConfigError(f"unknown bench settings {unknown}; allowed: {', '.join(SETTINGS_KEYS)}")
    kwargs: dict[str, Any] = {k: v for k, v in settings.items() if v is not None}
    if "latency" in kwargs:
        if not isinstance(kwargs["latency"], dict):
            raise ConfigError(f"latency settings must be an object; got {kwargs['latency']!r}")
        kwargs["config"] = LatencyConfig.from_dict(kwargs.pop("latency"))
    for key in ("runtimes", "metrics", "concurrency"):
        if key in kwargs:
            value = kwargs[key]
            if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
                raise ConfigError(f"bench setting {key!r} must be a list; got {value!r}")
    if allowed_runtimes is not None:
        asked = kwargs.get("runtimes")
        if asked is None:
            kwargs["runtimes"] = _runnable(request.bundle, allowed_runtimes)
            if not kwargs["runtimes"]:
                raise ConfigError(
                    f"none of the runtimes this agent allows ({', '.join(allowed_runtimes)}) is "
                    "installed here with an artifact of the bundle"
                )
        elif set(asked) - set(allowed_runtimes):
            raise ConfigError(
                f"runtimes {sorted(set(asked) - set(allowed_runtimes))} are not allowed here"
            )
    target = BenchTarget(request.variant, request.bundle, True)
    return run_bench([target], data=request.data, **kwargs)


class LocalTransport:
    """This machine: always present, benchmarked in this process."""

    name = "local"

    def discover(self, specs: Any, *, timeout_s: float) -> list[Any]:
        from edgerep.devices._base import Device

        return [Device("local", "local", "", describe_local_device())]

    def bench(self, device: Any, request: Any, *, timeout_s: float) -> dict[str, Any]:
        return run_request(request)
