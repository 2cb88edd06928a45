"""Multi-round QA (LMCache's shape): U users chat for R rounds over a shared system prompt.

Each user's history grows every round (a few hundred tokens of notes per question + the answer), so
later rounds have thousands of tokens of history that the cache can serve. For every request the
same model runs twice in this process: once with kvcellar and once with the cache bypassed, so
speedups are ratios measured under the same conditions. Greedy tokens of both runs are compared.

It also prints the physical bound of each hit, load(h) + prefill(n - h), with load(h) the time to
memcpy (memory tier) or read from a file (disk tier) the same number of bytes, measured here, and
prefill(n - h) the measured time of the suffix prefill. And it measures what a miss costs.

    python benchmarks/multi_round_qa.py            # full: 2 users x 12 rounds, short turns;
    --rounds 8 --sentences 24 --answer-tokens 16 for long turns
    python benchmarks/multi_round_qa.py --quick    # CI smoke: 1 user x 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine
from workload import paragraph, user_turn

from kvcellar.demo_script import SYSTEM_PROMPT
from kvcellar.llm import LLM
from kvcellar.storage.redis_local import start_redis

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()


def measure_memcpy_s(nbytes: int, reps: int = 5) -> float:
    """Median time to copy ``nbytes`` between two touched buffers: the memory tier's floor."""
    if nbytes == 0:
        return 0.0
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_file_read_s(nbytes: int, directory: Path, reps: int = 3) -> float:
    """Median time to read ``nbytes`` from one file (page cache warm, as for a recent disk hit)."""
    if nbytes == 0:
        return 0.0
    path = directory / "bound.bin"
    path.write_bytes(os.urandom(min(nbytes, 1 << 20)) * (nbytes // min(nbytes, 1 << 20) + 1))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        with path.open("rb") as f:
            f.read(nbytes)
        times.append(time.perf_counter() - t)
    path.unlink()
    return statistics.median(times)


def measure_redis_get_s(nbytes: int, url: str, reps: int = 3) -> float:
    """Median time of one raw redis-py GET of ``nbytes``: the remote tier's floor."""
    import redis

    if nbytes == 0:
        return 0.0
    client = redis.Redis.from_url(url)
    client.set("bound", b"\0" * nbytes)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        client.get("bound")
        times.append(time.perf_counter() - t)
    client.delete("bound")
    client.close()
    return statistics.median(times)


def fill_remote(args: argparse.Namespace, url: str) -> float:
    """Another process runs the same conversations with the cache, filling Redis."""
    t0 = time.perf_counter()
    argv = [a for a in sys.argv[1:] if a != "--quick"] + ["--fill-only", "--remote-url", url]
    if args.quick:
        argv.append("--quick")
    subprocess.run([sys.executable, __file__, *argv], check=True)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="kvcellar-bench-"))
    tier = args.tier
    server = None
    fill_s = None
    url = args.remote_url
    if tier == "remote" and not args.fill_only:
        if url is None:
            server = start_redis(tmp / "redis")
            url = server.url
        fill_s = fill_remote(args, url)
    llm = LLM(
        chunk_size=args.chunk_size,
        # remote: a cold process with no local tier, so every hit comes from Redis
        memory_bytes="8GB" if tier == "memory" or args.fill_only else 0,
        disk_bytes="8GB" if tier == "disk" else 0,
        disk_path=tmp / "kv",
        remote_url=url if tier == "remote" else None,
        threads=args.threads,
    )
    if args.fill_only:
        histories = [[{"role": "system", "content": SYSTEM_PROMPT}] for _ in range(args.users)]
        for r in range(args.rounds):
            for u in range(args.users):
                msgs = [*histories[u], {"role": "user", "content": user_turn(u, r, args.sentences)}]
                out = llm.generate(msgs, max_tokens=args.answer_tokens)
                histories[u] = [*msgs, {"role": "assistant", "content": out.text}]
        llm.close()  # drains the write-back queue into Redis
        return {}
    bpt = llm.runner.bytes_per_token
    llm.generate("Warm-up: say hello.", max_tokens=2, use_cache=False)  # first-call costs
    histories: list[list[dict]] = [
        [{"role": "system", "content": SYSTEM_PROMPT}] for _ in range(args.users)
    ]
    rows = []
    bar = tqdm(total=args.users * args.rounds, desc="requests", disable=not sys.stderr.isatty())
    for r in range(args.rounds):
        for u in range(args.users):
            msgs = [*histories[u], {"role": "user", "content": user_turn(u, r, args.sentences)}]
            base = llm.generate(msgs, max_tokens=args.answer_tokens, use_cache=False)
            out = llm.generate(msgs, max_tokens=args.answer_tokens)
            h = out.cached_tokens
            if tier == "memory":
                load_floor = measure_memcpy_s(h * bpt)
            elif tier == "disk":
                load_floor = measure_file_read_s(h * bpt, tmp)
            else:
                load_floor = measure_redis_get_s(h * bpt, url)
            bound = load_floor + out.prefill_s
            rows.append(
                {
                    "user": u,
                    "round": r,
                    "prompt_tokens": out.prompt_tokens,
                    "cached_tokens": h,
                    "prefilled_tokens": out.prefilled_tokens,
                    "ttft_nocache_s": base.ttft_s,
                    "ttft_cache_s": out.ttft_s,
                    "speedup": base.ttft_s / out.ttft_s,
                    "load_s": out.load_s,
                    "prefill_s": out.prefill_s,
                    "load_floor_s": load_floor,
                    "bound_s": bound,
                    "ttft_over_bound": out.ttft_s / bound if h else None,
                    "total_nocache_s": base.total_s,
                    "total_cache_s": out.total_s,
                    "same_tokens": base.token_ids == out.token_ids,
                }
            )
            histories[u] = [*msgs, {"role": "assistant", "content": out.text}]
            bar.update(1)
    bar.close()

    # What a miss costs: fresh prompts, the cache emptied before each cached run, each prompt
    # measured in both orders to cancel warm-up effects. TTFT ratios of ~1 s runs are noisy on
    # a shared 2-core machine, so the engine's own time on the miss path is reported too.
    miss = []
    for i in range(args.miss_prompts):
        prompt = f"Notes: {paragraph(900_000 + i, args.miss_sentences)}\nSummarise."
        for order in ((True, False), (False, True)):
            got = {}
            for use_cache in order:
                if use_cache:
                    llm.engine.clear()
                got[use_cache] = llm.generate(
                    prompt, max_tokens=args.answer_tokens, use_cache=use_cache
                )
            assert got[True].cached_tokens == 0
            miss.append(
                {
                    "prompt_tokens": got[True].prompt_tokens,
                    "ttft_nocache_s": got[False].ttft_s,
                    "ttft_cache_miss_s": got[True].ttft_s,
                    "total_nocache_s": got[False].total_s,
                    "total_cache_miss_s": got[True].total_s,
                    "lookup_s": got[True].load_s,
                    "store_s": got[True].store_s,
                }
            )
    llm.close()
    if server is not None:
        server.stop()
    return {"rows": rows, "miss": miss, "bytes_per_token": bpt, "remote_fill_s": fill_s}


