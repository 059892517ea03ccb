"""measure_throughput on synthetic workers whose speed is known."""

from __future__ import annotations

import threading
import time

import pytest

from edgerep.bench import measure_throughput
from edgerep.errors import ConfigError

CALL_S = 0.004


def _sleep(_: object) -> None:
    time.sleep(CALL_S)  # releases the GIL, like a runtime computing


def test_parallel_workers_scale_and_serialized_ones_do_not():
    one = measure_throughput(_sleep, None, concurrency=1, seconds=0.2, warmup_seconds=0.0)
    four = measure_throughput(_sleep, None, concurrency=4, seconds=0.2, warmup_seconds=0.0)
    assert one.inferences_per_s <= 1 / CALL_S * 1.05
    assert four.inferences_per_s > 2.5 * one.inferences_per_s
    assert four.latency.p50_ms >= CALL_S * 1e3 and len(four.calls_per_worker) == 4
    assert min(four.calls_per_worker) > 0 and four.calls == sum(four.calls_per_worker)
    assert four.items_per_s == pytest.approx(four.inferences_per_s)

    lock = threading.Lock()

    def serialized(x: object) -> None:
        with lock:
            _sleep(x)

    locked = measure_throughput(serialized, None, concurrency=4, seconds=0.2, batch_size=8)
    assert locked.inferences_per_s < 1.3 * one.inferences_per_s
    assert locked.items_per_s == pytest.approx(8 * locked.inferences_per_s)
    # waiting for the lock is part of each call's latency under load (the lock is not
    # fair, so the median call may not wait; the mean does: Little's law, N = X * R)
    assert locked.latency.mean_ms > 2 * CALL_S * 1e3
    d = locked.to_dict()
    assert d["concurrency"] == 4 and d["latency"]["n"] == locked.calls


def test_one_run_function_per_worker_and_errors():
    seen: list[int] = []
    runs = [lambda _, i=i: seen.append(i) or _sleep(None) for i in range(3)]
    r = measure_throughput(runs, None, concurrency=3, seconds=0.05, setup="three")
    assert set(seen) == {0, 1, 2} and r.setup == "three"
    with pytest.raises(ConfigError, match="2 run functions for concurrency 3"):
        measure_throughput(runs[:2], None, concurrency=3)
    with pytest.raises(ConfigError, match="concurrency >= 1"):
        measure_throughput(_sleep, None, concurrency=0)

    def broken(_: object) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_throughput(broken, None, concurrency=2, seconds=0.05)
