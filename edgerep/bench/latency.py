"""Latency measurement: one method for every backend.

`measure_latency` is the single-run core; `benchmark_latency` is the full method
(first call, warm-up by iterations and time, repeated runs, bootstrap interval of
p50, run-to-run spread flag, throughput, peak RSS, end-to-end timing with
pre/post-processing); `summarize_runs` is its pure part, for recorded timings.

Each sample is one call of `fn`, timed with ``time.perf_counter_ns`` around the
call only. Sampling stops once both ``min_iters`` samples and ``min_seconds`` of
measured time are collected (or at ``max_iters``). Percentiles use numpy's linear
interpolation; ``std_ms`` is the population standard deviation. For asynchronous
devices `fn` must synchronize before it returns (e.g. ``torch.cuda.synchronize``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from edgerep.errors import ConfigError

__all__ = [
    "LatencyConfig",
    "LatencyResult",
    "LatencyStats",
    "benchmark_latency",
    "bootstrap_ci",
    "measure_latency",
    "p50_spread",
    "peak_rss_bytes",
    "summarize_runs",
    "timed_load",
]


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
    warmup_seconds: float = 0.0,
    min_iters: int = 50,
    min_seconds: float = 1.0,
    max_iters: int = 1_000_000,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> LatencyStats:
    """Time `fn()` repeatedly.

    Args:
        fn: the call to time, with no arguments.
        warmup_iters: untimed calls first (caches, lazy initialization, JIT) ...
        warmup_seconds: ... and at least this much wall time of them.
        min_iters: at least this many timed calls.
        min_seconds: and at least this much summed call time.
        max_iters: stop here even if `min_seconds` is not reached.
        clock: nanosecond clock (replaceable for tests).

    Returns:
        The statistics of the timed calls.

    Raises:
        ConfigError: a count or duration is out of range.
    """
    if (
        warmup_iters < 0
        or warmup_seconds < 0
        or min_iters < 1
        or min_seconds < 0
        or max_iters < min_iters
    ):
        raise ConfigError(
            "need warmup_iters >= 0, 1 <= min_iters <= max_iters and min_seconds >= 0; got "
            f"warmup_iters={warmup_iters}, min_iters={min_iters}, max_iters={max_iters}, "
            f"min_seconds={min_seconds}"
        )
    config = LatencyConfig(
        warmup_iters=warmup_iters,
        warmup_seconds=warmup_seconds,
        min_iters=min_iters,
        min_seconds=min_seconds,
        max_iters=max_iters,
        repeats=1,
    )
    _warm_up(fn, config, clock)
    return LatencyStats.from_samples_ns(_sample(fn, config, clock))


# --- the full method: repeats, interval, first call, memory, end-to-end ----------------


@dataclass(frozen=True)
class LatencyConfig:
    """How `benchmark_latency` samples; small, frozen, JSON round-trip.

    Attributes:
        warmup_iters: untimed calls after the first one, at least this many ...
        warmup_seconds: ... and at least this much wall time.
        min_iters: per run, at least this many timed calls ...
        min_seconds: ... and at least this much summed call time.
        max_iters: per run, stop here even if `min_seconds` is not reached.
        repeats: independent runs; their p50s give the run-to-run spread.
        spread_threshold: flag the result when (max p50 - min p50) / median p50
            over the runs exceeds this (0.05: 5%).
        bootstrap_samples: resamples for the 95% interval of p50.
        seed: seed of the bootstrap.
    """

    warmup_iters: int = 10
    warmup_seconds: float = 0.2
    min_iters: int = 50
    min_seconds: float = 1.0
    max_iters: int = 1_000_000
    repeats: int = 3
    spread_threshold: float = 0.05
    bootstrap_samples: int = 1000
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if (
            self.warmup_iters < 0
            or self.warmup_seconds < 0
            or self.min_iters < 1
            or self.min_seconds < 0
            or self.max_iters < self.min_iters
            or self.repeats < 1
            or self.spread_threshold < 0
            or self.bootstrap_samples < 1
        ):
            raise ConfigError(
                "latency config out of range: need warmup_iters >= 0, warmup_seconds >= 0, "
                "1 <= min_iters <= max_iters, min_seconds >= 0, repeats >= 1, "
                f"spread_threshold >= 0, bootstrap_samples >= 1; got {self}"
            )

    @classmethod
    def mlperf(cls, **overrides: Any) -> LatencyConfig:
        """MLPerf-style single-stream minimums: >= 1024 queries and >= 60 s per run."""
        base = {"warmup_iters": 50, "warmup_seconds": 2.0, "min_iters": 1024, "min_seconds": 60.0}
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyConfig:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or another version.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or data.get("version", 1) != 1:
            raise ConfigError(
                f"cannot read latency config {data!r}: unknown keys {unknown} or version "
                f"{data.get('version')!r} (this edgerep reads version 1)"
            )
        return cls(**data)


@dataclass(frozen=True)
class LatencyResult:
    """Everything `benchmark_latency` measured.

    Attributes:
        stats: the pooled statistics of every timed call of every run (model only).
        runs: the statistics of each run.
        p50_ci_ms: bootstrap 95% interval of the pooled p50, (low, high).
        p50_spread: (max p50 - min p50) / median p50 over the runs.
        unstable: `p50_spread` exceeds the config's threshold: do not trust
            differences smaller than the spread.
        batch_size: items per call.
        throughput_items_per_s: ``batch_size / mean latency`` (sequential calls).
        first_ms: the very first call, before warm-up (lazy init, JIT, allocation).
        warmup_iters: warm-up calls actually made.
        peak_rss_bytes: the process's peak resident set size after the runs (it
            includes everything the process did before; compare within a process).
        load_ms: load/compile time, when the caller measured it (see `timed_load`).
        end_to_end: statistics of ``post(run(pre(inputs)))`` when pre/post were given.
        runtime: statistics of the runtime's own timer of each timed call (see
            `benchmark_latency`'s ``runtime_timer``), None where not offered.
        config: the sampling settings.
        samples_ms: every pooled sample, in order (for plots; `to_dict` leaves it out).
    """

    stats: LatencyStats
    runs: tuple[LatencyStats, ...]
    p50_ci_ms: tuple[float, float]
    p50_spread: float
    unstable: bool
    batch_size: int
    throughput_items_per_s: float
    first_ms: float
    warmup_iters: int
    peak_rss_bytes: int | None
    config: LatencyConfig
    load_ms: float | None = None
    end_to_end: LatencyStats | None = None
    runtime: LatencyStats | None = None
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    def with_load_ms(self, load_ms: float | None) -> LatencyResult:
        """A copy with the load/compile time set."""
        return replace(self, load_ms=load_ms)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return {
            "stats": self.stats.to_dict(),
            "runs": [r.to_dict() for r in self.runs],
            "p50_ci_ms": list(self.p50_ci_ms),
            "p50_spread": self.p50_spread,
            "unstable": self.unstable,
            "batch_size": self.batch_size,
            "throughput_items_per_s": self.throughput_items_per_s,
            "first_ms": self.first_ms,
            "warmup_iters": self.warmup_iters,
            "peak_rss_bytes": self.peak_rss_bytes,
            "load_ms": self.load_ms,
            "end_to_end": None if self.end_to_end is None else self.end_to_end.to_dict(),
            "runtime": None if self.runtime is None else self.runtime.to_dict(),
            "config": self.config.to_dict(),
        }


def bootstrap_ci(
    samples: Sequence[float],
    *,
    statistic: str = "median",
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of a statistic of `samples` (seeded, reproducible).

    Resamples are drawn in chunks so that memory stays bounded for long runs.

    Args:
        samples: the observations (e.g. latencies in ms).
        statistic: ``"median"`` or ``"mean"``.
        confidence: coverage of the interval, in (0, 1).
        resamples: bootstrap resamples.
        seed: seed of numpy's default generator.

    Returns:
        ``(low, high)``.

    Raises:
        ConfigError: no samples, or an argument out of range.
    """
    import numpy as np

    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0 or not 0.0 < confidence < 1.0 or resamples < 1:
        raise ConfigError(
            "bootstrap_ci needs samples, 0 < confidence < 1 and resamples >= 1; got "
            f"{a.size} samples, confidence={confidence}, resamples={resamples}"
        )
    reduce: Any = {"median": np.median, "mean": np.mean}.get(statistic)
    if reduce is None:
        raise ConfigError(f"unknown statistic {statistic!r}; allowed: median, mean")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 4_000_000 // a.size))
    values = []
    done = 0
    while done < resamples:
        k = min(chunk, resamples - done)
        idx = rng.integers(0, a.size, size=(k, a.size))
        values.append(reduce(a[idx], axis=1))
        done += k
    est = np.concatenate(values)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(est, [tail, 100 - tail])
    return float(low), float(high)


