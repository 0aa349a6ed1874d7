"""A small in-process cache with a time to live, shared by a process's request threads.

The hub keeps what every request asks the database for and rarely changes (routes) for a
few seconds; a change made elsewhere takes effect in every process within that time, and
at once in the process that made it (it clears its cache).

Never for what must take effect at once everywhere: API keys are read on every request,
so a revoked or expired key is refused on its next request in every process (hub.services.keys).
"""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    """Values by key for ``ttl`` seconds (0 turns caching off); thread-safe."""

    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None or hit[0] < time.monotonic():
                self._entries.pop(key, None)
                return None
            return hit[1]

    def put(self, key: str, value: V) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # a flood of distinct keys costs a refill, not memory
            self._entries[key] = (time.monotonic() + self.ttl, value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
