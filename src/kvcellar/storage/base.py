"""The contract every storage tier keeps. Tiers store opaque bytes under string keys.

Storage knows bytes, not tensors: frames come from :mod:`kvcellar.kv.codecs`. A tier may lose
any entry at any time (eviction, another process, a crash); callers treat a missing entry as a
miss. A tier never holds more than its byte budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class BackendStats:
    """Counters of one tier, cumulative since the backend was created (entries/bytes are current)."""

    name: str
    entries: int = 0
    used_bytes: int = 0
    budget_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    rejected_puts: int = 0
    evictions: int = 0
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A byte store with a hard budget.

    Contracts:
    - ``get(key)`` returns the exact bytes last ``put`` under ``key``, or ``None`` when absent.
      It counts a hit or a miss and refreshes the entry's recency (for LRU eviction).
    - ``put(key, value)`` stores ``value``; returns ``True`` when stored, ``False`` when refused
      (value larger than the whole budget, or the tier is unavailable). It may evict other entries
      to make room; after it returns, ``used_bytes <= budget_bytes`` holds. Putting an existing
      key replaces its value.
    - ``contains(key)`` answers without reading the value and without counting a hit/miss or
      changing recency.
    - ``delete(key)`` removes the entry if present; returns whether it was present.
    - ``keys()`` iterates over the keys present now (a snapshot; order unspecified).
    - ``clear()`` removes every entry.
    - ``stats()`` returns a fresh :class:`BackendStats`.
    - ``close()`` releases resources; the backend is not used afterwards.
    All methods are thread-safe.
    """

    name: str

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> bool: ...

    def contains(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool: ...

    def keys(self) -> Iterator[str]: ...

    def clear(self) -> None: ...

    def stats(self) -> BackendStats: ...

    def close(self) -> None: ...
