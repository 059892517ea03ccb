"""Benchmarks: latency method, environment fingerprint, accuracy, roofline, reports.

Submodules: `latency` (the one latency method), `throughput` (inferences/s under
concurrency), `env` (environment fingerprint), `accuracy` (reference metrics,
datasets, metric registry), `roofline` (FLOPs, bytes, GEMM peak), `report`
(JSON/Markdown/HTML), `suite` (``edgerep bench``).
Only `latency` and `throughput` are imported here; the others load on use.
"""

from __future__ import annotations

from edgerep.bench.latency import (
    LatencyConfig,
    LatencyResult,
    LatencyStats,
    benchmark_latency,
    measure_latency,
    summarize_runs,
)
from edgerep.bench.throughput import ThroughputResult, measure_throughput

__all__ = [
    "LatencyConfig",
    "LatencyResult",
    "LatencyStats",
    "ThroughputResult",
    "benchmark_latency",
    "measure_latency",
    "measure_throughput",
    "summarize_runs",
]
