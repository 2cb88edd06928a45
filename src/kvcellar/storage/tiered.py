"""Several tiers behaving as one store: read-through with promotion, write-through.

Tiers are ordered fastest first (memory, disk, Redis). A hit in a slow tier is copied into every
faster tier, so the next load of the same chunk is paid at memory speed. Writes go to every tier
so a restart (memory lost) or another instance (sharing disk or Redis) still finds the chunk.

Each tier may hold a different encoding of the same entry (``put_tiers``: e.g. raw frames in
memory, 4-bit frames on disk). A promoted value is copied *as is*: storage knows bytes, not
codecs, and KV frames are self-describing, so the faster tier then serves the slower tier's
encoding (the engine reports the codec of every frame it serves). Re-encoding on promotion would
cost an encode on the hit path and could not restore what a lossy codec dropped.

A failing tier (Redis down, disk unmounted) must never fail a request: its exceptions are caught,
counted in its ``errors`` and logged once when it starts failing and once when it recovers, not on
every call (a dead Redis would otherwise flood the log on every chunk lookup).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

from kvcellar.storage.base import Backend, BackendStats

logger = logging.getLogger(__name__)

T = TypeVar("T")


class TieredStore:
    """A list of :class:`~kvcellar.storage.base.Backend` tiers used as one cache."""

    def __init__(self, tiers: Sequence[Backend]) -> None:
        self._tiers: tuple[Backend, ...] = tuple(tiers)
        self._lock = threading.Lock()
        self._errors = [0] * len(self._tiers)
        self._failing = [False] * len(self._tiers)
        self._promotions = [0] * len(self._tiers)

    @property
    def tiers(self) -> tuple[Backend, ...]:
        """The tiers, fastest first (a tuple: the order is fixed at construction)."""
        return self._tiers

    def _tier_name(self, i: int) -> str:
        return str(getattr(self._tiers[i], "name", f"tier{i}"))

    def _call(self, i: int, op: str, fn: Callable[[], T], default: T) -> T:
        """Run one tier operation; on an exception count it, log on state change, return default."""
        try:
            result = fn()
        except Exception as exc:
            with self._lock:
                self._errors[i] += 1
                newly_failing = not self._failing[i]
                self._failing[i] = True
            if newly_failing:
                logger.warning(
                    "storage tier %s failed in %s (%s: %s); skipping it until it recovers",
                    self._tier_name(i),
                    op,
                    type(exc).__name__,
                    exc,
                )
            return default
        if self._failing[i]:
            with self._lock:
                recovered = self._failing[i]
                self._failing[i] = False
            if recovered:
                logger.info("storage tier %s works again (%s succeeded)", self._tier_name(i), op)
        return result

    def get(self, key: str) -> tuple[bytes, int] | None:
        """``(value, index of the tier that had it)``, promoting the value into faster tiers."""
        for i, tier in enumerate(self._tiers):
            value = self._call(i, "get", partial(tier.get, key), None)
            if value is None:
                continue
            for j in range(i):
                faster = self._tiers[j]
                if self._call(j, "put", partial(faster.put, key, value), False):
                    with self._lock:
                        self._promotions[j] += 1
            return value, i
        return None

    def put(self, key: str, value: bytes) -> int:
        """Write through to every tier; returns how many accepted (0: nothing cached)."""
        return len(self.put_tiers(key, dict.fromkeys(range(len(self._tiers)), value)))

    def put_tiers(self, key: str, values: Mapping[int, bytes]) -> list[int]:
        """Write ``values[i]`` into tier ``i`` (tiers not in ``values`` are left alone); returns
        the indices of the tiers that accepted."""
        accepted = []
        for i, value in sorted(values.items()):
            if not 0 <= i < len(self._tiers):
                raise IndexError(f"no tier {i} (this store has {len(self._tiers)})")
            if self._call(i, "put", partial(self._tiers[i].put, key, value), False):
                accepted.append(i)
        return accepted

    def contains(self, key: str) -> bool:
        """Whether some tier has ``key``, without counting hits or changing recency."""
        return any(
            self._call(i, "contains", partial(tier.contains, key), False)
            for i, tier in enumerate(self._tiers)
        )

    def contains_prefix(self, keys: Sequence[str]) -> int:
        """Number of leading ``keys`` present in some tier.

        Keys form a hash chain, so chunk i is only usable if chunks 0..i-1 are too: the first
        absent key ends the reusable prefix and later keys are not even asked for.
        """
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    def contains_prefix_per_tier(self, keys: Sequence[str]) -> dict[str, int]:
        """For each tier alone, the number of leading ``keys`` it holds."""
        out: dict[str, int] = {}
        for i, tier in enumerate(self._tiers):
            n = 0
            for key in keys:
                if not self._call(i, "contains", partial(tier.contains, key), False):
                    break
                n += 1
            out[self._tier_name(i)] = n
        return out

    def delete_prefix(self, prefix: str, tier: str | None = None) -> int:
        """Delete every key starting with ``prefix`` (in the tier named ``tier``, or all);
        returns how many entries were deleted."""
        deleted = 0
        for i, t in enumerate(self._tiers):
            if tier is not None and self._tier_name(i) != tier:
                continue
            for key in self._call(i, "keys", lambda t=t: list(t.keys()), []):
                if key.startswith(prefix) and self._call(
                    i, "delete", partial(t.delete, key), False
                ):
                    deleted += 1
        return deleted

    def clear_tier(self, name: str) -> None:
        """Clear the tier called ``name``; unknown names raise ValueError."""
        for i, tier in enumerate(self._tiers):
            if self._tier_name(i) == name:
                self._call(i, "clear", tier.clear, None)
                return
        known = ", ".join(self._tier_name(i) for i in range(len(self._tiers))) or "none"
        raise ValueError(f"no tier named {name!r} (tiers: {known})")

    def delete(self, key: str) -> bool:
        """Delete from every tier (all of them: a copy left anywhere would be served again)."""
        present = False
        for i, tier in enumerate(self._tiers):
            present = self._call(i, "delete", partial(tier.delete, key), False) or present
        return present

    def clear(self) -> None:
        """Clear every tier."""
        for i, tier in enumerate(self._tiers):
            self._call(i, "clear", tier.clear, None)

    def stats(self) -> list[BackendStats]:
        """Stats per tier, with the exceptions this store caught added to each tier's ``errors``.

        A tier whose own ``stats()`` raises is reported by name with only the store's counters
        and ``extra["failing"] = 1``, so metrics still show it.
        """
        out: list[BackendStats] = []
        for i, tier in enumerate(self._tiers):
            s = self._call(i, "stats", tier.stats, None)
            with self._lock:
                errors, failing, promotions = (
                    self._errors[i],
                    self._failing[i],
                    self._promotions[i],
                )
            if s is None:
                s = BackendStats(name=self._tier_name(i))
            s = replace(
                s,
                errors=s.errors + errors,
                extra={**s.extra, "failing": float(failing), "promotions": float(promotions)},
            )
            out.append(s)
        return out

    def close(self) -> None:
        """Close every tier; one failing to close does not keep the others open."""
        for i, tier in enumerate(self._tiers):
            self._call(i, "close", tier.close, None)
