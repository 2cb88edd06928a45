"""The semantic cache shared through Redis (single server and Cluster): several processes'
caches see one another's entries, corruption is a miss, and a dead Redis means misses only."""

from __future__ import annotations

import pytest

from kvcellar import SemanticCache
from kvcellar.semantic.redis_store import RedisStore
from kvcellar.storage.redis_local import free_port, redis_available, start_redis

pytestmark = pytest.mark.skipif(
    not redis_available(), reason="redis-server is not installed (.ci/run installs it)"
)


@pytest.fixture(params=["single", "cluster"])
def url(request):
    return request.getfixturevalue(request.param).url


def _cache(embedder, url, prefix, **kw) -> SemanticCache:
    return SemanticCache(embedder=embedder, redis_url=url, redis_prefix=prefix,
                         sync_interval_s=0, **kw)


def test_two_servers_share_one_semantic_cache(embedder, url, request):
    prefix = f"t-share-{request.node.callspec.id}"
    a, b = _cache(embedder, url, prefix), _cache(embedder, url, prefix)
    try:
        eid = a.store("How do I export my contacts to CSV?", "Contacts > Export", tenant="t")
        hit = b.lookup("How can I export my contacts to CSV?", tenant="t")
        assert hit is not None and hit.entry_id == eid and hit.kind == "semantic"
        assert b.lookup("How do I export my contacts to CSV?", tenant="t").kind == "exact"
        assert b.lookup("How do I export my contacts to CSV?", tenant="other") is None
        # a third process starting later rebuilds its index from Redis
        c = _cache(embedder, url, prefix)
        assert c.lookup("How can I export my contacts to CSV?", tenant="t") is not None
        a.delete(eid)
        assert b.lookup("How can I export my contacts to CSV?", tenant="t") is None
        assert c.lookup("How do I export my contacts to CSV?", tenant="t") is None
        for i in range(3):
            a.store(f"What is {i} times {i + 2}?", str(i * (i + 2)), tenant="t")
        assert b.stats()["entries"] == 3 and b.clear(tenant="t") == 3
        assert a.lookup("What is 1 times 3?", tenant="t") is None
        c.close()
    finally:
        a.clear()
        a.close()
        b.close()


def test_corrupt_redis_entry_is_a_miss_and_deleted(embedder, single):
    sc = _cache(embedder, single.url, "t-corrupt")
    try:
        eid = sc.store("Where is the Eiffel Tower?", "In Paris.", tenant="t")
        store: RedisStore = sc.backend
        store._r.hset(store._entry(eid), "response", "In Berlin.")
        assert sc.lookup("Where is the Eiffel Tower?", tenant="t") is None
        assert sc.backend.count() == 0
    finally:
        sc.clear()
        sc.close()


def test_quota_and_ttl_on_redis(embedder, single, monkeypatch):
    import kvcellar.semantic.cache as cache_mod

    now = [2_000_000.0]
    monkeypatch.setattr(cache_mod.time, "time", lambda: now[0])
    sc = _cache(embedder, single.url, "t-quota",
                categories=[{"name": "faq", "quota": 2, "ttl_s": 50}])
    try:
        for q in ("How do I reset my password?", "How do I cancel my plan?",
                  "How do I change my email address?"):
            sc.store(q, "answer", tenant="t", category="faq")
            now[0] += 1
        assert sc.backend.count("t", "faq") == 2
        assert sc.lookup("How do I reset my password?", tenant="t") is None
        assert sc.lookup("How do I cancel my plan?", tenant="t") is not None
        now[0] += 60
        assert sc.lookup("How do I cancel my plan?", tenant="t") is None
        sc.purge_expired()  # whatever the lookup did not already drop
        assert sc.backend.count() == 0
    finally:
        sc.clear()
        sc.close()


def test_dead_redis_means_misses_then_recovers(embedder, tmp_path):
    port = free_port()
    sc = SemanticCache(embedder=embedder, redis_url=f"redis://127.0.0.1:{port}/0",
                       redis_prefix="t-dead", sync_interval_s=0)
    try:
        assert sc.store("Is the museum open on Sundays?", "Yes", tenant="t") is None
        assert sc.lookup("Is the museum open on Sundays?", tenant="t") is None
        assert sc.stats()["store_errors"] >= 1 and sc.stats()["entries"] is None
        server = start_redis(tmp_path / "late", port=port)
        try:
            assert sc.store("Is the museum open on Sundays?", "Yes", tenant="t") is not None
            assert sc.lookup("Is the museum open on Sundays?", tenant="t").response == "Yes"
        finally:
            server.stop()
    finally:
        sc.close()
