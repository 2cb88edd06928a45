"""Prefill/decode disaggregation demo: two ``kvcellar serve`` processes hand KV over through Redis.

No router: this script starts a throwaway redis-server, a prefill worker (``--role prefill``),
a decode worker (``--role decode``) and, as the reference, a plain single process without cache.
For each request it sends the chat to the prefill worker (which computes the prompt's KV, writes
it to Redis and returns no tokens), then the same chat to the decode worker (which loads the KV
from Redis and only decodes), and checks the decode worker's answer against the single process.
Neither worker has a disk tier, and they share no memory: Redis is the only way across.

    python benchmarks/disaggregated.py            # 4 requests with ~1k-token prompts
    python benchmarks/disaggregated.py --quick    # CI smoke: 2 requests
    python benchmarks/disaggregated.py --cluster  # through a 3-master Redis Cluster
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_common import running_server
from machine_info import machine
from rich.console import Console
from rich.table import Table

from kvcellar.demo_script import QUESTIONS, SYSTEM_PROMPT
from kvcellar.storage.redis_local import start_cluster, start_redis

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(width=150)


def chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    t0 = time.perf_counter()
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        timeout=600,
    )
    r.raise_for_status()
    body = r.json()
    return {
        "s": time.perf_counter() - t0,
        "text": body["choices"][0]["message"]["content"],
        "prompt_tokens": body["usage"]["prompt_tokens"],
        "cached_tokens": int(r.headers["x-kvcellar-cached-tokens"]),
        "prefilled_tokens": int(r.headers["x-kvcellar-prefilled-tokens"]),
    }


def run(args: argparse.Namespace) -> dict:
    redis = start_cluster() if args.cluster else start_redis()
    common = {"chunk_size": args.chunk_size, "memory_bytes": "500MB", "remote_url": redis.url}
    rows = []
    try:
        with (
            running_server(True, role="prefill", **common) as prefill,
            running_server(True, role="decode", **common) as decode,
            running_server(False) as single,
        ):
            for i in range(args.requests):
                q = QUESTIONS[i % len(QUESTIONS)]
                messages = [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"(request {i}) {q}"},
                ]
                p = chat(prefill, messages, 1)
                d = chat(decode, messages, args.max_tokens)
                ref = chat(single, messages, args.max_tokens)
                rows.append(
                    {
                        "request": i,
                        "prompt_tokens": p["prompt_tokens"],
                        "prefill_worker_prefilled": p["prefilled_tokens"],
                        "prefill_worker_s": p["s"],
                        "prefill_worker_generated": p["text"],
                        "decode_cached_tokens": d["cached_tokens"],
                        "decode_prefilled_tokens": d["prefilled_tokens"],
                        "decode_s": d["s"],
                        "single_process_s": ref["s"],
                        "same_text": d["text"] == ref["text"],
                        "text": d["text"],
                    }
                )
                console.print(rows[-1])
    finally:
        redis.stop()
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--cluster", action="store_true", help="hand over through a 3-master cluster")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 2, 8
    res = run(args)
    table = Table(title="prefill worker -> Redis -> decode worker, vs one process without cache")
    for col in (
        "req",
        "prompt tok",
        "prefill: computed",
        "prefill s",
        "decode: loaded",
        "decode: computed",
        "decode s",
        "single process s",
        "same answer",
    ):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        table.add_row(
            str(r["request"]),
            str(r["prompt_tokens"]),
            str(r["prefill_worker_prefilled"]),
            f"{r['prefill_worker_s']:.2f}",
            str(r["decode_cached_tokens"]),
            str(r["decode_prefilled_tokens"]),
            f"{r['decode_s']:.2f}",
            f"{r['single_process_s']:.2f}",
            "yes" if r["same_text"] else "NO",
        )
    console.print(table)
    out = args.out or RESULTS / f"disaggregated{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "disaggregated",
                "args": vars(args) | {"out": str(out)},
                "machine": machine(),
                **res,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
