"""Several tiers behaving as one store: read-through with promotion, write-through/write-back.

Tiers are ordered fastest first (memory, disk, Redis). A hit in a slow tier is copied into every
faster tier, so the next load of the same chunk is paid at memory speed. Writes go to every tier
so a restart (memory lost) or another instance (sharing disk or Redis) still finds the chunk.

Only the first tier is written on the request's thread. With ``write_back > 0`` the slower tiers
are written by a background thread from a bounded queue, so a slow disk or a remote Redis never
adds to a request's latency; when the queue is full the write is dropped and counted (the chunk
is still in the first tier, and the next request that misses it stores it again). ``flush()``
waits until everything queued is written (a prefill worker calls it before handing off).

Lookups and loads are batched per tier (``contains_many`` / ``get_many`` when a backend has
them): one call per tier, which for Redis is one round trip per tier, not one per chunk.

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
import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

from kvcellar.storage.base import Backend, BackendStats

logger = logging.getLogger(__name__)

T = TypeVar("T")
_BATCH = 64  # queued writes handed to one tier in one put_many call


def contains_many(tier: Backend, keys: Sequence[str]) -> list[bool]:
    """``tier.contains_many`` when the backend batches, else one ``contains`` per key."""
    batched = getattr(tier, "contains_many", None)
    return list(batched(keys)) if batched else [tier.contains(k) for k in keys]


def get_many(tier: Backend, keys: Sequence[str]) -> list[bytes | None]:
    batched = getattr(tier, "get_many", None)
    return list(batched(keys)) if batched else [tier.get(k) for k in keys]


def put_many(tier: Backend, items: Sequence[tuple[str, bytes]]) -> list[bool]:
    batched = getattr(tier, "put_many", None)
    return list(batched(items)) if batched else [tier.put(k, v) for k, v in items]


def _stop_worker(q: queue.Queue, worker: threading.Thread) -> None:
    if worker.is_alive():
        q.put(None)  # after everything queued: the worker writes it all, then ends
        worker.join()


class TieredStore:
    """A list of :class:`~kvcellar.storage.base.Backend` tiers used as one cache."""

    def __init__(self, tiers: Sequence[Backend], write_back: int = 0) -> None:
        self._tiers: tuple[Backend, ...] = tuple(tiers)
        self._lock = threading.Lock()
        self._errors = [0] * len(self._tiers)
        self._failing = [False] * len(self._tiers)
        self._promotions = [0] * len(self._tiers)
        self._dropped = [0] * len(self._tiers)
        self._queue: queue.Queue[tuple[int, str, bytes] | None] | None = None
        self._worker: threading.Thread | None = None
        if write_back > 0 and len(self._tiers) > 1:
            self._queue = queue.Queue(maxsize=write_back)
            self._worker = threading.Thread(
                target=self._write_back_loop, name="kvcellar-write-back", daemon=True
            )
            self._worker.start()
            # Queued writes are not lost when a process ends without close(): drain at exit.
            self._stop_worker = weakref.finalize(self, _stop_worker, self._queue, self._worker)

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

    # --- write-back ------------------------------------------------------------------------------
    def _write(self, i: int, key: str, value: bytes) -> bool:
        """Write one tier now (tier 0, or no queue) or queue it; False when refused/dropped."""
        if i == 0 or self._queue is None:
            return self._call(i, "put", partial(self._tiers[i].put, key, value), False)
        try:
            self._queue.put_nowait((i, key, value))
        except queue.Full:
            with self._lock:
                self._dropped[i] += 1
            return False
        return True

    def _write_back_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                per_tier: dict[int, list[tuple[str, bytes]]] = {}
                for entry in batch:
                    if entry is not None:
                        per_tier.setdefault(entry[0], []).append((entry[1], entry[2]))
                for i, items in per_tier.items():
                    self._call(i, "put", partial(put_many, self._tiers[i], items), [])
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def flush(self) -> None:
        """Wait until every queued write has reached its tier."""
        if self._queue is not None:
            self._queue.join()

    def pending_writes(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # --- reads ------------------------------------------------------------------------------------
    def _promote(self, key: str, value: bytes, found_in: int) -> None:
        for j in range(found_in):
            if self._write(j, key, value):
                with self._lock:
                    self._promotions[j] += 1

    def get(self, key: str) -> tuple[bytes, int] | None:
        """``(value, index of the tier that had it)``, promoting the value into faster tiers."""
        for i, tier in enumerate(self._tiers):
            value = self._call(i, "get", partial(tier.get, key), None)
            if value is None:
                continue
            self._promote(key, value, i)
            return value, i
        return None

    def where(self, keys: Sequence[str]) -> list[int | None]:
        """For each key, the fastest tier holding it (None: no tier); one batched call per tier."""
        found: list[int | None] = [None] * len(keys)
        for i, tier in enumerate(self._tiers):
            todo = [j for j, f in enumerate(found) if f is None]
            if not todo:
                break
            asked = [keys[j] for j in todo]
            res = self._call(
                i, "contains", partial(contains_many, tier, asked), [False] * len(todo)
            )
            for j, present in zip(todo, res, strict=True):
                if present:
                    found[j] = i
        return found

    def get_prefix(self, keys: Sequence[str]) -> list[tuple[bytes, int]]:
        """``(value, tier index)`` of the longest run of leading ``keys`` present, loaded with one
        batched call per tier and promoted into faster tiers. Keys form a hash chain, so nothing
        after the first absent key is loaded."""
        where = self.where(keys)
        n = next((j for j, w in enumerate(where) if w is None), len(keys))
        values: list[bytes | None] = [None] * n
        for i, tier in enumerate(self._tiers):
            idx = [j for j in range(n) if where[j] == i]
            if not idx:
                continue
            asked = [keys[j] for j in idx]
            got = self._call(i, "get", partial(get_many, tier, asked), [None] * len(idx))
            for j, v in zip(idx, got, strict=True):
                values[j] = v
        out: list[tuple[bytes, int]] = []
        for j in range(n):
            v = values[j]
            if v is None:  # evicted between the two calls: the prefix ends here
                break
            tier_index = where[j]
            assert tier_index is not None
            self._promote(keys[j], v, tier_index)
            out.append((v, tier_index))
        return out

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
            if self._write(i, key, value):
                accepted.append(i)
        return accepted

    def contains(self, key: str) -> bool:
        """Whether some tier has ``key``, without counting hits or changing recency."""
        return any(
            self._call(i, "contains", partial(tier.contains, key), False)
            for i, tier in enumerate(self._tiers)
        )

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether some tier holds each key (one batched call per tier)."""
        return [w is not None for w in self.where(keys)]

    def contains_prefix(self, keys: Sequence[str]) -> int:
        """Number of leading ``keys`` present in some tier.

        Keys form a hash chain, so chunk i is only usable if chunks 0..i-1 are too: the first
        absent key ends the reusable prefix.
        """
        return next((j for j, w in enumerate(self.where(keys)) if w is None), len(keys))

    def contains_prefix_per_tier(self, keys: Sequence[str]) -> dict[str, int]:
        """For each tier alone, the number of leading ``keys`` it holds."""
        out: dict[str, int] = {}
        for i, tier in enumerate(self._tiers):
            res = self._call(i, "contains", partial(contains_many, tier, keys), [False] * len(keys))
            out[self._tier_name(i)] = next((j for j, r in enumerate(res) if not r), len(keys))
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
            with self._lock:
                dropped = self._dropped[i]
            s = replace(
                s,
                errors=s.errors + errors,
                extra={
                    **s.extra,
                    "failing": float(failing),
                    "promotions": float(promotions),
                    "write_back_dropped": float(dropped),
                },
            )
            out.append(s)
        return out

    def close(self) -> None:
        """Write what is queued, then close every tier (one failing does not keep others open)."""
        if self._queue is not None:
            self._stop_worker()
        for i, tier in enumerate(self._tiers):
            self._call(i, "close", tier.close, None)
