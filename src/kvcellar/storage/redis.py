"""The remote tier: Redis or Redis Cluster, shared by every engine that points at it.

This is what turns a per-process cache into a cache *layer*: KV computed by one engine (another
process, another machine, a prefill worker) is loaded by another. Redis (and Redis Cluster, when
one machine's memory is not enough) is the distributed store; kvcellar adds no protocol of its
own: values are the self-describing, checksummed KV frames, keys are the engine's namespaced hex
keys under a ``kvc:`` prefix so they never collide with other users of the same database.

Remote calls are batched: ``get_many`` / ``put_many`` / ``contains_many`` send one pipeline per
call (redis-py splits a cluster pipeline by node), so a 16-chunk lookup is one round trip, not 16.

A remote tier must never fail or stall a request. Every call has a socket timeout; the first
connection error or timeout marks the tier *down* (logged once), after which calls return a miss
at once without touching the network until a back-off delay has passed (doubling up to
``retry_max_s``); then one call probes the server, and on success the tier is *up* again (logged
once). Requests meanwhile run from the local tiers and recompute what they miss.

The byte budget is Redis's own ``maxmemory`` (with its eviction policy): a shared server is sized
and evicted by its operator, not by each client. ``stats()`` reports it and the server's memory
use.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from kvcellar.errors import ConfigError
from kvcellar.storage.base import BackendStats

log = logging.getLogger(__name__)

PREFIX = "kvc:"
_SCAN_BATCH = 1000


def redis_client(url: str, timeout_s: float) -> Any:
    """A redis-py client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+cluster://``."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    parts = urlsplit(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        # No hidden retries: a failed call marks the tier down and the back-off decides when to
        # try again, so a dead server costs one timeout, not several.
        "retry": Retry(NoBackoff(), 0),
    }
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        from redis.cluster import RedisCluster

        if not parts.hostname:
            raise ConfigError(
                f"remote_url {url!r}: a cluster URL needs a host, e.g. redis+cluster://host:7000"
            )
        seed = url.replace("+cluster", "", 1)
        return RedisCluster.from_url(seed, **common)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"remote_url {url!r}: use redis://host:port/db, rediss://... or redis+cluster://host:port"
        )
    return redis.Redis.from_url(url, **common)


