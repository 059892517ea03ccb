"""The full latency method on synthetic timings: percentiles, interval, spread flag, e2e."""

from __future__ import annotations

import numpy as np
import pytest

from edgerep.bench.latency import (
    LatencyConfig,
    benchmark_latency,
    bootstrap_ci,
    p50_spread,
    peak_rss_bytes,
    summarize_runs,
)
from edgerep.errors import ConfigError

MS = 1_000_000


def test_summary_percentiles_and_throughput():
    runs = [[i * MS for i in range(1, 101)]] * 3  # three identical runs of 1..100 ms
    r = summarize_runs(runs, config=LatencyConfig(bootstrap_samples=200), batch_size=4)
    assert r.stats.n == 300
    assert r.stats.p50_ms == pytest.approx(50.5)
    assert r.stats.p99_ms == pytest.approx(np.percentile(np.tile(np.arange(1, 101), 3), 99))
    assert r.stats.min_ms == 1.0 and r.stats.max_ms == 100.0
    assert r.throughput_items_per_s == pytest.approx(4 * 1000 / 50.5)
    assert r.p50_spread == 0.0 and not r.unstable
    assert len(r.samples_ms) == 300


def test_bootstrap_interval_is_seeded_and_covers_the_median():
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=0.0, sigma=0.3, size=2000)
    lo, hi = bootstrap_ci(samples, resamples=500, seed=3)
    assert (lo, hi) == bootstrap_ci(samples, resamples=500, seed=3)
    assert lo < np.median(samples) < hi
    # the interval of a median of 2000 lognormal(0, 0.3) samples is about +-1.5%
    assert 0.005 < (hi - lo) / np.median(samples) < 0.06
    # a constant sample has a degenerate interval
    assert bootstrap_ci([2.0] * 50, resamples=50) == (2.0, 2.0)
    with pytest.raises(ConfigError):
        bootstrap_ci([], resamples=10)
    with pytest.raises(ConfigError, match="unknown statistic"):
        bootstrap_ci([1.0], statistic="mode")


def test_spread_flag():
    base = [10 * MS] * 20
    steady = summarize_runs([base, [10.2 * MS] * 20, [9.9 * MS] * 20])
    assert steady.p50_spread == pytest.approx(0.3 / 10.0) and not steady.unstable
    shaky = summarize_runs([base, [11 * MS] * 20, [10 * MS] * 20])
    assert shaky.p50_spread == pytest.approx(0.1) and shaky.unstable
    loose = summarize_runs(
        [base, [11 * MS] * 20, [10 * MS] * 20], config=LatencyConfig(spread_threshold=0.2)
    )
    assert not loose.unstable
    assert p50_spread(summarize_runs([base]).runs) == 0.0


class FakeClock:
    def __init__(self, step_ns):
        self.now = 0
        self.step = step_ns
        self.calls = 0

    def clock(self):
        return self.now

    def advance(self, ns):
        self.now += ns


def test_benchmark_with_a_fake_clock_pre_and_post():
    fake = FakeClock(0)
    calls = {"run": 0, "pre": 0, "post": 0}

    def pre(raw):
        calls["pre"] += 1
        fake.advance(1 * MS)
        return raw * 2

    def run(x):
        calls["run"] += 1
        fake.advance((5 if calls["run"] == 1 else 2) * MS)  # the first call is slow
        return x + 1

    def post(y):
        calls["post"] += 1
        fake.advance(MS // 2)
        return y

    cfg = LatencyConfig(
        warmup_iters=3,
        warmup_seconds=0.0,
        min_iters=10,
        min_seconds=0.0,
        repeats=2,
        bootstrap_samples=50,
    )
    r = benchmark_latency(
        run, 1, config=cfg, batch_size=8, pre=pre, post=post, clock=fake.clock, load_ms=12.5
    )
    assert r.first_ms == pytest.approx(5.0)
    assert r.warmup_iters == 3
    assert r.stats.n == 20 and r.stats.p50_ms == pytest.approx(2.0)
    assert r.p50_ci_ms == (pytest.approx(2.0), pytest.approx(2.0))
    assert r.end_to_end is not None and r.end_to_end.p50_ms == pytest.approx(3.5)
    assert r.throughput_items_per_s == pytest.approx(8 * 1000 / 2.0)
    assert r.load_ms == 12.5
    d = r.to_dict()
    assert d["end_to_end"]["n"] == 20 and "samples_ms" not in d
    assert d["config"]["repeats"] == 2


def test_warmup_by_time():
    fake = FakeClock(0)
    n = {"calls": 0}

    def run(_):
        n["calls"] += 1
        fake.advance(MS)

    cfg = LatencyConfig(
        warmup_iters=1,
        warmup_seconds=0.05,
        min_iters=1,
        min_seconds=0.0,
        repeats=1,
        bootstrap_samples=10,
    )
    r = benchmark_latency(run, None, config=cfg, clock=fake.clock)
    assert r.warmup_iters == 50  # 50 calls of 1 ms fill the 50 ms warm-up


def test_config_mlperf_and_round_trip():
    m = LatencyConfig.mlperf()
    assert m.min_iters >= 1024 and m.min_seconds >= 60
    assert LatencyConfig.from_dict(m.to_dict()) == m
    with pytest.raises(ConfigError):
        LatencyConfig(repeats=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        LatencyConfig.from_dict({"bogus": 1})
    rss = peak_rss_bytes()
    assert rss is None or rss > 1_000_000


def test_runtime_timer_is_read_after_each_timed_call_only():
    fake = FakeClock(0)
    state = {"calls": 0, "timed": False}

    def run(_):
        state["calls"] += 1
        fake.advance(3 * MS)  # wall clock: 3 ms a call

    reads = []

    def runtime_timer():
        # the runtime's own timer: 2 ms, or None (e.g. not offered on some calls)
        reads.append(state["calls"])
        return None if state["calls"] % 5 == 0 else 2.0

    cfg = LatencyConfig(
        warmup_iters=4, warmup_seconds=0.0, min_iters=10, min_seconds=0.0, repeats=2,
        bootstrap_samples=10,
    )  # fmt: skip
    r = benchmark_latency(run, None, config=cfg, runtime_timer=runtime_timer, clock=fake.clock)
    # read once per timed call (20), never during the first call or the warm-up (5 calls)
    assert reads == list(range(6, 26))
    assert r.stats.p50_ms == pytest.approx(3.0)
    assert r.runtime is not None and r.runtime.n == 16  # the 4 None reads are left out
    assert r.runtime.p50_ms == pytest.approx(2.0)
    assert r.to_dict()["runtime"]["p50_ms"] == pytest.approx(2.0)
    plain = benchmark_latency(run, None, config=cfg, clock=fake.clock)
    assert plain.runtime is None and plain.to_dict()["runtime"] is None
