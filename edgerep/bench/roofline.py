"""Roofline: how close a model runs to what the machine allows.

- **FLOPs**: counted by `torch.utils.flop_counter` on the PyTorch model (matmul and
  convolution, 2 per multiply-add; elementwise work not counted), or read from a
  bundle's ``fold_report.json`` (``flops_after``, counted the same way at the
  example input).
- **Bytes**: parameter bytes plus activation bytes (every leaf module's output
  size at the example input), the traffic of a pass that touches each once.
- **Peak**: a float32 GEMM micro-benchmark (numpy, i.e. its BLAS, with the
  threads the BLAS uses), cached per machine in ``~/.cache/edgerep/peak.json``
  keyed by CPU model and threads. It is an *attainable* peak, not the data-sheet one.
- **Achieved fraction** = FLOPs / latency / peak.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgerep.errors import ConfigError

__all__ = [
    "Roofline",
    "activation_and_param_bytes",
    "bundle_flops",
    "count_flops",
    "measure_peak_gflops",
    "roofline",
]


def count_flops(model: Any, inputs: tuple[Any, ...]) -> int:
    """FLOPs of one forward pass of a PyTorch model on `inputs` (see the module docstring)."""
    from edgerep.fold._cost import count_flops as _count

    return _count(model, inputs)


def activation_and_param_bytes(model: Any, inputs: tuple[Any, ...]) -> tuple[int, int]:
    """(parameter + buffer bytes, activation bytes) of one pass of a PyTorch model."""
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    total = [sum(t.numel() * t.element_size() for t in inputs)]

    def hook(_m: Any, _i: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return int(params), int(total[0])


def bundle_flops(bundle_dir: str | Path) -> int | None:
    """``flops_after`` from a bundle's ``fold_report.json`` (None when absent or zero); a
    pruned bundle's from ``prune_report.json`` (2 x the conv/linear MACs left, counted as
    the fold report counts FLOPs), since its fold report describes the unpruned model."""
    try:
        pruned = json.loads((Path(bundle_dir) / "prune_report.json").read_text())
        macs = int(pruned.get("macs_after") or 0) if isinstance(pruned, dict) else 0
    except (OSError, ValueError, TypeError):
        macs = 0
    if macs > 0:
        return 2 * macs
    path = Path(bundle_dir) / "fold_report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):  # an unfolded bundle records ``null``
        return None
    try:
        flops = int(report.get("flops_after") or 0)
    except (ValueError, TypeError):
        return None
    return flops or None


def _cache_path() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "edgerep" / "peak.json"


def _cpu_key(threads: int | None) -> str:
    from edgerep.devices.local import describe_local

    cpu = describe_local().get("cpu") or "unknown-cpu"
    return f"{cpu}|threads={threads if threads is not None else 'default'}"


def measure_peak_gflops(
    *,
    threads: int | None = None,
    size: int = 512,
    seconds: float = 0.5,
    cache: str | Path | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """The attainable float32 GEMM rate of this CPU, cached per (CPU model, threads).

    Times ``a @ b`` (size x size, float32) with numpy for about `seconds` and takes
    the best call (the least disturbed one). `threads` is recorded in the key; numpy's
    BLAS thread count is whatever its environment set (OMP/OPENBLAS_NUM_THREADS),
    so run benchmarks and this with the same environment.

    Args:
        threads: the threads the benchmarks use (part of the cache key).
        size: the matrix size.
        seconds: time spent measuring.
        cache: the cache file (default ``~/.cache/edgerep/peak.json``).
        refresh: measure even when cached.

    Returns:
        ``{"gflops": ..., "key": ..., "size": ..., "cached": bool}``.
    """
    import numpy as np

    if size < 16 or seconds <= 0:
        raise ConfigError(f"need size >= 16 and seconds > 0; got size={size}, seconds={seconds}")
    path = Path(cache) if cache is not None else _cache_path()
    key = _cpu_key(threads)
    table: dict[str, Any] = {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if not refresh and isinstance(table.get(key), dict) and "gflops" in table[key]:
        return {**table[key], "key": key, "cached": True}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    end = time.perf_counter() + seconds
    n = 0
    while n < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        n += 1
    entry = {"gflops": 2.0 * size**3 / best / 1e9, "size": size, "calls": n}
    table[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return {**entry, "key": key, "cached": False}


@dataclass(frozen=True)
class Roofline:
    """A model's work and how fast it ran relative to the machine's peak.

    Attributes:
        flops: FLOPs per call.
        bytes: bytes touched per call (None when unknown).
        latency_ms: the latency the fraction is computed from (p50).
        achieved_gflops: flops / latency.
        peak_gflops: the machine's measured GEMM peak.
        fraction_of_peak: achieved / peak.
        arithmetic_intensity: flops / bytes (None when bytes is unknown).
    """

    flops: int
    bytes: int | None
    latency_ms: float
    achieved_gflops: float
    peak_gflops: float
    fraction_of_peak: float
    arithmetic_intensity: float | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return asdict(self)


def roofline(
    flops: int, latency_ms: float, peak_gflops: float, *, bytes_: int | None = None
) -> Roofline:
    """Achieved rate and fraction of peak of a model that does `flops` in `latency_ms`.

    Raises:
        ConfigError: a non-positive latency or peak, or negative flops.
    """
    if latency_ms <= 0 or peak_gflops <= 0 or flops < 0:
        raise ConfigError(
            f"roofline needs latency_ms > 0, peak_gflops > 0 and flops >= 0; got "
            f"{latency_ms}, {peak_gflops}, {flops}"
        )
    achieved = flops / (latency_ms / 1e3) / 1e9
    return Roofline(
        flops=int(flops),
        bytes=bytes_,
        latency_ms=latency_ms,
        achieved_gflops=achieved,
        peak_gflops=peak_gflops,
        fraction_of_peak=achieved / peak_gflops,
        arithmetic_intensity=(flops / bytes_) if bytes_ else None,
    )
