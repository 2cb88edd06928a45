"""The remote tier on a real Redis and a real 3-master Redis Cluster, started by the tests.

Backend contract and batching on both; the engine over memory + Redis (corrupted values are a
miss and deleted); two real processes sharing KV through Redis; and faults: Redis unreachable at
start, killed mid-run, frozen (timeouts), then back: requests never fail.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvcellar.kv.engine import CacheEngine
from kvcellar.storage.memory import MemoryBackend
from kvcellar.storage.redis import PREFIX, RedisBackend
from kvcellar.storage.redis_local import (
    free_port,
    redis_available,
    start_redis,
)
from kvcellar.storage.tiered import TieredStore

pytestmark = pytest.mark.skipif(
    not redis_available(), reason="redis-server is not installed (.ci/run installs it)"
)

CHUNK = 64


@pytest.fixture(params=["single", "cluster"])
def url(request):
    """A clean kvcellar keyspace on a single Redis or on the cluster."""
    u = request.getfixturevalue(request.param).url
    b = RedisBackend(u)
    b.clear()
    b.close()
    return u


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 1, tokens, 8, generator=g)


# --- backend ------------------------------------------------------------------------------------
def test_backend_contract_and_batches(url):
    b = RedisBackend(url)
    items = [(f"{i:032x}", bytes([i]) * (100 + i)) for i in range(40)]
    assert b.put_many(items) == [True] * 40
    keys = [k for k, _ in items]
    trips = b.stats().extra["round_trips"]
    assert b.get_many([*keys, "absent"]) == [v for _, v in items] + [None]
    assert b.stats().extra["round_trips"] == trips + 1  # one pipeline for 41 keys
    assert b.contains_many(["absent", keys[3]]) == [False, True]
    assert b.get(keys[5]) == items[5][1] and b.contains(keys[5]) and not b.contains("nope")
    assert b.put(keys[5], b"new") and b.get(keys[5]) == b"new"  # replace
    assert sorted(b.keys()) == sorted(keys)
    assert b.delete(keys[0]) and not b.delete(keys[0])
    s = b.stats()
    assert s.entries == 39 and s.used_bytes > 0 and s.extra["up"] == 1.0
    assert s.hits == 42 and s.misses == 1 and s.puts == 41
    b.clear()
    assert list(b.keys()) == []
    b.close()


def test_clear_leaves_other_applications_keys_alone(single):
    import redis

    raw = redis.Redis.from_url(single.url)
    raw.set("someone-else", b"keep")
    b = RedisBackend(single.url)
    b.put("k", b"v")
    b.clear()
    assert raw.get("someone-else") == b"keep" and raw.get(PREFIX + "k") is None
    raw.delete("someone-else")
    b.close()


def test_ttl_is_set_on_every_entry(single):
    import redis

    b = RedisBackend(single.url, ttl_s=60)
    b.put_many([("t1", b"a"), ("t2", b"b")])
    raw = redis.Redis.from_url(single.url)
    assert all(0 < raw.pttl(PREFIX + k) <= 60_000 for k in ("t1", "t2"))
    b.clear()
    b.close()


def test_bad_remote_url_is_a_clear_config_error():
    from kvcellar.config import Settings
    from kvcellar.errors import ConfigError

    with pytest.raises(ConfigError, match="remote_url"):
        Settings.load(remote_url="http://localhost:6379")
    assert Settings.load(remote_url="redis+cluster://h:7000").remote_url == "redis+cluster://h:7000"


# --- engine over memory + remote ----------------------------------------------------------------
def _engine(url: str, memory: bool = True, write_back: int = 0) -> CacheEngine:
    tiers = ([MemoryBackend(10**8)] if memory else []) + [RedisBackend(url)]
    return CacheEngine(TieredStore(tiers, write_back=write_back), "model", "t", chunk_size=CHUNK)


def test_engine_loads_from_redis_in_one_batch_and_promotes(url):
    tokens = list(range(4 * CHUNK))
    kv = _kv(len(tokens))
    writer = _engine(url, write_back=16)
    assert writer.store(tokens, kv) == 4
    writer.flush()
    reader = _engine(url)  # a cold memory tier: everything comes from Redis
    assert reader.lookup(tokens) == 4 * CHUNK
    remote = reader.storage.tiers[1]
    before = remote.stats().extra["round_trips"]
    res = reader.retrieve_detailed(tokens)
    assert res.n_tokens == 4 * CHUNK and torch.equal(res.kv, kv)
    assert res.chunk_tiers == ["remote"] * 4
    assert remote.stats().extra["round_trips"] - before == 2  # EXISTS batch + GET batch
    again = reader.retrieve_detailed(tokens)
    assert again.chunk_tiers == ["memory"] * 4  # promoted
    writer.close()
    reader.close()


def test_corrupted_value_in_redis_is_a_miss_and_deleted(url):
    tokens = list(range(2 * CHUNK))
    eng = _engine(url, memory=False)
    eng.store(tokens, _kv(len(tokens)))
    key = eng._keys(tokens)[0][1]
    remote = eng.storage.tiers[0]
    frame = bytearray(remote.get(key))
    frame[-5] ^= 0xFF
    remote.put(key, bytes(frame))
    res = eng.retrieve_detailed(tokens)
    assert res.n_tokens == CHUNK and res.corrupted == 1
    assert not remote.contains(key)
    eng.close()


def test_full_write_back_queue_drops_and_counts(single):
    class Slow(MemoryBackend):
        def put(self, key, value):
            gate.wait()
            return super().put(key, value)

    import threading

    gate = threading.Event()
    store = TieredStore([MemoryBackend(10**6), Slow(10**6, name="slow")], write_back=2)
    for i in range(6):
        store.put(f"k{i}", b"v")
    gate.set()
    store.flush()
    slow = store.stats()[1]
    # the worker holds at most one batch while blocked, the queue two more: the rest is dropped
    assert 1 <= slow.extra["write_back_dropped"] <= 4
    assert slow.entries + slow.extra["write_back_dropped"] == 6
    assert store.stats()[0].entries == 6  # the first tier always has everything
    store.close()


# --- faults -------------------------------------------------------------------------------------
def test_redis_unreachable_at_start_serves_from_local_tiers(make_llm, caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    llm = make_llm(chunk_size=CHUNK, remote_url=url, remote_timeout_s=0.5, disk_bytes=0)
    prompt = "The keeper climbs one hundred and twelve steps. " * 30
    with caplog.at_level(logging.WARNING, logger="kvcellar"):
        a = llm.generate(prompt, max_tokens=3)
        b = llm.generate(prompt, max_tokens=3)
    assert b.cached_tokens >= 4 * CHUNK and set(b.chunk_tiers) == {"memory"}
    assert a.token_ids == b.token_ids
    llm.flush()
    remote = llm.engine.storage.stats()[-1]
    assert remote.name == "remote" and remote.extra["up"] == 0.0 and remote.errors >= 1
    downs = [r for r in caplog.records if "is down" in r.getMessage()]
    assert len(downs) == 1  # logged once per state change, not per request
    from prometheus_client import CollectorRegistry, generate_latest

    from kvcellar.server.metrics import CacheTierCollector

    reg = CollectorRegistry()
    reg.register(CacheTierCollector(llm.engine.storage.stats))
    text = generate_latest(reg).decode()
    assert 'kvcellar_cache_tier_failing{tier="remote"} 1.0' in text
    assert 'kvcellar_cache_tier_down_events_total{tier="remote"} 1.0' in text
    assert 'kvcellar_cache_tier_failing{tier="memory"} 0.0' in text


def test_redis_killed_mid_run_then_back(make_llm, tmp_path, caplog):
    server = start_redis(tmp_path / "r")
    try:
        llm = make_llm(chunk_size=CHUNK, remote_url=server.url, remote_timeout_s=0.5, disk_bytes=0)
        remote = llm.engine.storage.tiers[-1]
        remote._retry_initial = remote._retry_max = 0.0  # retry at once: no waiting in tests
        p1 = "Gale warnings are logged within ten minutes. " * 25
        p2 = "The fog signal sounds twice every sixty seconds. " * 25
        llm.generate(p1, max_tokens=2)
        llm.flush()
        assert remote.stats().entries > 0
        server.kill()
        with caplog.at_level(logging.WARNING, logger="kvcellar"):
            outs = [llm.generate(p, max_tokens=2) for p in (p1, p2, p2)]  # zero failed requests
            llm.flush()
            assert remote.stats().extra["up"] == 0.0
            server.start()  # same port, empty (no persistence)
            llm.generate("A new prompt after the restart. " * 20, max_tokens=2)
            llm.flush()
        assert outs[0].cached_tokens > 0 and outs[2].cached_tokens > 0  # from memory
        assert remote.up and remote.stats().entries > 0  # writes reach Redis again
        msgs = [r.getMessage() for r in caplog.records]
        assert sum("is down" in m for m in msgs) == 1 and sum("is back" in m for m in msgs) == 1
    finally:
        server.stop()


def test_frozen_redis_times_out_instead_of_hanging(make_llm, tmp_path):
    server = start_redis(tmp_path / "r")
    try:
        llm = make_llm(chunk_size=CHUNK, remote_url=server.url, remote_timeout_s=0.3, disk_bytes=0)
        prompt = "Visitors may climb the tower on Sundays in groups of six. " * 20
        server.pause()
        out = llm.generate(prompt, max_tokens=2)  # lookup times out; the model still answers
        llm.flush()
        assert len(out.token_ids) == 2
        assert llm.engine.storage.stats()[-1].extra["up"] == 0.0
    finally:
        server.stop()


# --- across processes ---------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import json, sys
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar(); hf_logging.set_verbosity_error()
    from kvcellar.llm import LLM
    a = json.loads(sys.argv[1])
    llm = LLM(disk_path=a["disk"], disk_bytes="100MB", memory_bytes="100MB",
              chunk_size=a["chunk"], remote_url=a["url"])
    out = llm.generate(a["prompt"], max_tokens=a["max_tokens"])
    llm.close()  # drains the write-back queue into Redis
    print(json.dumps({"ids": out.token_ids, "cached": out.cached_tokens, "tiers": out.chunk_tiers}))
    """
)


