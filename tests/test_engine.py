"""CacheEngine on synthetic KV: lookup without loading, longest-prefix retrieve, store-once."""

from __future__ import annotations

import threading
import time

import torch

from kvcellar.kv import codecs
from kvcellar.kv.chunk import KVChunk
from kvcellar.kv.engine import CacheEngine
from kvcellar.models.fairlock import FairLock
from kvcellar.policies.pins import PinTable
from kvcellar.storage.disk import DiskBackend
from kvcellar.storage.memory import MemoryBackend
from kvcellar.storage.tiered import TieredStore

L, H, D = 3, 2, 4
CHUNK = 8
FP = "m|x|float32|L3H2D4"


def kv_for(tokens: list[int]) -> torch.Tensor:
    """KV that is a pure function of (position, token), so any mix-up shows in the values."""
    t = torch.tensor(tokens, dtype=torch.float32)
    pos = torch.arange(len(tokens), dtype=torch.float32)
    base = (t * 1000 + pos).view(1, 1, 1, -1, 1)
    return base.expand(L, 2, H, len(tokens), D).clone()


def make_engine(tmp_path=None, tenant="t1", partial=False, mem=10**6) -> CacheEngine:
    tiers = [MemoryBackend(mem)]
    if tmp_path is not None:
        tiers.append(DiskBackend(tmp_path / "disk", 10**6))
    return CacheEngine(TieredStore(tiers), FP, tenant, CHUNK, partial)


def test_store_then_lookup_and_retrieve_longest_prefix():
    eng = make_engine()
    tokens = list(range(1, 30))  # 3 full chunks + 5
    assert eng.lookup(tokens) == 0
    assert eng.store(tokens, kv_for(tokens)) == 3
    assert eng.store(tokens, kv_for(tokens)) == 0  # nothing new
    assert eng.lookup(tokens) == 24
    longer = tokens + [99] * 20
    assert eng.lookup(longer) == 24
    kv, n = eng.retrieve(longer)
    assert n == 24 and torch.equal(kv, kv_for(tokens)[:, :, :, :24])
    diverging = tokens[:10] + [7] * 20
    kv, n = eng.retrieve(diverging)
    assert n == 8 and torch.equal(kv, kv_for(tokens)[:, :, :, :8])
    assert eng.retrieve([5, 4, 3]) == (None, 0)


def test_store_copies_only_missing_chunks():
    eng = make_engine()
    tokens = list(range(100, 140))
    eng.store(tokens[:16], kv_for(tokens[:16]))
    asked: list[tuple[int, int]] = []

    def source(s: int, e: int) -> torch.Tensor:
        asked.append((s, e))
        return kv_for(tokens)[:, :, :, s:e]

    assert eng.store(tokens, source) == 3
    assert asked == [(16, 24), (24, 32), (32, 40)]


def test_partial_chunks_only_when_enabled():
    tokens = list(range(1, 13))
    off = make_engine()
    off.store(tokens, kv_for(tokens))
    assert off.lookup(tokens) == 8
    on = make_engine(partial=True)
    on.store(tokens, kv_for(tokens))
    assert on.lookup(tokens) == 12
    assert on.retrieve(tokens)[1] == 12


def test_tenants_do_not_share(tmp_path):
    a = make_engine(tmp_path, tenant="a")
    tokens = list(range(50))
    a.store(tokens, kv_for(tokens))
    b = a.for_tenant("b")
    assert b.lookup(tokens) == 0 and b.retrieve(tokens) == (None, 0)


def test_disk_hit_is_promoted_to_memory(tmp_path):
    eng = make_engine(tmp_path)
    tokens = list(range(16))
    eng.store(tokens, kv_for(tokens))
    eng.storage.tiers[0].clear()  # as after a restart: memory empty, disk full
    res = eng.retrieve_detailed(tokens)
    assert res.chunk_tiers == ["disk", "disk"] and res.n_tokens == 16
    assert eng.retrieve_detailed(tokens).chunk_tiers == ["memory", "memory"]


def test_budget_too_small_means_misses_not_errors():
    eng = make_engine(mem=100)  # smaller than one frame
    tokens = list(range(16))
    assert eng.store(tokens, kv_for(tokens)) == 0
    assert eng.retrieve(tokens) == (None, 0)


def test_concurrent_store_and_retrieve_never_mix_up():
    eng = make_engine(mem=40_000)  # small: evictions happen while threads read
    failures: list[str] = []

    def worker(seed: int) -> None:
        for i in range(40):
            tokens = [seed * 10_000 + (i % 5) * 100 + j for j in range(24)]
            eng.store(tokens, kv_for(tokens))
            kv, n = eng.retrieve(tokens)
            if n and not torch.equal(kv, kv_for(tokens)[:, :, :, :n]):
                failures.append(f"wrong KV for seed {seed} i {i}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    st = eng.stats()
    assert st["tiers"][0]["used_bytes"] <= 40_000 and st["engine"]["stored_chunks"] > 0


def test_pinned_chunks_survive_pressure_and_expire():
    clock = [0.0]
    pins = PinTable(clock=lambda: clock[0])
    frame = len(
        codecs.encode(KVChunk(kv_for(list(range(8))), tuple(range(8))), codecs.get_codec("raw"))
    )
    eng = CacheEngine(TieredStore([MemoryBackend(3 * frame, pins=pins)]), FP, "t", CHUNK, pins=pins)
    agent = list(range(1000, 1016))  # 2 chunks
    eng.store(agent, kv_for(agent))
    assert eng.pin(agent, ttl_s=30) == 16
    for i in range(5):  # other traffic that would evict the agent's prefix under plain LRU
        other = [i * 100 + j for j in range(8)]
        eng.store(other, kv_for(other))
    assert eng.lookup(agent) == 16
    assert eng.stats()["engine"]["pinned_chunks"] == 2
    clock[0] = 31.0  # the pause is over: the pins lapse and LRU applies again
    for i in range(5, 8):
        other = [i * 100 + j for j in range(8)]
        eng.store(other, kv_for(other))
    assert eng.lookup(agent) == 0


def test_put_refused_when_only_pinned_entries_could_make_room():
    pins = PinTable()
    mem = MemoryBackend(100, pins=pins)
    mem.put("a", b"x" * 60)
    pins.pin(["a"])
    assert not mem.put("b", b"y" * 60)
    assert mem.get("a") == b"x" * 60 and mem.stats().used_bytes == 60
    assert pins.unpin(["a"]) == 1
    assert mem.put("b", b"y" * 60) and not mem.contains("a")


def test_lookup_per_tier_and_clear_one_tenant(tmp_path):
    a = make_engine(tmp_path, tenant="a")
    b = a.for_tenant("b")
    tokens = list(range(40))
    a.store(tokens, kv_for(tokens))
    b.store(tokens, kv_for(tokens))
    a.storage.tiers[0].clear()
    assert a.lookup_per_tier(tokens) == {"memory": 0, "disk": 40 // CHUNK * CHUNK}
    assert a.clear_tenant() == 5  # 5 chunks on disk, none left in memory
    assert a.lookup(tokens) == 0 and b.lookup(tokens) == 40


def test_fair_lock_serves_in_arrival_order():
    lock = FairLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for i in range(4):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        while lock.waiting() < i + 1:  # queue them in a known order
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3]
