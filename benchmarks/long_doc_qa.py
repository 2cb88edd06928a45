"""Long-document QA through the HTTP server (LMCache's long_doc_qa shape).

D documents of about L tokens are each asked Q different questions: a warm-up round asks every
document its first question (filling the cache), then the query round asks the remaining
questions, documents interleaved. The same workload runs against a kvcellar server and a
``--no-cache`` server of the same model (one after the other, so they never share the CPU), with
the official ``openai`` client, streaming, TTFT measured at the client.

    python benchmarks/long_doc_qa.py            # 3 documents x 3000 tokens x 3 questions
    python benchmarks/long_doc_qa.py --quick    # CI smoke
    python benchmarks/long_doc_qa.py --url http://127.0.0.1:8000 --baseline-url http://...:8001
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_common import running_server, timed_chat
from workload import paragraph

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()
QUESTIONS = [
    "Which piece of equipment is mentioned most often?",
    "Who did the most expensive work?",
    "List three tasks that were done during the night shift.",
    "What was repaired after the October gales?",
    "Which team worked on the channel markers?",
]
TOKENS_PER_SENTENCE = 15  # measured on this workload with the SmolLM2 tokenizer (15.3)


def document(i: int, tokens: int) -> str:
    return paragraph(50_000 + i, max(1, tokens // TOKENS_PER_SENTENCE))


def messages(doc: str, question: str) -> list[dict]:
    return [
        {"role": "system", "content": "Answer the question from the document, briefly."},
        {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {question}"},
    ]


def run_workload(url: str, args: argparse.Namespace, label: str) -> list[dict]:
    client = OpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", timeout=600)
    model = client.models.list().data[0].id
    docs = [document(i, args.doc_tokens) for i in range(args.docs)]
    plan = [("warmup", d, 0) for d in range(args.docs)]
    plan += [("query", d, q) for q in range(1, args.questions) for d in range(args.docs)]
    rows = []
    for phase, d, q in tqdm(plan, desc=label, disable=not sys.stderr.isatty()):
        t = timed_chat(
            client, model, messages(docs[d], QUESTIONS[q % len(QUESTIONS)]), args.max_tokens
        )
        rows.append({"server": label, "phase": phase, "doc": d, "question": q, **t.__dict__})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=3000)
    p.add_argument("--questions", type=int, default=3, help="per document, warm-up included")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--url", help="use this running kvcellar server instead of starting one")
    p.add_argument("--baseline-url", help="use this running --no-cache server as the baseline")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.docs, args.doc_tokens, args.questions, args.max_tokens = 2, 600, 2, 4

    rows: list[dict] = []
    for label, cache, given in (
        ("kvcellar", True, args.url),
        ("no-cache", False, args.baseline_url),
    ):
        t0 = time.perf_counter()
        if given:
            rows += run_workload(given, args, label)
        else:
            with running_server(cache, chunk_size=args.chunk_size, memory_bytes="4GB") as url:
                rows += run_workload(url, args, label)
        console.print(f"{label}: {time.perf_counter() - t0:.0f} s")

    def phase(server: str, name: str) -> list[dict]:
        return [r for r in rows if r["server"] == server and r["phase"] == name]

    summary = {}
    for name in ("warmup", "query"):
        c, b = phase("kvcellar", name), phase("no-cache", name)
        summary[name] = {
            "requests": len(c),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in c),
            "mean_cached_tokens": statistics.mean(r["cached_tokens"] for r in c),
            "ttft_cache_s": statistics.mean(r["ttft_s"] for r in c),
            "ttft_nocache_s": statistics.mean(r["ttft_s"] for r in b),
            "round_time_cache_s": sum(r["total_s"] for r in c),
            "round_time_nocache_s": sum(r["total_s"] for r in b),
        }
        s = summary[name]
        s["ttft_speedup"] = s["ttft_nocache_s"] / s["ttft_cache_s"]
        s["round_speedup"] = s["round_time_nocache_s"] / s["round_time_cache_s"]
    same = [
        a["text"] == b["text"]
        for a, b in zip(
            [r for r in rows if r["server"] == "kvcellar"],
            [r for r in rows if r["server"] == "no-cache"],
            strict=True,
        )
    ]
    summary["same_text"] = f"{sum(same)}/{len(same)}"

    table = Table(
        title=f"long-document QA: {args.docs} docs x ~{args.doc_tokens} tokens, through HTTP"
    )
    for col in (
        "round",
        "requests",
        "prompt tok",
        "cached tok",
        "TTFT no cache",
        "TTFT kvcellar",
        "TTFT speedup",
        "round time no cache",
        "round time kvcellar",
    ):
        table.add_column(col, justify="right")
    for name in ("warmup", "query"):
        s = summary[name]
        table.add_row(
            name,
            str(s["requests"]),
            f"{s['mean_prompt_tokens']:.0f}",
            f"{s['mean_cached_tokens']:.0f}",
            f"{s['ttft_nocache_s'] * 1000:.0f} ms",
            f"{s['ttft_cache_s'] * 1000:.0f} ms",
            f"{s['ttft_speedup']:.1f}x",
            f"{s['round_time_nocache_s']:.1f} s",
            f"{s['round_time_cache_s']:.1f} s",
        )
    console.print(table)
    console.print(f"identical answers (greedy): {summary['same_text']}")
    out = args.out or RESULTS / f"long_doc_qa{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "long_doc_qa",
                "args": vars(args) | {"out": out.name},
                "summary": summary,
                "rows": rows,
            },
            indent=2,
        )
    )
    plot(rows, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for server, marker in (("no-cache", "o"), ("kvcellar", "s")):
        rs = [r for r in rows if r["server"] == server]
        ax.plot(range(len(rs)), [r["ttft_s"] for r in rs], marker + "-", label=server)
    n_warm = sum(1 for r in rows if r["server"] == "kvcellar" and r["phase"] == "warmup")
    ax.axvline(n_warm - 0.5, color="grey", ls=":", label="warm-up | query")
    ax.set_xlabel("request")
    ax.set_ylabel("TTFT (s), client side")
    ax.set_yscale("log")
    ax.set_title("long-document QA through the HTTP server")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
