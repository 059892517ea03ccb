"""Latency statistics on synthetic timings."""

from __future__ import annotations

import numpy as np
import pytest

from edgerep.bench import LatencyStats, measure_latency
from edgerep.errors import ConfigError


def test_stats_from_known_samples():
    samples_ns = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms
    s = LatencyStats.from_samples_ns(samples_ns)
    assert s.n == 100
    assert s.min_ms == 1.0 and s.max_ms == 100.0
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.mean_ms == pytest.approx(50.5)
    assert s.std_ms == pytest.approx(np.std(np.arange(1, 101)))
    assert s.to_dict()["p95_ms"] == pytest.approx(95.05)
    assert "p50=50.500 ms" in str(s)


def test_stats_reject_bad_samples():
    with pytest.raises(ConfigError, match="no latency samples"):
        LatencyStats.from_samples_ns([])
    with pytest.raises(ConfigError, match="non-negative"):
        LatencyStats.from_samples_ns([5, -1])


class FakeClock:
    """Each call of the timed function takes `step_ns` of fake time."""

    def __init__(self, steps_ns):
        self.now = 0
        self.steps = list(steps_ns)
        self.calls = 0

    def clock(self):
        return self.now

    def fn(self):
        self.now += self.steps[self.calls % len(self.steps)]
        self.calls += 1


def test_measure_stops_at_min_iters_when_time_is_reached():
    fake = FakeClock([2_000_000])  # 2 ms per call
    s = measure_latency(fake.fn, warmup_iters=5, min_iters=20, min_seconds=0.01, clock=fake.clock)
    assert s.n == 20 and fake.calls == 25  # warmup calls are not timed
    assert s.p50_ms == pytest.approx(2.0) and s.std_ms == 0.0


def test_measure_runs_until_min_seconds():
    fake = FakeClock([1_000_000, 3_000_000])  # alternating 1 and 3 ms
    s = measure_latency(fake.fn, warmup_iters=0, min_iters=2, min_seconds=1.0, clock=fake.clock)
    assert s.n == 500  # 500 calls x 2 ms mean = 1 s
    assert s.min_ms == 1.0 and s.max_ms == 3.0 and s.mean_ms == pytest.approx(2.0)


def test_measure_respects_max_iters_and_validates():
    fake = FakeClock([10])
    s = measure_latency(
        fake.fn, warmup_iters=0, min_iters=3, min_seconds=10.0, max_iters=7, clock=fake.clock
    )
    assert s.n == 7
    with pytest.raises(ConfigError, match="min_iters"):
        measure_latency(fake.fn, min_iters=0)


def test_measure_with_the_real_clock():
    s = measure_latency(lambda: sum(range(100)), warmup_iters=1, min_iters=5, min_seconds=0.0)
    assert s.n == 5 and 0 <= s.min_ms <= s.p50_ms <= s.max_ms
