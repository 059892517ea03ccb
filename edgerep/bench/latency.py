"""Latency measurement: warm up, then time single calls until enough samples are in.

Each sample is one call of `fn`, timed with ``time.perf_counter_ns`` around the
call only. Sampling stops once both ``min_iters`` samples and ``min_seconds`` of
measured time are collected (or at ``max_iters``). Percentiles use numpy's linear
interpolation; ``std_ms`` is the population standard deviation. For asynchronous
devices `fn` must synchronize before it returns (e.g. ``torch.cuda.synchronize``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgerep.errors import ConfigError

__all__ = ["LatencyStats", "measure_latency"]


@dataclass(frozen=True)
class LatencyStats:
    """Summary of latency samples, in milliseconds.

    Attributes:
        n: number of timed calls.
        min_ms, p50_ms, p90_ms, p95_ms, p99_ms, max_ms: order statistics.
        mean_ms: arithmetic mean.
        std_ms: population standard deviation.
    """

    n: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float

    @classmethod
    def from_samples_ns(cls, samples_ns: Sequence[int | float]) -> LatencyStats:
        """Summarize per-call durations given in nanoseconds.

        Raises:
            ConfigError: no samples, or a negative one.
        """
        import numpy as np

        a = np.asarray(samples_ns, dtype=np.float64) / 1e6
        if a.size == 0:
            raise ConfigError("no latency samples to summarize; time at least one call")
        if (a < 0).any():
            raise ConfigError("latency samples must be non-negative durations in nanoseconds")
        p50, p90, p95, p99 = (float(v) for v in np.percentile(a, [50, 90, 95, 99]))
        return cls(
            n=int(a.size),
            min_ms=float(a.min()),
            p50_ms=p50,
            p90_ms=p90,
            p95_ms=p95,
            p99_ms=p99,
            max_ms=float(a.max()),
            mean_ms=float(a.mean()),
            std_ms=float(a.std()),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"n={self.n} p50={self.p50_ms:.3f} ms p90={self.p90_ms:.3f} ms "
            f"p99={self.p99_ms:.3f} ms min={self.min_ms:.3f} ms mean={self.mean_ms:.3f}"
            f"±{self.std_ms:.3f} ms"
        )


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup_iters: int = 10,
    min_iters: int = 50,
    min_seconds: float = 1.0,
    max_iters: int = 1_000_000,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> LatencyStats:
    """Time `fn()` repeatedly.

    Args:
        fn: the call to time, with no arguments.
        warmup_iters: untimed calls first (caches, lazy initialization, JIT).
        min_iters: at least this many timed calls.
        min_seconds: and at least this much summed call time.
        max_iters: stop here even if `min_seconds` is not reached.
        clock: nanosecond clock (replaceable for tests).

    Returns:
        The statistics of the timed calls.

    Raises:
        ConfigError: a count or duration is out of range.
    """
    if warmup_iters < 0 or min_iters < 1 or min_seconds < 0 or max_iters < min_iters:
        raise ConfigError(
            "need warmup_iters >= 0, 1 <= min_iters <= max_iters and min_seconds >= 0; got "
            f"warmup_iters={warmup_iters}, min_iters={min_iters}, max_iters={max_iters}, "
            f"min_seconds={min_seconds}"
        )
    for _ in range(warmup_iters):
        fn()
    samples: list[int] = []
    total_ns = 0
    min_ns = min_seconds * 1e9
    while len(samples) < max_iters and (len(samples) < min_iters or total_ns < min_ns):
        start = clock()
        fn()
        elapsed = clock() - start
        samples.append(elapsed)
        total_ns += elapsed
    return LatencyStats.from_samples_ns(samples)
