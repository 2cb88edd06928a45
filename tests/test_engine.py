"""CacheEngine on synthetic KV: lookup without loading, longest-prefix retrieve, store-once."""

from __future__ import annotations

import threading

import torch

from kvcellar.keys import namespace
from kvcellar.kv.engine import CacheEngine
from kvcellar.storage.disk import DiskBackend
from kvcellar.storage.memory import MemoryBackend
from kvcellar.storage.tiered import TieredStore

L, H, D = 3, 2, 4
CHUNK = 8


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
    return CacheEngine(TieredStore(tiers), namespace("m|x|float32|L3H2D4", tenant), CHUNK, partial)


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
    b = CacheEngine(a.storage, namespace("m|x|float32|L3H2D4", "b"), CHUNK)
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
