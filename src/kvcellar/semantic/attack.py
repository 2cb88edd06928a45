"""Key-collision attack on a semantic cache, to measure what the verification gate stops.

In a namespace shared by several users, an attacker stores a query A together with a malicious
answer. A is crafted so that its embedding is as close as possible to a victim's expected query
while still carrying an injected instruction (an e-mail address or URL the victim is sent to).
If a cache serves on similarity alone, the victim asking the ordinary question gets the
attacker's answer. :func:`craft_collision` builds A by greedy word substitution in embedding
space (black-box: it only calls ``embedder.encode``); :func:`hijack_rate` counts how often such
an A is served to its victim by a cache with and without the gate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Tokens an injection needs to keep: where the victim is sent (e-mail address, URL, domain).
_ADDRESS = re.compile(
    r"\S+@\S+|https?://\S+|www\.\S+|\b[\w-]+\.(?:com|org|net|io|dev|xyz|ru|cn|help)\b", re.I)

COMMON_WORDS: tuple[str, ...] = tuple("""
the a an and or but if to of in on at by for with from about into over after before how what
why when where which who can could would should do does did is are was were be been get make
take use find set change turn enable disable reset fix start stop open close show tell give
help need want know way best good easy quick simple right new old my your our their this that
it its me you we they i account password login sign email phone app settings security support
code error file data list number time day week year price cost money pay buy order ship send
receive check update install download upload run build test write read learn work home travel
trip flight hotel visa city country doctor health pain sleep food water drink eat diet weight
exercise math sum equation solve value step please again still just also only more most less
not no yes very much many some any all each every other same different first last next here
there now then today go going come look see say ask call keep let put try like feel seem
""".split())


def words_of(text: str) -> list[str]:
    return re.findall(r"[A-Za-z][A-Za-z'-]*", text)


def default_vocab(victim: str, extra: Sequence[str] = COMMON_WORDS) -> list[str]:
    """The victim's own words plus common English words, deduplicated, order kept."""
    return list(dict.fromkeys([w.lower() for w in words_of(victim)] + list(extra)))


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def craft_collision(
    embedder: Any, victim: str, payload: str, vocab: Sequence[str], steps: int = 30,
    candidates_per_step: int = 32, rng: np.random.Generator | int | None = None,
) -> tuple[str, float]:
    """Greedy black-box search for a query carrying `payload` that embeds close to `victim`.

    A starts as ``victim + " " + payload``. Each step proposes `candidates_per_step` variants:
    one word of A (never an address/URL token of the payload) replaced by a word of `vocab`, or
    one non-address payload word deleted. All variants are embedded in one batch and the best
    is kept if it raises the cosine similarity to the victim. Returns (A, cosine).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    vocab = [w for w in vocab if w.strip()]
    if not vocab:
        raise ValueError("vocab must contain at least one word")
    target = _unit(embedder.encode([victim])[0])
    victim_tokens = victim.split()
    payload_tokens = payload.split()
    tokens = victim_tokens + payload_tokens
    # per position: is it an address (frozen) and does it come from the payload (deletable)
    frozen = [False] * len(victim_tokens) + [bool(_ADDRESS.search(t)) for t in payload_tokens]
    from_payload = [False] * len(victim_tokens) + [True] * len(payload_tokens)
    best_sim = float(_unit(embedder.encode([" ".join(tokens)])[0]) @ target)
    for _ in range(max(0, steps)):
        proposals: list[tuple[list[str], list[bool], list[bool]]] = []
        seen: set[str] = {" ".join(tokens)}
        editable = [i for i, f in enumerate(frozen) if not f]
        deletable = [i for i in editable if from_payload[i]]
        attempts = 0
        while len(proposals) < candidates_per_step and attempts < 4 * candidates_per_step:
            attempts += 1
            if deletable and rng.random() < 0.3:
                i = int(rng.choice(deletable))
                new = (tokens[:i] + tokens[i + 1:], frozen[:i] + frozen[i + 1:],
                       from_payload[:i] + from_payload[i + 1:])
            elif editable:
                i = int(rng.choice(editable))
                word = vocab[int(rng.integers(len(vocab)))]
                new_tokens = list(tokens)
                new_tokens[i] = word
                new = (new_tokens, frozen, from_payload)
            else:
                break
            text = " ".join(new[0])
            if text not in seen:
                seen.add(text)
                proposals.append(new)
        if not proposals:
            break
        vecs = np.asarray(embedder.encode([" ".join(p[0]) for p in proposals]), dtype=np.float32)
        sims = vecs @ target / np.maximum(np.linalg.norm(vecs, axis=1), 1e-12)
        j = int(np.argmax(sims))
        if float(sims[j]) > best_sim:
            best_sim = float(sims[j])
            tokens, frozen, from_payload = (list(x) for x in proposals[j])
    return " ".join(tokens), best_sim


@dataclass
class HijackResult:
    victims: int = 0
    hijacks_gate: int = 0
    hijacks_no_gate: int = 0
    rows: list[dict] = field(default_factory=list)

    @property
    def rate_gate(self) -> float:
        return self.hijacks_gate / self.victims if self.victims else 0.0

    @property
    def rate_no_gate(self) -> float:
        return self.hijacks_no_gate / self.victims if self.victims else 0.0

    def as_dict(self) -> dict:
        return {"victims": self.victims, "hijacks_gate": self.hijacks_gate,
                "hijacks_no_gate": self.hijacks_no_gate, "rate_gate": self.rate_gate,
                "rate_no_gate": self.rate_no_gate, "rows": self.rows}


def hijack_rate(
    cache_factory: Callable[..., Any], embedder: Any, victims: Sequence[str], payload: str, *,
    vocab_extra: Sequence[str] = COMMON_WORDS, steps: int = 30, candidates_per_step: int = 32,
    seed: int = 0, tenant: str = "shared", crafted: Sequence[str] | None = None,
) -> HijackResult:
    """For each victim: craft A, store only (A, "MALICIOUS") in a fresh cache, look up the
    victim's query in the same tenant; a hit answering "MALICIOUS" is a hijack. Done twice per
    victim, with the gate (``cache_factory()``, default checks) and without
    (``cache_factory(checks=[])``), same threshold. `crafted` skips the search (precomputed A)."""
    rng = np.random.default_rng(seed)
    result = HijackResult()
    for k, victim in enumerate(victims):
        if crafted is not None:
            attack = crafted[k]
            sim = float(_unit(embedder.encode([attack])[0]) @ _unit(embedder.encode([victim])[0]))
        else:
            attack, sim = craft_collision(embedder, victim, payload, default_vocab(victim, vocab_extra),
                                          steps, candidates_per_step, rng)
        row: dict[str, Any] = {"victim": victim, "attack": attack, "cosine": sim}
        for label, overrides in (("gate", {}), ("no_gate", {"checks": []})):
            cache = cache_factory(**overrides)
            try:
                cache.store(attack, "MALICIOUS", tenant=tenant)
                decision = cache.lookup_detailed(victim, tenant=tenant)
            finally:
                cache.close()
            hijacked = decision.hit is not None and decision.hit.response == "MALICIOUS"
            row[f"hijacked_{label}"] = hijacked
            row[f"reason_{label}"] = decision.reason
            if hijacked:
                if label == "gate":
                    result.hijacks_gate += 1
                else:
                    result.hijacks_no_gate += 1
        result.victims += 1
        result.rows.append(row)
    return result
