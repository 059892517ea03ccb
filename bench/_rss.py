"""Peak resident memory of a block, sampled in a thread (shared by the bench scripts).

``VmHWM`` cannot be reset per block without privileges on every kernel, so the
scripts that compare several steps of one process sample ``/proc/self/statm``.
"""

from __future__ import annotations

import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """The current resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Sample the RSS every 2 ms while the block runs; ``start`` and ``peak`` in bytes."""

    def __enter__(self) -> PeakRss:
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
