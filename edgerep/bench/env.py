"""The environment fingerprint recorded with every benchmark result.

Extends `edgerep.devices.describe_local` (CPU, cores, memory, OS, Python,
package versions) with what changes a timing: the CPU's ISA flags that matter
for inference kernels, the threads the run used, the GPU and driver
(``nvidia-smi`` when it is on PATH), the machine load, and the git revision of
the working directory. Reads /proc, importlib.metadata and two subprocesses
(``nvidia-smi``, ``git``) with short timeouts; imports no backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from edgerep.devices.local import describe_local

__all__ = ["ISA_FLAG_PREFIXES", "environment_fingerprint", "git_revision", "isa_flags"]

#: /proc/cpuinfo flags kept in the fingerprint (exact names, or prefixes ending in '*')
ISA_FLAG_PREFIXES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512*",
    "avx_vnni",
    "amx*",
    "neon",
    "asimd*",
    "fphp",
    "sve*",
    "sme",
    "sme2",
    "i8mm",
    "bf16",
    "dotprod",
)


def _keep(flag: str) -> bool:
    for pattern in ISA_FLAG_PREFIXES:
        if pattern.endswith("*"):
            if flag.startswith(pattern[:-1]):
                return True
        elif flag == pattern:
            return True
    return False


def isa_flags(cpuinfo: str | None = None) -> list[str]:
    """The inference-relevant ISA flags of this CPU, sorted (x86 ``flags``, ARM ``Features``).

    Args:
        cpuinfo: the text of /proc/cpuinfo (read when None; empty off Linux).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted({f for f in value.split() if _keep(f)})
    return []


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _nvidia_smi() -> list[dict[str, str]]:
    """GPUs, driver and memory from ``nvidia-smi`` (empty when it is not on PATH)."""
    if shutil.which("nvidia-smi") is None:
        return []
    text = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,compute_cap",
            "--format=csv,noheader",
        ]
    )
    gpus = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append(
                {
                    "name": parts[0],
                    "driver": parts[1],
                    "memory": parts[2],
                    "compute_capability": parts[3] if len(parts) > 3 else "",
                }
            )
    return gpus


def git_revision(directory: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{"commit": ..., "dirty": bool}`` of the git work tree at `directory` (cwd), else None."""
    cwd = str(directory) if directory is not None else None
    if shutil.which("git") is None:
        return None
    commit = _run(["git", "rev-parse", "HEAD"], cwd)
    if not commit:
        return None
    status = _run(
        ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd
    )
    return {"commit": commit, "dirty": bool(status)}


def environment_fingerprint(
    *, threads: int | None = None, directory: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """What a benchmark result needs to be compared honestly.

    Args:
        threads: the intra-op threads the benchmark used (None: the runtime chose).
        directory: where to read the git revision (default: the working directory).

    Returns:
        `describe_local`'s keys plus ``isa_flags``, ``threads``, ``nvidia`` (GPUs with
        driver, from nvidia-smi), ``loadavg`` (1, 5, 15 minutes), ``cpu_affinity``
        (CPUs this process may run on) and ``git``.
    """
    info = describe_local()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    affinity: int | None
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    info.update(
        isa_flags=isa_flags(),
        threads=threads,
        cpu_affinity=affinity,
        nvidia=_nvidia_smi(),
        loadavg=load,
        git=git_revision(directory),
    )
    return info