def _child(url: str, prompt: list[int], disk, max_tokens: int) -> dict:
    arg = json.dumps(
        {"url": url, "prompt": prompt, "disk": str(disk), "chunk": CHUNK, "max_tokens": max_tokens}
    )
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_reuses_the_first_process_kv(url, make_llm, tmp_path):
    base = make_llm(enabled=False)
    prompt = base.tokenize(
        [{"role": "user", "content": "Station rules: " + "Log every lamp change. " * 60 + "Why?"}]
    )
    a = _child(url, prompt, tmp_path / "disk-a", 2)
    b = _child(url, prompt, tmp_path / "disk-b", 8)  # its own empty disk: only Redis can help
    assert a["cached"] == 0
    assert b["cached"] == min(len(prompt) // CHUNK * CHUNK, len(prompt) - 1)
    assert set(b["tiers"]) == {"remote"}
    assert b["ids"] == base.generate(prompt, max_tokens=8).token_ids


@pytest.mark.slow
@pytest.mark.parametrize("where", ["single", "cluster"])
def test_prefill_and_decode_workers_hand_over_through_redis(where, tmp_path):
    """Two `kvcellar serve` processes (--role prefill / --role decode) and a plain reference."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "dis.json"
    cmd = [
        sys.executable,
        str(root / "benchmarks" / "disaggregated.py"),
        "--quick",
        "--out",
        str(out),
    ]
    res = subprocess.run(
        cmd + (["--cluster"] if where == "cluster" else []),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    for r in rows:
        assert r["prefill_worker_generated"] == ""
        # the decode worker loads every prompt token's KV but the last, which it runs through
        # the model once to get the logits of its first output token
        assert r["decode_cached_tokens"] == r["prompt_tokens"] - 1
        assert r["decode_prefilled_tokens"] == 1
        assert r["same_text"], r
