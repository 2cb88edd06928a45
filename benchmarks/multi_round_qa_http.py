"""Multi-round QA through the HTTP server: concurrent users, a request-rate setting.

U users chat for R rounds each over the shared station-manual system prompt. Requests arrive at
``--qps`` requests per second overall (user u's round r is due at (r * U + u) / qps), but a user
never sends a round before the answer to the previous one arrived, as in a real chat. The same run
is made against a kvcellar server and a ``--no-cache`` server, one after the other. Reported per
server: TTFT p50/p90 (client side, queueing included), request and output-token throughput.

    python benchmarks/multi_round_qa_http.py           # 3 users x 4 rounds at 0.5 QPS
    python benchmarks/multi_round_qa_http.py --quick   # CI smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_common import percentile, running_server, timed_chat
from workload import user_turn

from kvcellar.demo_script import SYSTEM_PROMPT

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()


def run_users(url: str, args: argparse.Namespace, label: str) -> tuple[list[dict], float]:
    client = OpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", timeout=900)
    model = client.models.list().data[0].id
    rows: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.5

    def user(u: int) -> None:
        history = [{"role": "system", "content": SYSTEM_PROMPT}]
        for r in range(args.rounds):
            due = start + (r * args.users + u) / args.qps
            time.sleep(max(0.0, due - time.perf_counter()))
            msgs = [*history, {"role": "user", "content": user_turn(u, r, args.sentences)}]
            sent = time.perf_counter()
            t = timed_chat(client, model, msgs, args.answer_tokens)
            with lock:
                rows.append(
                    {
                        "server": label,
                        "user": u,
                        "round": r,
                        "sent_s": sent - start,
                        "late_s": max(0.0, sent - due),
                        **t.__dict__,
                    }
                )
            history = [*msgs, {"role": "assistant", "content": t.text}]

    threads = [threading.Thread(target=user, args=(u,)) for u in range(args.users)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return rows, time.perf_counter() - start


def summarise(rows: list[dict], wall_s: float) -> dict:
    ttft = [r["ttft_s"] for r in rows]
    return {
        "requests": len(rows),
        "wall_s": wall_s,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_mean_s": sum(ttft) / len(ttft),
        "requests_per_s": len(rows) / wall_s,
        "output_tokens_per_s": sum(r["completion_tokens"] for r in rows) / wall_s,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "cached_tokens": sum(r["cached_tokens"] for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--qps", type=float, default=0.5)
    p.add_argument("--sentences", type=int, default=4)
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--url", help="use this running kvcellar server instead of starting one")
    p.add_argument("--baseline-url", help="use this running --no-cache server as the baseline")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.users, args.rounds, args.qps, args.answer_tokens = 2, 2, 1.0, 4

    result: dict[str, dict] = {}
    all_rows: list[dict] = []
    for label, cache, given in (
        ("kvcellar", True, args.url),
        ("no-cache", False, args.baseline_url),
    ):
        if given:
            rows, wall = run_users(given, args, label)
        else:
            with running_server(cache, chunk_size=args.chunk_size, memory_bytes="4GB") as url:
                rows, wall = run_users(url, args, label)
        result[label] = summarise(rows, wall)
        all_rows += rows
    c, b = result["kvcellar"], result["no-cache"]
    ratios = {
        "ttft_p50_speedup": b["ttft_p50_s"] / c["ttft_p50_s"],
        "ttft_p90_speedup": b["ttft_p90_s"] / c["ttft_p90_s"],
        "throughput_ratio": c["output_tokens_per_s"] / b["output_tokens_per_s"],
    }
    table = Table(
        title=f"multi-round QA over HTTP: {args.users} users x {args.rounds} rounds at {args.qps} QPS"
    )
    for col in (
        "server",
        "requests",
        "TTFT p50",
        "TTFT p90",
        "req/s",
        "output tok/s",
        "cached / prompt tokens",
        "wall",
    ):
        table.add_column(col, justify="right")
    for label, s in result.items():
        table.add_row(
            label,
            str(s["requests"]),
            f"{s['ttft_p50_s'] * 1000:.0f} ms",
            f"{s['ttft_p90_s'] * 1000:.0f} ms",
            f"{s['requests_per_s']:.3f}",
            f"{s['output_tokens_per_s']:.2f}",
            f"{s['cached_tokens']} / {s['prompt_tokens']}",
            f"{s['wall_s']:.0f} s",
        )
    console.print(table)
    console.print({k: round(v, 2) for k, v in ratios.items()})
    out = args.out or RESULTS / f"multi_round_qa_http{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "multi_round_qa_http",
                "args": vars(args) | {"out": out.name},
                "summary": result,
                "ratios": ratios,
                "rows": all_rows,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