def p50_spread(runs: Sequence[LatencyStats]) -> float:
    """Run-to-run spread of p50: (max - min) / median of the runs' p50s (0 for one run)."""
    import numpy as np

    p50s = np.asarray([r.p50_ms for r in runs], dtype=np.float64)
    mid = float(np.median(p50s))
    if p50s.size < 2 or mid == 0.0:
        return 0.0
    return float((p50s.max() - p50s.min()) / mid)


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size in bytes (None where unknown).

    Linux: ``VmHWM`` from /proc/self/status; else ``resource.getrusage`` (``ru_maxrss``
    is in KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _sample(
    fn: Callable[[], Any],
    config: LatencyConfig,
    clock: Callable[[], int],
    runtime_timer: Callable[[], float | None] | None = None,
    runtime_ms: list[float] | None = None,
) -> list[int]:
    samples: list[int] = []
    total_ns = 0
    min_ns = config.min_seconds * 1e9
    while len(samples) < config.max_iters and (
        len(samples) < config.min_iters or total_ns < min_ns
    ):
        start = clock()
        fn()
        elapsed = clock() - start
        samples.append(elapsed)
        total_ns += elapsed
        if runtime_timer is not None and runtime_ms is not None:  # outside the timed call
            value = runtime_timer()
            if value is not None:
                runtime_ms.append(value)
    return samples


def _warm_up(fn: Callable[[], Any], config: LatencyConfig, clock: Callable[[], int]) -> int:
    """Untimed calls: at least `warmup_iters` and at least `warmup_seconds`; returns the count."""
    n = 0
    start = clock()
    limit_ns = config.warmup_seconds * 1e9
    while n < config.warmup_iters or (clock() - start < limit_ns and n < config.max_iters):
        fn()
        n += 1
    return n


def benchmark_latency(
    run: Callable[[Any], Any],
    inputs: Any,
    *,
    config: LatencyConfig | None = None,
    batch_size: int = 1,
    pre: Callable[[Any], Any] | None = None,
    post: Callable[[Any], Any] | None = None,
    load_ms: float | None = None,
    runtime_timer: Callable[[], float | None] | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> LatencyResult:
    """The one latency method for every backend.

    1. the first call of ``run`` is timed alone (``first_ms``);
    2. warm-up: at least ``warmup_iters`` calls and ``warmup_seconds``;
    3. ``repeats`` runs, each of at least ``min_iters`` calls and ``min_seconds``
       of summed call time; every sample times one call only;
    4. pooled statistics, a bootstrap 95% interval of p50, the run-to-run spread of
       p50 (flagged above ``spread_threshold``), throughput at ``batch_size``;
    5. with `pre` or `post`, the same method again on ``post(run(pre(inputs)))``,
       reported separately as ``end_to_end``; model-only timing then runs on
       ``pre(inputs)`` computed once.

    Args:
        run: the model call, e.g. ``session.run``; it must synchronize before it
            returns on asynchronous devices.
        inputs: what `run` (or `pre`) takes.
        config: sampling settings (default `LatencyConfig()`).
        batch_size: items per call, for throughput.
        pre: pre-processing, raw inputs -> model inputs.
        post: post-processing, model outputs -> result.
        load_ms: load/compile time measured by the caller (see `timed_load`).
        runtime_timer: the runtime's own measurement of the last call in ms (e.g.
            `SessionBase.runtime_ms`: OpenVINO's ``InferRequest.latency``), read after
            each timed call, outside the timed region; summarized as ``runtime``. It
            leaves out the Python binding, as vendor tools do; the wall-clock
            statistics stay the result.
        clock: nanosecond clock (replaceable for tests).

    Raises:
        ConfigError: `batch_size` < 1.
    """
    config = config or LatencyConfig()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    model_inputs = pre(inputs) if pre is not None else inputs

    def model_call() -> Any:
        return run(model_inputs)

    start = clock()
    model_call()
    first_ms = (clock() - start) / 1e6
    warm = _warm_up(model_call, config, clock)
    runtime_ms: list[float] = []
    summary = summarize_runs(
        [
            _sample(model_call, config, clock, runtime_timer, runtime_ms)
            for _ in range(config.repeats)
        ],
        config=config,
    )
    end_to_end = None
    if pre is not None or post is not None:
        pre_fn = pre or (lambda x: x)
        post_fn = post or (lambda y: y)

        def e2e_call() -> Any:
            return post_fn(run(pre_fn(inputs)))

        _warm_up(e2e_call, replace(config, warmup_seconds=0.0), clock)
        samples: list[int] = []
        for _ in range(config.repeats):
            samples += _sample(e2e_call, config, clock)
        end_to_end = LatencyStats.from_samples_ns(samples)
    return replace(
        summary,
        batch_size=batch_size,
        throughput_items_per_s=_throughput(batch_size, summary.stats),
        first_ms=first_ms,
        warmup_iters=warm,
        peak_rss_bytes=peak_rss_bytes(),
        load_ms=load_ms,
        end_to_end=end_to_end,
        runtime=LatencyStats.from_samples_ns([v * 1e6 for v in runtime_ms]) if runtime_ms else None,
    )


def _throughput(batch_size: int, stats: LatencyStats) -> float:
    return batch_size * 1000.0 / stats.mean_ms if stats.mean_ms > 0 else float("inf")


def summarize_runs(
    runs_ns: Sequence[Sequence[int | float]],
    *,
    config: LatencyConfig | None = None,
    batch_size: int = 1,
) -> LatencyResult:
    """Summarize per-run samples (nanoseconds): pooled stats, p50 interval and spread.

    The pure part of `benchmark_latency`, usable on recorded or synthetic timings;
    ``first_ms`` is 0.0 and ``peak_rss_bytes`` None (nothing was run).

    Raises:
        ConfigError: no runs, or a run without samples.
    """
    config = config or LatencyConfig()
    if not runs_ns:
        raise ConfigError("no latency runs to summarize")
    runs = tuple(LatencyStats.from_samples_ns(r) for r in runs_ns)
    pooled = [float(v) for r in runs_ns for v in r]
    stats = LatencyStats.from_samples_ns(pooled)
    low, high = bootstrap_ci(
        [v / 1e6 for v in pooled], resamples=config.bootstrap_samples, seed=config.seed
    )
    spread = p50_spread(runs)
    return LatencyResult(
        stats=stats,
        runs=runs,
        p50_ci_ms=(low, high),
        p50_spread=spread,
        unstable=spread > config.spread_threshold,
        batch_size=batch_size,
        throughput_items_per_s=_throughput(batch_size, stats),
        first_ms=0.0,
        warmup_iters=0,
        peak_rss_bytes=None,
        config=config,
        samples_ms=tuple(v / 1e6 for v in pooled),
    )


def timed_load(
    runtime: Any, artifact_path: Any, *, device: str = "cpu", options: Any = None
) -> tuple[Any, float]:
    """``runtime.load(...)`` and its wall time in ms (load + compile), for `LatencyResult.load_ms`."""
    start = time.perf_counter_ns()
    session = runtime.load(artifact_path, device=device, options=options)
    return session, (time.perf_counter_ns() - start) / 1e6
