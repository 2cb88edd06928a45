"""The served model as a judge in the verification gate.

A check like the others (`(query, candidate) -> reason | None`): the model is asked whether the
two questions ask for the same thing, and the candidate is vetoed unless P("yes") among
{yes, no} reaches `min_yes`. One prefill of ~100 tokens per judged candidate, and only for
candidates that passed the threshold and the cheaper checks, so it is put last in the gate.
How much it helps depends on the model: it is measured in benchmarks/semantic_cache.py.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcellar.semantic.lru import LRU

_SYSTEM = (
    "You compare two questions. Answer yes if they ask for exactly the same information, so "
    "that one answer fits both; answer no if anything differs (a name, a number, a date, "
    "negation, or what is asked). Reply with one word: yes or no."
)


class LLMJudgeCheck:
    name = "judge"

    def __init__(self, runner: Any, min_yes: float = 0.5, cache_size: int = 4096) -> None:
        self.runner = runner
        self.min_yes = min_yes
        self._yes = self._token_ids(["yes", "Yes", " yes", " Yes"])
        self._no = self._token_ids(["no", "No", " no", " No"])
        self._cache: LRU[tuple[str, str], float] = LRU(cache_size)

    def _token_ids(self, words: list[str]) -> list[int]:
        encoded = (self.runner.encode_text(w) for w in words)
        return sorted({ids[0] for ids in encoded if ids})

    def probability_same(self, query: str, candidate: str) -> float:
        key = (query, candidate)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        ids = self.runner.encode_chat([
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Question 1: {candidate}\nQuestion 2: {query}\n"
                                        "Do they ask the same thing?"},
        ])
        with self.runner.lock:
            logits = self.runner.forward(ids, self.runner.new_cache())
        pair = torch.stack([logits[self._yes].logsumexp(0), logits[self._no].logsumexp(0)])
        p_yes = float(torch.softmax(pair, dim=0)[0])
        self._cache.put(key, p_yes)
        return p_yes

    def __call__(self, query: str, candidate: str) -> str | None:
        p = self.probability_same(query, candidate)
        if p < self.min_yes:
            return f"judge says different (P(yes) = {p:.2f})"
        return None