def summarise(res: dict, args: argparse.Namespace) -> dict:
    rows = res["rows"]
    long = [r for r in rows if r["prompt_tokens"] >= 2000 and r["cached_tokens"] > 0]
    hits = [r for r in rows if r["cached_tokens"] > 0]
    miss = res["miss"]
    med = statistics.median
    return {
        "requests": len(rows),
        "all_same_tokens": all(r["same_tokens"] for r in rows),
        "median_speedup_all_hits": med([r["speedup"] for r in hits]) if hits else None,
        "median_speedup_2k_plus": med([r["speedup"] for r in long]) if long else None,
        "median_ttft_over_bound": med([r["ttft_over_bound"] for r in hits]) if hits else None,
        "max_ttft_over_bound": max(r["ttft_over_bound"] for r in hits) if hits else None,
        "miss_lookup_ms_median": 1000 * med([m["lookup_s"] for m in miss]) if miss else None,
        "miss_store_ms_median": 1000 * med([m["store_s"] for m in miss]) if miss else None,
        "miss_ttft_overhead_pct": 100
        * (med([m["ttft_cache_miss_s"] / m["ttft_nocache_s"] for m in miss]) - 1)
        if miss
        else None,
        "miss_total_overhead_pct": 100
        * (med([m["total_cache_miss_s"] / m["total_nocache_s"] for m in miss]) - 1)
        if miss
        else None,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(res["rows"], key=lambda r: r["prompt_tokens"])
    x = [r["prompt_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [r["ttft_nocache_s"] for r in rows], "o-", label="no cache")
    ax.plot(x, [r["ttft_cache_s"] for r in rows], "s-", label="kvcellar")
    ax.plot(x, [r["bound_s"] for r in rows], "k:", label="bound: load(h) + prefill(n-h)")
    ax.set_xlabel("prompt tokens (history + question)")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.set_title("multi-round QA, SmolLM2-135M fp32 on CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small CI smoke run")
    p.add_argument("--users", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument(
        "--sentences", type=int, default=4, help="notes sentences per question (~15 tokens each)"
    )
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument(
        "--tier",
        choices=["memory", "disk", "remote"],
        default="memory",
        help="remote: another process fills a Redis first; this one has no local tier",
    )
    p.add_argument("--remote-url", default=None, help="with --tier remote: an existing Redis")
    p.add_argument("--fill-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--miss-prompts", type=int, default=5)
    p.add_argument(
        "--miss-sentences", type=int, default=24, help="length of the miss prompts (~420 tokens)"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.users, args.rounds, args.sentences, args.answer_tokens, args.miss_prompts = (
            1,
            3,
            4,
            4,
            2,
        )
        args.miss_sentences = 6
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    res = run(args)
    if args.fill_only:
        return
    summary = summarise(res, args)
    table = Table(title=f"multi-round QA ({args.tier} tier, chunk {args.chunk_size})")
    for col in (
        "user",
        "round",
        "prompt",
        "cached",
        "TTFT no cache",
        "TTFT kvcellar",
        "speedup",
        "bound",
        "TTFT/bound",
        "same tokens",
    ):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        table.add_row(
            str(r["user"]),
            str(r["round"]),
            str(r["prompt_tokens"]),
            str(r["cached_tokens"]),
            f"{r['ttft_nocache_s'] * 1000:.0f} ms",
            f"{r['ttft_cache_s'] * 1000:.0f} ms",
            f"{r['speedup']:.1f}x",
            f"{r['bound_s'] * 1000:.0f} ms",
            f"{r['ttft_over_bound']:.2f}" if r["ttft_over_bound"] else "-",
            "yes" if r["same_tokens"] else "NO",
        )
    console.print(table)
    console.print(summary)
    name = (
        args.out
        or RESULTS
        / f"multi_round_qa{'_quick' if args.quick else ''}{'' if args.tier == 'memory' else '_' + args.tier}.json"
    )
    name.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "multi_round_qa",
        "args": vars(args) | {"out": name.name},
        "machine": machine(),
        "summary": summary,
        **res,
    }
    name.write_text(json.dumps(payload, indent=2))
    plot(res, name.with_suffix(".png"))
    console.print(f"wrote {name} and {name.with_suffix('.png')}")


if __name__ == "__main__":
    main()
