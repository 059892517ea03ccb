"""Benchmarks: latency method, accuracy, roofline, reports."""

from __future__ import annotations

from edgerep.bench.latency import LatencyStats, measure_latency

__all__ = ["LatencyStats", "measure_latency"]
