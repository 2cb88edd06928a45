"""The fastest tier: KV frames held as ``bytes`` in this process, under a hard byte budget.

Values are immutable ``bytes``, so ``get`` hands out the stored object itself: a hit costs no
copy, which is the whole point of the memory tier (load time is then bounded by decoding, not by
a memcpy of the frame). Recency is kept by an ``OrderedDict`` (least recent first), so eviction and
promotion are O(1).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace

from kvcellar.policies.pins import PinTable
from kvcellar.storage.base import BackendStats

logger = logging.getLogger(__name__)


class MemoryBackend:
    """In-process LRU byte store; see :class:`kvcellar.storage.base.Backend` for the contract.

    A refused ``put`` (value larger than the budget, or budget 0) also drops any older value
    stored under the same key: otherwise a later ``get`` would return bytes the caller has
    already replaced, and the tier would silently serve a stale value.
    """

    def __init__(
        self, budget_bytes: int, name: str = "memory", pins: PinTable | None = None
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(
                f"budget_bytes must be >= 0 (got {budget_bytes}); use 0 to disable the memory tier"
            )
        self.name = name
        self._budget = int(budget_bytes)
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._stats = BackendStats(name=name, budget_bytes=self._budget)  # cumulative counters
        self._pins = pins

    @property
    def budget_bytes(self) -> int:
        """The hard limit on the sum of stored value sizes."""
        return self._budget

    def get(self, key: str) -> bytes | None:
        """The stored object itself (no copy; bytes are immutable), refreshing its recency."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self._stats.misses += 1
                return None
            self._data.move_to_end(key)
            self._stats.hits += 1
            return value

    def put(self, key: str, value: bytes) -> bool:
        """Store ``value``, evicting least recently used entries to make room."""
        size = len(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._used -= len(old)
            victims = self._victims(self._used + size - self._budget)
            if self._budget == 0 or size > self._budget or victims is None:
                # Never evict for a value that cannot fit anyway; drop the stale old value.
                self._stats.rejected_puts += 1
                logger.debug(
                    "%s: refused %d bytes for %s (budget %d)", self.name, size, key, self._budget
                )
                return False
            for victim in victims:
                self._used -= len(self._data.pop(victim))
                self._stats.evictions += 1
            self._data[key] = value
            self._used += size
            self._stats.puts += 1
            return True

    def _victims(self, need: int) -> list[str] | None:
        """Least recently used unpinned keys freeing ``need`` bytes; None if they cannot."""
        victims: list[str] = []
        for key, value in self._data.items():
            if need <= 0:
                break
            if self._pins is not None and self._pins.is_pinned(key):
                continue
            victims.append(key)
            need -= len(value)
        return victims if need <= 0 else None

    def contains(self, key: str) -> bool:
        """Presence only: lookups of whole prefixes must not disturb the LRU order."""
        with self._lock:
            return key in self._data

    def delete(self, key: str) -> bool:
        """Remove ``key``; returns whether it was present."""
        with self._lock:
            value = self._data.pop(key, None)
            if value is None:
                return False
            self._used -= len(value)
            return True

    def keys(self) -> Iterator[str]:
        """A snapshot, so callers may mutate the backend while iterating."""
        with self._lock:
            snapshot = list(self._data)
        return iter(snapshot)

    def clear(self) -> None:
        """Drop every entry (counters are cumulative and stay)."""
        with self._lock:
            self._data.clear()
            self._used = 0

    def stats(self) -> BackendStats:
        """A fresh snapshot of the counters."""
        with self._lock:
            return replace(self._stats, entries=len(self._data), used_bytes=self._used)

    def close(self) -> None:
        """Release the held frames now rather than when the object is collected."""
        self.clear()
