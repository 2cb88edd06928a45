"""Store/load throughput of each storage tier next to the raw speed of the same medium.

For chunk sizes of 64-1024 tokens of SmolLM2-135M fp32 KV (45 KiB per token, raw frames), each
tier stores and loads the same set of chunks the way the engine does it:

- **store** = frame the KV tensor (``codecs.encode``: header, token ids, payload, xxh3 checksum)
  + ``put`` (memory: keep the bytes; disk: temp file + rename; Redis: one pipelined SET batch);
- **load** = ``get`` + ``codecs.decode`` (checksum verified) + copy into the destination KV
  tensor (what ``CacheEngine.retrieve`` does).

Raw references, measured in the same run on the same bytes:

- memory: store = copy of the KV bytes into a new bytes object (allocation and page faults are
  part of keeping a copy), load = copy into the preallocated destination (``copy_``);
- disk: writing the frame bytes to a new file (write + close) / reading the file back
  (``read_bytes``, page cache warm as for the tier);
- Redis: the same values with raw redis-py pipelined SET / GET (no kvcellar code).

The ratio tier / raw is the share of the medium's speed the tier keeps (target >= 50%).

    python benchmarks/tier_throughput.py           # 64, 256, 1024 tokens, ~190 MB per size
    python benchmarks/tier_throughput.py --quick   # CI smoke: small sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine
from rich.console import Console
from rich.table import Table

from kvcellar.kv import codecs
from kvcellar.kv.chunk import KVChunk
from kvcellar.storage.disk import DiskBackend
from kvcellar.storage.memory import MemoryBackend
from kvcellar.storage.redis import RedisBackend
from kvcellar.storage.redis_local import start_redis

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(width=150)
SHAPE = (30, 2, 3, 64)  # layers, k/v, kv heads, head_dim of SmolLM2-135M


def best_of(
    reps: int, fn: Callable[[], object], setup: Callable[[], object] | None = None
) -> float:
    """Median seconds of ``reps`` runs (after one warm-up run); ``setup`` runs untimed before
    each (stores write into an emptied tier, as new chunks do, not over their previous copy)."""
    times = []
    for i in range(reps + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(tokens: int, n_chunks: int, reps: int, root: Path, redis_url: str) -> list[dict]:
    L, two, H, D = SHAPE
    g = torch.Generator().manual_seed(tokens)
    kvs = [torch.randn(L, two, H, tokens, D, generator=g) for _ in range(n_chunks)]
    chunks = [KVChunk(kv, tuple(range(i * tokens, (i + 1) * tokens))) for i, kv in enumerate(kvs)]
    raw = codecs.get_codec("raw")
    frames = [codecs.encode(c, raw) for c in chunks]
    keys = [f"{tokens:08x}{i:024x}" for i in range(n_chunks)]
    dest = torch.empty(L, two, H, tokens * n_chunks, D)
    nbytes = sum(len(f) for f in frames)

    def encode_all() -> list[bytes]:
        return [codecs.encode(c, raw) for c in chunks]

    def load_into_dest(values: list[bytes | None]) -> None:
        for i, v in enumerate(values):
            assert v is not None
            dest[:, :, :, i * tokens : (i + 1) * tokens].copy_(codecs.decode(v).kv)

    rows = []

    # memory
    mem = MemoryBackend(4 * nbytes)

    def mem_store() -> None:
        for k, f in zip(keys, encode_all(), strict=True):
            mem.put(k, f)

    def mem_load() -> None:
        load_into_dest([mem.get(k) for k in keys])

    def memcpy_new() -> list[bytes]:
        # storing keeps a copy of the bytes in new memory (a bytes object, as the tier keeps):
        # allocation (page faults) + memcpy
        return [bytes(memoryview(kv.numpy()).cast("B")) for kv in kvs]

    def memcpy() -> None:
        for i, kv in enumerate(kvs):
            dest[:, :, :, i * tokens : (i + 1) * tokens].copy_(kv)

    rows.append(
        row(
            "memory",
            tokens,
            nbytes,
            best_of(reps, mem_store, mem.clear),
            best_of(reps, memcpy_new),
            best_of(reps, mem_load),
            best_of(reps, memcpy),
            "memcpy to new / reused memory",
        )
    )

    # disk
    disk = DiskBackend(root / f"disk-{tokens}", 4 * nbytes)
    files = root / f"raw-{tokens}"
    files.mkdir(parents=True, exist_ok=True)

    def disk_store() -> None:
        for k, f in zip(keys, encode_all(), strict=True):
            disk.put(k, f)

    def disk_load() -> None:
        load_into_dest([disk.get(k) for k in keys])

    def files_clear() -> None:
        for f in files.iterdir():
            f.unlink()

    def file_write() -> None:
        for k, f in zip(keys, frames, strict=True):
            (files / k).write_bytes(f)

    def file_read() -> list[bytes]:
        # kept, as the tier's load keeps what it read (fresh memory costs page faults)
        return [(files / k).read_bytes() for k in keys]

    rows.append(
        row(
            "disk",
            tokens,
            nbytes,
            best_of(reps, disk_store, disk.clear),
            best_of(reps, file_write, files_clear),
            best_of(reps, disk_load),
            best_of(reps, file_read),
            "file write / read",
        )
    )
    disk.close()

    # Redis
    import redis as redis_py

    remote = RedisBackend(redis_url, timeout_s=30)
    client = redis_py.Redis.from_url(redis_url, socket_timeout=30)

    def redis_store() -> None:
        remote.put_many(list(zip(keys, encode_all(), strict=True)))

    def redis_load() -> None:
        load_into_dest(remote.get_many(keys))

    def raw_set() -> None:
        pipe = client.pipeline(transaction=False)
        for k, f in zip(keys, frames, strict=True):
            pipe.set("raw:" + k, f)
        pipe.execute()

    def raw_get() -> list[bytes]:
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.get("raw:" + k)
        return pipe.execute()

    rows.append(
        row(
            "redis",
            tokens,
            nbytes,
            best_of(reps, redis_store, remote.clear),
            best_of(reps, raw_set, lambda: client.delete(*("raw:" + k for k in keys))),
            best_of(reps, redis_load),
            best_of(reps, raw_get),
            "redis-py pipelined SET / GET",
        )
    )
    remote.clear()
    client.delete(*("raw:" + k for k in keys))
    remote.close()
    client.close()
    return rows


def row(tier, tokens, nbytes, store_s, raw_store_s, load_s, raw_load_s, reference) -> dict:
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    return {
        "tier": tier,
        "chunk_tokens": tokens,
        "bytes": nbytes,
        "store_GBps": gbs(store_s),
        "raw_store_GBps": gbs(raw_store_s),
        "store_ratio": raw_store_s / store_s,
        "load_GBps": gbs(load_s),
        "raw_load_GBps": gbs(raw_load_s),
        "load_ratio": raw_load_s / load_s,
        "reference": reference,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--mb", type=float, default=190, help="MB of KV per size and tier")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.sizes, args.mb, args.reps = [64, 256], 12, 2
    torch.set_num_threads(1)  # copies and checksums are single-threaded in the engine too
    server = None if args.redis_url else start_redis()
    url = args.redis_url or server.url
    rows = []
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="kvcellar-tiers-") as tmp:
            for tokens in args.sizes:
                per_chunk = SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] * 4 * tokens
                n = max(2, round(args.mb * 1e6 / per_chunk))
                rows += measure(tokens, n, args.reps, Path(tmp), url)
                console.print(f"{tokens} tokens/chunk x {n}: done")
    finally:
        if server is not None:
            server.stop()
    table = Table(title="tier throughput (GB/s of KV frames) vs the raw medium, same bytes")
    for col in (
        "tier",
        "chunk tokens",
        "store",
        "raw store",
        "store / raw",
        "load",
        "raw load",
        "load / raw",
        "raw reference",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["tier"],
            str(r["chunk_tokens"]),
            f"{r['store_GBps']:.2f}",
            f"{r['raw_store_GBps']:.2f}",
            f"{100 * r['store_ratio']:.0f}%",
            f"{r['load_GBps']:.2f}",
            f"{r['raw_load_GBps']:.2f}",
            f"{100 * r['load_ratio']:.0f}%",
            r["reference"],
        )
    console.print(table)
    out = args.out or RESULTS / f"tier_throughput{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "tier_throughput",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    out.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
