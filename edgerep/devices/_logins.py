"""Failed logins per client address, for the agent's 429 (see `edgerep.devices._server`)."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

__all__ = ["FailedLogins"]


class FailedLogins:
    """Failed authentications per client address in a sliding window, in bounded memory.

    An address with `limit` failures within `window_s` is refused (429) until the
    oldest of them is `window_s` old. At most `max_addresses` addresses are tracked,
    each with at most `limit` timestamps; past that the least recently failed address
    is forgotten (an attacker with that many addresses is not stopped by a per-address
    limit anyway; the token's entropy is what stops it).
    """

    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        max_addresses: int = 4096,
        clock: Any = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )
        self._warned: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._failures)

    def _recent(self, address: str, now: float) -> collections.deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            self._warned.pop(address, None)
            return None
        return times

    def retry_after_s(self, address: str) -> float:
        """Seconds until `address` may try again (0 when it is not blocked)."""
        with self._lock:
            now = self._clock()
            times = self._recent(address, now)
            if times is None or len(times) < self.limit:
                return 0.0
            return max(times[0] + self.window_s - now, 0.001)

    def failed(self, address: str) -> bool:
        """Record a failure; True when it blocks `address` (the first time in a window)."""
        with self._lock:
            now = self._clock()
            times = self._recent(address, now)
            if times is None:
                times = collections.deque(maxlen=self.limit)
                self._failures[address] = times
                while len(self._failures) > self.max_addresses:
                    gone, _ = self._failures.popitem(last=False)
                    self._warned.pop(gone, None)
            self._failures.move_to_end(address)
            times.append(now)
            if len(times) >= self.limit and address not in self._warned:
                self._warned[address] = now
                return True
            return False
