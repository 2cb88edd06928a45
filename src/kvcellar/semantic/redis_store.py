"""Semantic-cache entries in Redis, shared by every server pointed at the same URL.

Redis is the source of truth; each process keeps its own HNSW indexes and follows a Redis
stream of additions and deletions to pick up the other processes' entries. All keys carry one
hash tag, so the multi-key bookkeeping (sorted sets for LRU, expiry and exact-match pointers)
also works on Redis Cluster. Any Redis failure surfaces as StorageError; the cache treats it as
a miss, never as an answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from kvcellar.errors import StorageError
from kvcellar.semantic.store import Entry
from kvcellar.storage.redis import redis_client

_FIELDS = ("namespace", "tenant", "category", "exact_key", "query", "context", "response",
           "vector", "index_vector", "context_vectors", "dim", "created", "expires", "last_used",
           "hits", "min_similarity", "observations", "checksum")


_DEL_IF_EQUAL = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                 "return redis.call('del', KEYS[1]) end return 0")


class RedisStore:
    def __init__(self, url: str, prefix: str = "kvcellar:sem", timeout_s: float = 2.0,
                 stream_maxlen: int = 100_000) -> None:
        self._r = redis_client(url, timeout_s)
        self._p = "{" + prefix + "}"
        self._maxlen = stream_maxlen

    # ---- key names ---------------------------------------------------------------------------
    def _entry(self, eid: int) -> str:
        return f"{self._p}:e:{eid}"

    def _exact(self, namespace: str, exact_key: str) -> str:
        return f"{self._p}:x:{namespace}:{exact_key}"

    def _tenant(self, tenant: str) -> str:
        return f"{self._p}:t:{tenant}"

    def _category(self, tenant: str, category: str | None) -> str:
        return f"{self._p}:c:{tenant}:{category or ''}"

    @property
    def _tenants(self) -> str:
        return f"{self._p}:tenants"

    @property
    def _expiry(self) -> str:
        return f"{self._p}:exp"

    @property
    def _log(self) -> str:
        return f"{self._p}:log"

    def _call(self, fn, *args, **kwargs) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StorageError(f"semantic cache Redis failed: {exc}") from exc

    # ---- entries -----------------------------------------------------------------------------
    def put(self, entry: Entry) -> None:
        entry.checksum = entry.compute_checksum()
        self._call(self._put_many, [entry])

    def put_many(self, entries: list[Entry]) -> None:
        for e in entries:
            e.checksum = e.compute_checksum()
        self._call(self._put_many, entries)

    def _put_many(self, entries: list[Entry]) -> None:
        pipe = self._r.pipeline(transaction=False)
        for e in entries:
            mapping = {
                "namespace": e.namespace, "tenant": e.tenant, "category": e.category or "",
                "exact_key": e.exact_key, "query": e.query, "context": json.dumps(e.context),
                "response": e.response, "vector": _f32(e.vector),
                "index_vector": _f32(e.index_vector),
                "context_vectors": _f32(e.context_vectors) if e.context_vectors is not None else b"",
                "dim": int(e.vector.shape[-1]), "created": e.created,
                "expires": e.expires if e.expires is not None else "",
                "last_used": e.last_used, "hits": e.hits, "min_similarity": e.min_similarity,
                "observations": json.dumps(e.observations), "checksum": e.checksum,
            }
            pipe.hset(self._entry(e.id), mapping=mapping)
            pipe.set(self._exact(e.namespace, e.exact_key), e.id)
            pipe.zadd(self._tenant(e.tenant), {e.id: e.last_used})
            pipe.zadd(self._category(e.tenant, e.category), {e.id: e.last_used})
            pipe.sadd(self._tenants, e.tenant)
            if e.expires is not None:
                pipe.zadd(self._expiry, {e.id: e.expires})
            pipe.xadd(self._log, {"op": "add", "id": e.id}, maxlen=self._maxlen, approximate=True)
        pipe.execute()

    def _decode(self, eid: int, raw: dict[bytes, bytes]) -> Entry | None:
        try:
            f = {k.decode(): v for k, v in raw.items()}
            dim = int(f["dim"])
            text = {k: f[k].decode() for k in ("namespace", "tenant", "category", "exact_key",
                                                "query", "context", "response", "expires",
                                                "observations", "checksum")}
            ctx = f["context_vectors"]
            return Entry(
                id=eid, namespace=text["namespace"], tenant=text["tenant"],
                category=text["category"] or None, exact_key=text["exact_key"],
                query=text["query"], context=json.loads(text["context"]),
                response=text["response"],
                vector=np.frombuffer(f["vector"], dtype=np.float32).reshape(dim),
                index_vector=np.frombuffer(f["index_vector"], dtype=np.float32).reshape(dim),
                context_vectors=np.frombuffer(ctx, dtype=np.float32).reshape(-1, dim) if ctx
                else None,
                created=float(f["created"]),
                expires=float(text["expires"]) if text["expires"] else None,
                last_used=float(f["last_used"]), hits=int(f["hits"]),
                min_similarity=float(f["min_similarity"]),
                observations=[(float(s), bool(c)) for s, c in json.loads(text["observations"])],
                checksum=text["checksum"],
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def get(self, entry_id: int) -> Entry | None:
        raw = self._call(self._r.hgetall, self._entry(entry_id))
        if not raw:
            return None
        entry = self._decode(entry_id, raw)
        if entry is None or not entry.is_intact():
            self.delete([entry_id])  # corrupt: a miss, and gone
            return None
        return entry

    def find_exact(self, namespace: str, exact_key: str) -> Entry | None:
        eid = self._call(self._r.get, self._exact(namespace, exact_key))
        return self.get(int(eid)) if eid is not None else None

    def delete(self, entry_ids: Iterable[int]) -> dict[int, str]:
        """Removes the entries; returns id -> index namespace of those that were there."""
        ids = [int(i) for i in entry_ids]
        if not ids:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for eid in ids:
            pipe.hmget(self._entry(eid), "namespace", "exact_key", "tenant", "category")
        heads = self._call(pipe.execute)
        pipe = self._r.pipeline(transaction=False)
        removed: dict[int, str] = {}
        pointers: list[tuple[str, int]] = []
        for eid, (ns, exact_key, tenant, category) in zip(ids, heads, strict=True):
            pipe.delete(self._entry(eid))
            pipe.zrem(self._expiry, eid)
            if tenant is not None:
                tenant_s = tenant.decode()
                pipe.zrem(self._tenant(tenant_s), eid)
                pipe.zrem(self._category(tenant_s, category.decode() or None if category else None),
                          eid)
            if ns is not None:
                removed[eid] = ns.decode()
                if exact_key is not None:
                    pointers.append((self._exact(removed[eid], exact_key.decode()), eid))
            pipe.xadd(self._log, {"op": "del", "id": eid}, maxlen=self._maxlen, approximate=True)
        self._call(pipe.execute)
        for key, eid in pointers:  # only if it still points here: a newer answer may own it
            self._call(self._r.eval, _DEL_IF_EQUAL, 1, key, str(eid))
        return removed

    def ids(self, tenant: str | None = None, category: str | None = None) -> list[int]:
        tenants = [tenant] if tenant is not None else [
            t.decode() for t in self._call(self._r.smembers, self._tenants)]
        out: list[int] = []
        for t in tenants:
            key = self._tenant(t) if category is None else self._category(t, category)
            out += [int(x) for x in self._call(self._r.zrange, key, 0, -1)]
        return out

    def count(self, tenant: str | None = None, category: str | None = None) -> int:
        if tenant is None:
            return len(self.ids(None, category))
        key = self._tenant(tenant) if category is None else self._category(tenant, category)
        return int(self._call(self._r.zcard, key))

    def lru(self, tenant: str, category: str | None, n: int) -> list[int]:
        if n <= 0:
            return []
        key = self._tenant(tenant) if category is None else self._category(tenant, category)
        return [int(x) for x in self._call(self._r.zrange, key, 0, n - 1)]

    def expired(self, now: float, limit: int = 1000) -> list[int]:
        return [int(x) for x in self._call(
            self._r.zrangebyscore, self._expiry, "-inf", now, start=0, num=limit)]

    def touch(self, entry_id: int, now: float) -> None:
        head = self._call(self._r.hmget, self._entry(entry_id), "tenant", "category")
        if head[0] is None:
            return
        tenant, category = head[0].decode(), (head[1].decode() or None) if head[1] else None
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(self._entry(entry_id), "last_used", now)
        pipe.hincrby(self._entry(entry_id), "hits", 1)
        pipe.zadd(self._tenant(tenant), {entry_id: now}, xx=True)
        pipe.zadd(self._category(tenant, category), {entry_id: now}, xx=True)
        self._call(pipe.execute)

    def update_feedback(self, entry_id: int, min_similarity: float,
                        observations: list[tuple[float, bool]]) -> None:
        if self._call(self._r.exists, self._entry(entry_id)):
            self._call(self._r.hset, self._entry(entry_id), mapping={
                "min_similarity": min_similarity, "observations": json.dumps(observations)})

    def iter_index_rows(self) -> Iterator[tuple[str, int, np.ndarray]]:
        for eid in self.ids():
            ns, vec, dim = self._call(self._r.hmget, self._entry(eid), "namespace",
                                      "index_vector", "dim")
            if ns is not None and vec is not None:
                yield ns.decode(), eid, np.frombuffer(vec, dtype=np.float32).reshape(int(dim))

    def changes(self, cursor: Any) -> tuple[list[tuple[str, int]], Any]:
        """Stream records after `cursor` (a stream id; None: the current end)."""
        if cursor is None:
            last = self._call(self._r.xrevrange, self._log, count=1)
            return [], last[0][0] if last else b"0-0"
        records = self._call(self._r.xrange, self._log, min=b"(" + _b(cursor), count=10_000)
        if not records:
            return [], cursor
        events = [(f[b"op"].decode(), int(f[b"id"])) for _, f in records]
        return events, records[-1][0]

    def close(self) -> None:
        self._r.close()


def _f32(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
