"""IC-Cache on the real model: do similar cached answers, given as in-context examples, help?

For each question of ``benchmarks/data/semantic/qa.jsonl`` (hand-written: a short factual question,
its reference answer and aliases, and three related questions answered earlier), the related
pairs are stored in a SemanticCache; on the (semantic-cache) miss for the question itself,
``SemanticCache.examples`` picks the k most similar cached pairs and ``augment`` puts them before
the question as earlier turns. SmolLM2-135M-Instruct answers greedily with and without them, and
an answer counts as correct when it contains the reference answer or an alias (case-insensitive,
whole word). Same model, same run, same questions: the ratio is the effect of IC-Cache.

    python benchmarks/ic_cache.py            # all questions
    python benchmarks/ic_cache.py --quick    # CI smoke: 4 questions
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine
from rich.console import Console
from rich.table import Table

from kvcellar import LLM, SemanticCache

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data" / "semantic" / "qa.jsonl"
SYSTEM = "Answer the question in one short sentence."


def correct(text: str, answers: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", text.lower()) for a in answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=3, help="in-context examples per question")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "ic_cache.json")
    args = ap.parse_args()
    rows_in = [json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]
    if args.quick:
        rows_in = rows_in[:4]
    console = Console()
    llm = LLM(enabled=False)
    llm.generate("Hello", max_tokens=2)  # warm-up: the first call pays one-off costs
    sc = SemanticCache(path=":memory:", ic_examples=args.k, ic_min_similarity=0.3,
                       admission={"writes_per_minute": None})
    rows = []
    for i, q in enumerate(rows_in):
        tenant = f"q{i}"  # each question sees only its own cached neighbours
        for c in q["cached"]:
            sc.store([{"role": "system", "content": SYSTEM}, {"role": "user", "content": c["query"]}],
                     c["response"], tenant=tenant)
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": q["question"]}]
        # the question was never answered: a hit here would be a wrong cached answer
        wrong_hit = sc.lookup(messages, tenant=tenant)
        examples = sc.examples(messages, tenant=tenant, k=args.k)
        augmented = sc.augment(messages, examples)
        answers = [q["answer"], *q.get("aliases", [])]
        t0 = time.perf_counter()
        plain = llm.generate(messages, max_tokens=args.max_tokens, temperature=0)
        t1 = time.perf_counter()
        ic = llm.generate(augmented, max_tokens=args.max_tokens, temperature=0)
        t2 = time.perf_counter()
        rows.append({
            "id": q["id"], "question": q["question"], "answer": q["answer"],
            "examples": len(examples), "plain": plain.text, "ic": ic.text,
            "plain_correct": correct(plain.text, answers), "ic_correct": correct(ic.text, answers),
            "plain_prompt_tokens": plain.prompt_tokens, "ic_prompt_tokens": ic.prompt_tokens,
            "plain_s": t1 - t0, "ic_s": t2 - t1,
            "wrong_cache_hit": wrong_hit.query if wrong_hit else None,
        })
    n = len(rows)
    summary = {
        "questions": n,
        "k": args.k,
        "accuracy_plain": sum(r["plain_correct"] for r in rows) / n,
        "accuracy_ic": sum(r["ic_correct"] for r in rows) / n,
        "mean_prompt_tokens_plain": sum(r["plain_prompt_tokens"] for r in rows) / n,
        "mean_prompt_tokens_ic": sum(r["ic_prompt_tokens"] for r in rows) / n,
        "mean_latency_plain_s": sum(r["plain_s"] for r in rows) / n,
        "mean_latency_ic_s": sum(r["ic_s"] for r in rows) / n,
        "fixed_by_ic": sum(r["ic_correct"] and not r["plain_correct"] for r in rows),
        "broken_by_ic": sum(r["plain_correct"] and not r["ic_correct"] for r in rows),
        "wrong_semantic_hits": sum(r["wrong_cache_hit"] is not None for r in rows),
    }
    table = Table(title=f"IC-Cache on {n} questions (SmolLM2-135M, greedy, k={args.k})")
    for col in ("", "accuracy", "mean prompt tokens", "mean latency s"):
        table.add_column(col)
    table.add_row("plain", f"{summary['accuracy_plain']:.1%}",
                  f"{summary['mean_prompt_tokens_plain']:.0f}",
                  f"{summary['mean_latency_plain_s']:.2f}")
    table.add_row("IC-Cache", f"{summary['accuracy_ic']:.1%}",
                  f"{summary['mean_prompt_tokens_ic']:.0f}", f"{summary['mean_latency_ic_s']:.2f}")
    console.print(table)
    console.print(f"fixed by IC: {summary['fixed_by_ic']}, broken by IC: {summary['broken_by_ic']}; "
                  f"questions the semantic cache would have answered (wrongly) from a related "
                  f"entry: {summary['wrong_semantic_hits']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "summary": summary, "rows": rows},
                                   indent=1))
    llm.close()
    sc.close()


if __name__ == "__main__":
    main()