class RedisBackend:
    """A Backend on Redis / Redis Cluster with batched calls and a down/back-off state."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "remote",
        timeout_s: float = 1.0,
        ttl_s: float | None = None,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
    ) -> None:
        import redis

        self.name = name
        self.url = url
        self.ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self._errors_types = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._redis_error = redis.RedisError
        self._client = redis_client(url, timeout_s)
        self._cluster = "+cluster" in url.split("://", 1)[0]
        self._lock = threading.Lock()
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._down_since: float | None = None
        self._next_try = 0.0
        self._delay = retry_initial_s
        self._stats = BackendStats(name=name)
        self._counters = {"down_events": 0.0, "skipped_while_down": 0.0, "round_trips": 0.0}

    # --- health ---------------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self._down_since is None

    def _may_call(self) -> bool:
        """False while down and the back-off has not expired (then the call is skipped)."""
        with self._lock:
            if self._down_since is None or time.monotonic() >= self._next_try:
                return True
            self._counters["skipped_while_down"] += 1
            return False

    def _ok(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            down_for = time.monotonic() - self._down_since
            self._down_since = None
            self._delay = self._retry_initial
        log.warning("remote tier %s (%s) is back after %.1f s down", self.name, self.url, down_for)

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self._stats.errors += 1
            now = time.monotonic()
            newly = self._down_since is None
            if newly:
                self._down_since = now
                self._delay = self._retry_initial
                self._counters["down_events"] += 1
            else:
                self._delay = min(self._delay * 2, self._retry_max)
            self._next_try = now + self._delay
        if newly:
            log.warning(
                "remote tier %s (%s) is down (%s: %s); serving from local tiers, retrying with "
                "back-off",
                self.name,
                self.url,
                type(exc).__name__,
                exc,
            )

    def _run(self, fn: Any, default: Any, data: bool = True) -> Any:
        """Call ``fn(client)`` unless the tier is down; connection trouble marks it down.
        ``data`` calls count as round trips (stats queries do not)."""
        if not self._may_call():
            return default
        try:
            result = fn(self._client)
        except self._errors_types as exc:
            self._failed(exc)
            return default
        except self._redis_error as exc:
            # A server-side error (OOM with noeviction, READONLY replica, ...): not a dead
            # server, so stay up, but count it and give the caller a miss.
            with self._lock:
                self._stats.errors += 1
            log.debug("remote tier %s: %s", self.name, exc)
            return default
        if data:
            with self._lock:
                self._counters["round_trips"] += 1
        self._ok()
        return result

    # --- batched operations ---------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of ``keys`` (None where absent) in one round trip."""
        if not keys:
            return []

        def call(c: Any) -> list[bytes | None]:
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.get(PREFIX + k)
            return pipe.execute()

        got = self._run(call, [None] * len(keys))
        hits = sum(v is not None for v in got)
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += len(keys) - hits
        return got

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Store every ``(key, value)`` in one round trip; False for all when the tier is down."""
        if not items:
            return []

        def call(c: Any) -> list[bool]:
            pipe = c.pipeline(transaction=False)
            for k, v in items:
                pipe.set(PREFIX + k, v, px=self.ttl_ms)
            return [bool(r) for r in pipe.execute()]

        done = self._run(call, [False] * len(items))
        with self._lock:
            self._stats.puts += sum(done)
            self._stats.rejected_puts += len(done) - sum(done)
        return done

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Presence of ``keys`` in one round trip (no hit/miss counting)."""
        if not keys:
            return []

        def call(c: Any) -> list[bool]:
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.exists(PREFIX + k)
            return [bool(r) for r in pipe.execute()]

        return self._run(call, [False] * len(keys))

    # --- Backend protocol -----------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def put(self, key: str, value: bytes) -> bool:
        return self.put_many([(key, value)])[0]

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def delete(self, key: str) -> bool:
        return bool(self._run(lambda c: c.delete(PREFIX + key), 0))

    def keys(self) -> Iterator[str]:
        """Keys of kvcellar in the database (every node of a cluster)."""

        def call(c: Any) -> list[str]:
            return [
                (k.decode() if isinstance(k, bytes) else k)[len(PREFIX) :]
                for k in c.scan_iter(match=PREFIX + "*", count=_SCAN_BATCH)
            ]

        return iter(self._run(call, []))

    def clear(self) -> None:
        """Delete kvcellar's keys only (the database may be shared with other data)."""
        keys = list(self.keys())
        for i in range(0, len(keys), _SCAN_BATCH):
            part = keys[i : i + _SCAN_BATCH]

            def call(c: Any, part: list[str] = part) -> None:
                pipe = c.pipeline(transaction=False)
                for k in part:
                    pipe.delete(PREFIX + k)
                pipe.execute()

            self._run(call, None)

    def stats(self) -> BackendStats:
        def call(c: Any) -> tuple[int, int, int]:
            if self._cluster:  # one answer per master, summed
                every = {"target_nodes": c.PRIMARIES}
                sizes = c.dbsize(**every)
                entries = sum(sizes.values()) if isinstance(sizes, dict) else int(sizes)
                mems = list(c.info("memory", **every).values())
            else:
                entries, mems = int(c.dbsize()), [c.info("memory")]
            used = sum(int(m.get("used_memory", 0)) for m in mems)
            budget = sum(int(m.get("maxmemory", 0)) for m in mems)
            return entries, used, budget

        entries, used, budget = self._run(call, (0, 0, 0), data=False)
        with self._lock:
            s = BackendStats(**{**vars(self._stats), "extra": {}})
            s.entries, s.used_bytes, s.budget_bytes = entries, used, budget
            s.extra = {**self._counters, "up": float(self._down_since is None)}
        return s

    def close(self) -> None:
        with contextlib.suppress(self._redis_error):  # closing a dead connection
            self._client.close()
