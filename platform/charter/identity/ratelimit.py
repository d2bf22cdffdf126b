"""Failed-authentication limits per client address (sliding window, per process)."""

from __future__ import annotations

import threading
import time
from collections import deque


class FailureLimiter:
    """Counts failures per key in a sliding window; a key over the limit is blocked.

    Per process: with N workers a client gets at most N x limit tries a window, which
    still ends online guessing; a shared store (Redis) can replace it behind this class.
    """

    def __init__(self, limit: int, window_s: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _trim(self, key: str, now: float) -> deque[float]:
        hits = self._hits.get(key)
        if hits is None:
            return deque()
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if not hits:
            del self._hits[key]
        return hits

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may try again, or None when it is not blocked."""
        now = time.monotonic()
        with self._lock:
            hits = self._trim(key, now)
            if len(hits) < self.limit:
                return None
            return max(0.0, hits[0] + self.window_s - now)

    def fail(self, key: str) -> bool:
        """Count a failure; True if it is the one that reached the limit (the trip)."""
        now = time.monotonic()
        with self._lock:
            if key not in self._hits and len(self._hits) >= self.max_keys:
                self._hits.pop(next(iter(self._hits)))  # bounded memory: drop the oldest
            self._trim(key, now)
            hits = self._hits.setdefault(key, deque())
            hits.append(now)
            return len(hits) == self.limit
