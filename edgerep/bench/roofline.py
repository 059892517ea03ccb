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
  A row that computes in bf16 or f16 (OpenVINO's CPU default is bf16 on AMX CPUs,
  where a bf16 GEMM runs ~4x faster than float32) is divided by the GEMM peak at
  *its* precision, measured the same way through OpenVINO's CPU plugin (a MatMul
  compiled with that inference precision hint; cached under the key plus the
  precision). When that peak cannot be measured (no OpenVINO, or the CPU computes
  the hint in another precision) the row is divided by the float32 peak and says so
  (``peak_precision``).
- **Achieved fraction** = FLOPs / latency / peak.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgerep.errors import ConfigError, UnsupportedError

__all__ = [
    "Roofline",
    "activation_and_param_bytes",
    "bundle_flops",
    "count_flops",
    "measure_peak_gflops",
    "roofline",
]

#: precisions with a measured low-precision peak, in edgerep's names (those a session
#: reports through `edgerep.runtimes.openvino.precision_name`)
LOW_PRECISION_PEAKS = ("bf16", "fp16")
#: OpenVINO's name for each as an inference precision hint
_OV_HINT = {"bf16": "bf16", "fp16": "f16"}


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


def _cpu_key(threads: int | None, precision: str = "fp32") -> str:
    from edgerep.devices.local import describe_local

    cpu = describe_local().get("cpu") or "unknown-cpu"
    key = f"{cpu}|threads={threads if threads is not None else 'default'}"
    return key if precision == "fp32" else f"{key}|{precision}"


def _numpy_gemm_s(size: int, seconds: float) -> tuple[float, int]:
    """Best seconds per float32 ``a @ b`` through numpy's BLAS, and the calls timed."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up
    return _best_of(lambda: a @ b, seconds)


def _openvino_gemm_s(
    size: int, seconds: float, precision: str, threads: int | None
) -> tuple[float, int]:
    """Best seconds per ``x @ W`` through OpenVINO's CPU plugin at `precision`.

    Raises:
        UnsupportedError: OpenVINO is missing, or the plugin computes in another precision.
    """
    import numpy as np

    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError as e:
        raise UnsupportedError(f"no {precision} GEMM peak: OpenVINO is not installed") from e
    hint = _OV_HINT[precision]
    wanted = {"bf16": ov.Type.bf16, "f16": ov.Type.f16}[hint]
    rng = np.random.default_rng(0)
    x = ops.parameter([size, size], ov.Type.f32, name="x")
    w = ops.constant(rng.standard_normal((size, size)).astype(np.float32))
    model = ov.Model([ops.matmul(x, w, False, False)], [x])
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = ov.Core().compile_model(model, "CPU", config)
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception as e:  # a plugin without that hint (e.g. another CPU architecture)
        raise UnsupportedError(
            f"no {precision} GEMM peak: OpenVINO's CPU plugin refused: {e}"
        ) from e
    if got != wanted:
        raise UnsupportedError(f"no {precision} GEMM peak: this CPU computes the hint in {got}")
    request = compiled.create_infer_request()
    feed = {0: rng.standard_normal((size, size)).astype(np.float32)}
    request.infer(feed)  # warm-up
    return _best_of(lambda: request.infer(feed), seconds)


def _best_of(call: Any, seconds: float) -> tuple[float, int]:
    best = float("inf")
    end = time.perf_counter() + seconds
    n = 0
    while n < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best, n


def measure_peak_gflops(
    *,
    threads: int | None = None,
    size: int = 512,
    seconds: float = 0.5,
    cache: str | Path | None = None,
    refresh: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The attainable GEMM rate of this CPU at `precision`, cached per (CPU model,
    threads, precision).

    float32: times ``a @ b`` (size x size) with numpy for about `seconds` and takes
    the best call (the least disturbed one). `threads` is recorded in the key; numpy's
    BLAS thread count is whatever its environment set (OMP/OPENBLAS_NUM_THREADS),
    so run benchmarks and this with the same environment. bf16/f16: the same through
    OpenVINO's CPU plugin with that inference precision hint and `threads` threads,
    at twice `size` (a low-precision GEMM of `size` is too short to time well).

    Args:
        threads: the threads the benchmarks use (part of the cache key).
        size: the matrix size.
        seconds: time spent measuring.
        cache: the cache file (default ``~/.cache/edgerep/peak.json``).
        refresh: measure even when cached.
        precision: ``"fp32"`` or one of `LOW_PRECISION_PEAKS`.

    Returns:
        ``{"gflops": ..., "key": ..., "size": ..., "precision": ..., "cached": bool}``.

    Raises:
        ConfigError: bad size, seconds or precision.
        UnsupportedError: a low-precision peak cannot be measured here.
    """
    if size < 16 or seconds <= 0:
        raise ConfigError(f"need size >= 16 and seconds > 0; got size={size}, seconds={seconds}")
    if precision != "fp32" and precision not in LOW_PRECISION_PEAKS:
        raise ConfigError(
            f"no GEMM peak for precision {precision!r}; choose fp32, "
            + ", ".join(LOW_PRECISION_PEAKS)
        )
    path = Path(cache) if cache is not None else _cache_path()
    key = _cpu_key(threads, precision)
    table: dict[str, Any] = {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if not refresh and isinstance(table.get(key), dict) and "gflops" in table[key]:
        return {"precision": precision, **table[key], "key": key, "cached": True}
    if precision == "fp32":
        best, n = _numpy_gemm_s(size, seconds)
    else:
        size *= 2
        best, n = _openvino_gemm_s(size, seconds, precision, threads)
    entry = {
        "gflops": 2.0 * size**3 / best / 1e9,
        "size": size,
        "calls": n,
        "precision": precision,
        "method": "numpy float32 GEMM"
        if precision == "fp32"
        else f"OpenVINO CPU MatMul, {precision}",
    }
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
        peak_precision: the precision of the GEMM the peak was measured at.
        compute_precision: the precision the row computed in (differs from
            `peak_precision` when no peak at that precision could be measured).
    """

    flops: int
    bytes: int | None
    latency_ms: float
    achieved_gflops: float
    peak_gflops: float
    fraction_of_peak: float
    arithmetic_intensity: float | None
    peak_precision: str = "fp32"
    compute_precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return asdict(self)


def roofline(
    flops: int,
    latency_ms: float,
    peak_gflops: float,
    *,
    bytes_: int | None = None,
    peak_precision: str = "fp32",
    compute_precision: str = "fp32",
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
        peak_precision=peak_precision,
        compute_precision=compute_precision,
    )
