"""Throughput under concurrency: N workers calling the model at once, for a fixed time.

`measure_throughput` is the concurrent counterpart of `benchmark_latency`: each of
``concurrency`` threads calls its run function back to back, every call timed like
a latency sample; the result is inferences (and items) per second over the wall
time of the timed phase, and the latency distribution under that load.

Where the concurrency comes from is the runtime's business (see
`edgerep.runtimes.SessionBase.concurrent_runs`): one thread-safe session shared by
all threads (onnxruntime, torch), one OpenVINO infer request per thread on a model
compiled with ``num_streams`` = N (the streams run in parallel; each sync ``infer``
releases the GIL, as the requests of an ``AsyncInferQueue`` would run), or one
session per thread (parallel sessions). Python threads are enough because every
runtime here releases the GIL while it computes; the GIL-held part of a call
(validation, copies: microseconds) bounds the speed-up for very small models,
and is part of what an application sees.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgerep.bench.latency import LatencyStats
from edgerep.errors import ConfigError

__all__ = ["ThroughputResult", "measure_throughput"]


@dataclass(frozen=True)
class ThroughputResult:
    """What `measure_throughput` measured.

    Attributes:
        concurrency: workers calling at once.
        calls: timed calls completed, over all workers.
        seconds: wall time of the timed phase (until the last call returned).
        inferences_per_s: ``calls / seconds``.
        items_per_s: ``inferences_per_s * batch_size``.
        batch_size: items per call.
        latency: per-call latency under this load (pooled over workers).
        calls_per_worker: timed calls of each worker (a starved worker shows here).
        setup: how the concurrency was made (e.g. ``"shared session"``,
            ``"4 infer requests, num_streams=4"``), recorded by the caller.
    """

    concurrency: int
    calls: int
    seconds: float
    inferences_per_s: float
    items_per_s: float
    batch_size: int
    latency: LatencyStats
    calls_per_worker: tuple[int, ...]
    setup: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return {
            "concurrency": self.concurrency,
            "calls": self.calls,
            "seconds": self.seconds,
            "inferences_per_s": self.inferences_per_s,
            "items_per_s": self.items_per_s,
            "batch_size": self.batch_size,
            "latency": self.latency.to_dict(),
            "calls_per_worker": list(self.calls_per_worker),
            "setup": self.setup,
        }


def measure_throughput(
    run: Callable[[Any], Any] | Sequence[Callable[[Any], Any]],
    inputs: Any,
    *,
    concurrency: int = 1,
    seconds: float = 1.0,
    warmup_seconds: float = 0.2,
    batch_size: int = 1,
    setup: str = "",
    clock: Callable[[], int] = time.perf_counter_ns,
) -> ThroughputResult:
    """Call `run(inputs)` from `concurrency` threads at once for `seconds`.

    1. warm-up: every worker calls until ``warmup_seconds`` have passed (at least once);
    2. all workers wait at a barrier, then call back to back until ``seconds`` have
       passed since the barrier; each call is timed alone;
    3. wall time runs from the barrier to the return of the last call.

    Args:
        run: one function shared by every worker (it must be thread-safe), or one
            per worker (``len(run) == concurrency``), e.g. from
            `SessionBase.concurrent_runs` or N sessions' ``run``.
        inputs: what each call takes.
        concurrency: workers, >= 1.
        seconds: length of the timed phase, > 0.
        warmup_seconds: untimed calls first, >= 0.
        batch_size: items per call, for ``items_per_s``.
        setup: a description of how the concurrency was made, recorded as is.
        clock: nanosecond clock (replaceable for tests).

    Raises:
        ConfigError: an argument out of range, or `run` a sequence of another length.
        Exception: the first error a worker raised, re-raised here.
    """
    if concurrency < 1 or seconds <= 0 or warmup_seconds < 0 or batch_size < 1:
        raise ConfigError(
            "need concurrency >= 1, seconds > 0, warmup_seconds >= 0 and batch_size >= 1; got "
            f"concurrency={concurrency}, seconds={seconds}, warmup_seconds={warmup_seconds}, "
            f"batch_size={batch_size}"
        )
    if callable(run):
        runs: list[Callable[[Any], Any]] = [run] * concurrency
    else:
        runs = list(run)
        if len(runs) != concurrency:
            raise ConfigError(
                f"got {len(runs)} run functions for concurrency {concurrency}; give one shared "
                "function or exactly one per worker"
            )
    barrier = threading.Barrier(concurrency + 1)
    samples: list[list[int]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    window: dict[str, int] = {}

    def worker(i: int) -> None:
        fn = runs[i]
        out = samples[i]
        try:
            warm_end = clock() + int(warmup_seconds * 1e9)
            fn(inputs)
            while clock() < warm_end:
                fn(inputs)
        except BaseException as e:  # reported by the caller's thread
            errors.append(e)
        barrier.wait()
        if errors:
            return
        end = window["end"]
        try:
            while True:
                start = clock()
                if start >= end:
                    break
                fn(inputs)
                out.append(clock() - start)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"edgerep-throughput-{i}", daemon=True)
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    # the timed window opens when the last worker is warm, and closes `seconds` later
    while barrier.n_waiting < concurrency and any(t.is_alive() for t in threads):
        time.sleep(0.001)
    begin = clock()
    window["end"] = begin + int(seconds * 1e9)
    barrier.wait()
    for t in threads:
        t.join()
    wall_ns = clock() - begin
    if errors:
        raise errors[0]
    pooled = [v for s in samples for v in s]
    if not pooled:
        raise ConfigError(
            f"no call finished within {seconds} s at concurrency {concurrency}; raise seconds"
        )
    wall_s = wall_ns / 1e9
    per_s = len(pooled) / wall_s
    return ThroughputResult(
        concurrency=concurrency,
        calls=len(pooled),
        seconds=wall_s,
        inferences_per_s=per_s,
        items_per_s=per_s * batch_size,
        batch_size=batch_size,
        latency=LatencyStats.from_samples_ns(pooled),
        calls_per_worker=tuple(len(s) for s in samples),
        setup=setup,
    )
