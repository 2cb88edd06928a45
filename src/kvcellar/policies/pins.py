"""TTL pins (the Continuum idea): keep a prefix's chunks out of eviction for a while.

An agent that pauses for a tool call comes back with the same prefix a few seconds later; pinning
its chunks for the expected pause keeps them from being evicted by other traffic meanwhile.
Pinned bytes still count against a tier's budget: a put that could only fit by evicting pinned
chunks is refused instead.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable


class PinTable:
    """Key -> expiry time (monotonic seconds; ``inf`` = until unpinned). Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def pin(self, keys: Iterable[str], ttl_s: float | None = None) -> int:
        """Pin ``keys`` for ``ttl_s`` seconds (None: until unpinned); extends, never shortens."""
        if ttl_s is not None and (ttl_s <= 0 or math.isnan(ttl_s)):
            raise ValueError("ttl_s must be positive (or None for no expiry)")
        until = math.inf if ttl_s is None else self._clock() + ttl_s
        n = 0
        with self._lock:
            for key in keys:
                self._until[key] = max(self._until.get(key, -math.inf), until)
                n += 1
        return n

    def unpin(self, keys: Iterable[str]) -> int:
        with self._lock:
            return sum(self._until.pop(key, None) is not None for key in keys)

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return False
            if until <= self._clock():
                del self._until[key]
                return False
            return True

    def count(self) -> int:
        """Live pins (expired ones are dropped)."""
        now = self._clock()
        with self._lock:
            for key in [k for k, u in self._until.items() if u <= now]:
                del self._until[key]
            return len(self._until)
