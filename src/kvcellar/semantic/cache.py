"""SemanticCache: answer a query that means the same as an earlier one, without the model.

A lookup never leaves its namespace (tenant x model x system prompt x answer-changing sampling
parameters). Inside it: exact match on normalised text first, then the HNSW neighbours of the
query embedding; a neighbour is served only if its similarity clears the (category, load and
feedback adjusted) threshold, the preceding turns of the conversation match turn by turn
(context chain), and the verification gate finds no changed negation, number, date, entity or
unaligned content. Anything else is a miss: a miss costs one model call, a wrong hit costs trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvcellar.errors import KvcellarError, StorageError
from kvcellar.semantic.config import SemanticSettings
from kvcellar.semantic.embed import Embedder
from kvcellar.semantic.index import IndexSet
from kvcellar.semantic.store import Entry, ResponseStore, SqliteStore
from kvcellar.semantic.verify import VerificationGate, default_checks

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]


class SemanticRequestError(KvcellarError, ValueError):
    """The query cannot be cached or looked up as given (empty, too long, malformed)."""


@dataclass
class Hit:
    response: str
    similarity: float
    entry_id: int
    kind: str  # "exact" | "semantic"
    category: str | None = None
    query: str = ""
    needs_verification: bool = False  # learned mode sampled this hit for re-checking


@dataclass
class Decision:
    """What a lookup decided and why: the hit, or the best rejected candidate and its reason."""

    hit: Hit | None
    category: str | None = None
    similarity: float | None = None
    candidate_id: int | None = None
    reason: str = ""
    rejected_by: str | None = None  # threshold, context, gate:<check>, learned


@dataclass
class Conversation:
    """A request split the way the cache keys it."""

    system: str
    context: list[str]  # preceding turns, oldest first, as "role: text"
    query: str  # the last user message

    @classmethod
    def parse(cls, query_or_messages: str | Messages) -> Conversation:
        if isinstance(query_or_messages, str):
            return cls("", [], query_or_messages)
        if not isinstance(query_or_messages, Sequence) or not query_or_messages:
            raise SemanticRequestError("give a query string or a non-empty list of messages")
        system, turns = [], []
        for i, message in enumerate(query_or_messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise SemanticRequestError(f"message {i} needs a 'role' and 'content'")
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            if not isinstance(content, str):
                raise SemanticRequestError(f"message {i} has no text content")
            if message["role"] in ("system", "developer"):
                system.append(content)
            else:
                turns.append((str(message["role"]), content))
        if not turns or turns[-1][0] != "user":
            raise SemanticRequestError("the last message must come from the user")
        return cls("\n".join(system), [f"{r}: {c}" for r, c in turns[:-1]], turns[-1][1])


def normalize_text(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace("\u2019", "'").strip().lower())
    return text.rstrip(" ?!.")


def _context_text(turn: str) -> str:
    return turn.split(": ", 1)[1] if ": " in turn else turn


class _TokenBucket:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate, self.burst = rate_per_s, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def error_upper_bound(errors: int, n: int, confidence: float) -> float:
    """One-sided Wilson upper bound on an error rate from n Bernoulli observations."""
    if n == 0:
        return 1.0
    z = {0.8: 0.8416, 0.9: 1.2816, 0.95: 1.6449, 0.99: 2.3263}.get(
        round(confidence, 2), _z(confidence))
    p = errors / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def _z(confidence: float) -> float:
    # Acklam-free: bisection on the normal CDF is plenty for a config value
    lo, hi = 0.0, 6.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < confidence:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Stats:
    counters: Counter = field(default_factory=Counter)
    rejections: Counter = field(default_factory=Counter)


class SemanticCache:
    """Embedded by default: in-process HNSW over a sqlite file. See the module docstring."""

    def __init__(
        self,
        settings: SemanticSettings | None = None,
        *,
        embedder: Embedder | None = None,
        store: ResponseStore | None = None,
        gate: VerificationGate | None = None,
        judge_runner: Any = None,
        model: str = "default",
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = SemanticSettings.build(**overrides)
        elif overrides:
            settings = SemanticSettings.build(**(settings.model_dump() | overrides))
        self.settings = settings
        self.model = model
        self.embedder = embedder or Embedder(settings.embedding_model)
        if store is None:
            if settings.redis_url:
                from kvcellar.semantic.redis_store import RedisStore

                store = RedisStore(settings.redis_url, prefix=settings.redis_prefix)
            else:
                store = SqliteStore(settings.path if settings.path == ":memory:"
                                    else Path(settings.path).expanduser())
        self.backend = store
        if gate is None:
            checks = default_checks(self.embedder.token_embeddings, settings.checks,
                                    settings.content_min_score, settings.scope_min_alignment)
            if settings.judge:
                if judge_runner is None:
                    raise KvcellarError("judge: true needs the model: pass judge_runner= (the "
                                        "server passes its own model)")
                from kvcellar.semantic.judge import LLMJudgeCheck

                checks.append(LLMJudgeCheck(judge_runner, settings.judge_min_yes))
            if settings.verifier_path:
                from kvcellar.semantic.verifier import PairVerifier, VerifierCheck

                checks.append(VerifierCheck(PairVerifier(settings.verifier_path),
                                            settings.verifier_min_probability))
            context_checks = None
            if settings.context_checks is not None:
                context_checks = default_checks(
                    self.embedder.token_embeddings, settings.context_checks,
                    settings.content_min_score, settings.scope_min_alignment)
            gate = VerificationGate(checks, context_checks)
        self.gate = gate
        self.indexes = IndexSet(
            self.embedder.dim, m=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction,
            ef_search=settings.hnsw_ef_search)
        self._lock = threading.RLock()
        self._stats = _Stats()
        self._buckets: dict[str, _TokenBucket] = {}
        self._load = 0
        self._category_vectors: list[tuple[str, np.ndarray]] | None = None
        self._last_served: dict[int, float] = {}
        self._rng = np.random.default_rng()
        self._cursor: Any = None
        self._last_sync = time.monotonic()
        self._needs_rebuild = True
        self._rebuild()

    def _rebuild(self) -> None:
        """Indexes from the store; with the store unreachable (Redis down) the cache answers
        every lookup with a miss and tries again at the next sync."""
        try:
            _, cursor = self.backend.changes(None)
            self.indexes.rebuild(self.backend.iter_index_rows())
        except StorageError as exc:
            log.warning("semantic cache store unavailable, serving misses: %s", exc)
            return
        self._cursor, self._needs_rebuild = cursor, False

    # ---- keys -------------------------------------------------------------------------------
    def namespace(self, conv: Conversation, tenant: str, sampling: Mapping[str, Any] | None,
                  model: str | None) -> str:
        system = hashlib.blake2b(conv.system.encode(), digest_size=8).hexdigest()
        knobs = json.dumps(dict(sampling or {}), sort_keys=True, default=str)
        raw = json.dumps([tenant, model or self.model, system, knobs])
        return f"{tenant}/{hashlib.blake2b(raw.encode(), digest_size=10).hexdigest()}"

    def _window(self, conv: Conversation) -> list[str]:
        w = self.settings.context_window
        return conv.context[-w:] if w else []

    def _exact_key(self, conv: Conversation) -> str:
        parts = [normalize_text(t) for t in self._window(conv)] + [normalize_text(conv.query)]
        return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()

    def _validate(self, conv: Conversation, tenant: str) -> None:
        if not tenant or not isinstance(tenant, str):
            raise SemanticRequestError("tenant must be a non-empty string")
        if not conv.query.strip():
            raise SemanticRequestError("the query is empty")
        size = len(conv.query) + sum(len(t) for t in conv.context) + len(conv.system)
        if size > self.settings.max_query_chars:
            raise SemanticRequestError(
                f"request has {size} characters, over max_query_chars="
                f"{self.settings.max_query_chars}; it is not cached")

    def _embed(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        window = self._window(conv)
        vecs = self.embedder.encode([conv.query] + [_context_text(t) for t in window])
        query_vec, ctx = vecs[0], (vecs[1:] if window else None)
        if ctx is None:
            return query_vec, None, query_vec
        fused = query_vec + 0.5 * ctx.mean(axis=0)
        return query_vec, ctx, (fused / np.linalg.norm(fused)).astype(np.float32)

    @staticmethod
    def _index_ns(namespace: str, conv: Conversation, window: int) -> str:
        return f"{namespace}:{'c' if conv.context and window else 'q'}"

    # ---- categories and thresholds ----------------------------------------------------------
    def classify(self, query: str, query_vec: np.ndarray | None = None) -> str | None:
        """Zero-shot: the category whose example queries are nearest, if near enough."""
        examples = [c for c in self.settings.categories if c.examples]
        if not examples:
            return None
        if self._category_vectors is None:
            self._category_vectors = [(c.name, self.embedder.encode(c.examples))
                                      for c in examples]
        if query_vec is None:
            query_vec = self.embedder.encode([query])[0]
        best, best_sim = None, self.settings.classifier_min_similarity
        for name, vecs in self._category_vectors:
            sim = float((vecs @ query_vec).max())
            if sim >= best_sim:
                best, best_sim = name, sim
        return best

    def _lowest_threshold(self) -> float:
        s = self.settings
        if s.learned.enabled:
            return s.learned.floor
        return min([self.threshold(None)] + [self.threshold(c.name) for c in s.categories])

    def set_load(self, queue_depth: int) -> None:
        """Server queue depth: under load thresholds relax, within each category's bounds."""
        self._load = max(0, int(queue_depth))

    def threshold(self, category: str | None) -> float:
        s = self.settings
        cat = s.category(category)
        base = cat.threshold if cat and cat.threshold is not None else s.threshold
        relax = s.load_relax_max * min(1.0, self._load / s.load_full_depth)
        floor = cat.min_threshold if cat and cat.min_threshold is not None else base - s.load_relax_max
        return max(floor, base - relax)

    # ---- lookup ------------------------------------------------------------------------------
    def lookup(self, query_or_messages: str | Messages, tenant: str = "default",
               category: str | None = None, *, sampling: Mapping[str, Any] | None = None,
               model: str | None = None) -> Hit | None:
        return self.lookup_detailed(query_or_messages, tenant, category, sampling=sampling,
                                    model=model).hit

    def lookup_detailed(self, query_or_messages: str | Messages, tenant: str = "default",
                        category: str | None = None, *,
                        sampling: Mapping[str, Any] | None = None,
                        model: str | None = None) -> Decision:
        conv = Conversation.parse(query_or_messages)
        self._validate(conv, tenant)
        try:
            return self._lookup(conv, tenant, category, sampling, model)
        except StorageError as exc:
            log.warning("semantic lookup failed, treated as a miss: %s", exc)
            self._count("store_errors")
            self._needs_rebuild = True
            return self._miss(Decision(None, category, reason="store unavailable"))

    def _lookup(self, conv: Conversation, tenant: str, category: str | None,
                sampling: Mapping[str, Any] | None, model: str | None) -> Decision:
        self.sync()
        if self._needs_rebuild:
            return self._miss(Decision(None, category, reason="store unavailable"))
        now = time.time()
        ns = self.namespace(conv, tenant, sampling, model)
        ins = self._index_ns(ns, conv, self.settings.context_window)
        self._count("lookups")
        cat_cfg = self.settings.category(category)
        if cat_cfg is not None and not cat_cfg.enabled:
            return self._miss(Decision(None, category, reason="category disabled"))
        exact = self.backend.find_exact(ins, self._exact_key(conv))
        if (exact is not None and not exact.expired(now) and exact.min_similarity < 1.0
                and (category is None or exact.category == category)):
            return self._serve(exact, 1.0, "exact", now)
        query_vec, ctx_vecs, index_vec = self._embed(conv)
        if category is None and self.settings.categories:
            category = self.classify(conv.query, query_vec)
            cat_cfg = self.settings.category(category)
            if cat_cfg is not None and not cat_cfg.enabled:
                return self._miss(Decision(None, category, reason="category disabled"))
        best = Decision(None, category, reason="no candidate")
        # In a namespace without context the index holds the query vector itself, so the ANN
        # similarity is the one thresholds apply to: candidates below every threshold that
        # could apply are never fetched (most lookups at scale are misses).
        floor = self._lowest_threshold() if ins.endswith(":q") else -1.0
        for label, ann_sim in self.indexes.search(ins, index_vec, self.settings.candidates):
            if ann_sim < floor - 1e-4:
                below = self._reject(Decision(
                    None, category, ann_sim, label,
                    f"similarity {ann_sim:.3f} below threshold {floor:.3f}"), "threshold")
                if best.similarity is None:  # else a closer candidate's reason stands
                    best = below
                break
            entry = self.backend.get(label)
            if entry is None or entry.namespace != ins:
                self.indexes.remove(ins, label)  # deleted elsewhere, or corrupt
                continue
            if entry.expired(now):
                self._evict([entry.id], "expired")
                continue
            if category is not None and entry.category not in (None, category):
                continue
            decision = self._judge(conv, query_vec, ctx_vecs, entry, category)
            if decision.hit is not None:
                return self._serve(entry, decision.similarity or 0.0, "semantic", now,
                                   decision.hit.needs_verification)
            if best.similarity is None or (decision.similarity or 0) > best.similarity:
                best = decision
        return self._miss(best)

    def _judge(self, conv: Conversation, query_vec: np.ndarray, ctx_vecs: np.ndarray | None,
               entry: Entry, category: str | None) -> Decision:
        sim = float(entry.vector @ query_vec)
        decision = Decision(None, category, sim, entry.id)
        learned = self.settings.learned
        threshold = learned.floor if learned.enabled else self.threshold(entry.category or category)
        if sim < max(threshold, entry.min_similarity):
            decision.reason = f"similarity {sim:.3f} below threshold {threshold:.3f}"
            return self._reject(decision, "threshold")
        window = self._window(conv)
        if len(window) != len(entry.context) or (ctx_vecs is None) != (entry.context_vectors is None):
            decision.reason = "different conversation length"
            return self._reject(decision, "context")
        if ctx_vecs is not None and entry.context_vectors is not None:
            turn_sims = (ctx_vecs * entry.context_vectors).sum(axis=1)
            roles_match = [t.split(":", 1)[0] for t in window] == [
                t.split(":", 1)[0] for t in entry.context]
            if not roles_match or float(turn_sims.min()) < self.settings.context_threshold:
                decision.reason = f"context differs (turn similarity {float(turn_sims.min()):.3f})"
                return self._reject(decision, "context")
        verdict = self.gate.verify(conv.query, entry.query, window, entry.context)
        if not verdict.ok:
            decision.reason = f"gate: {verdict.reason}"
            return self._reject(decision, f"gate:{verdict.check}")
        needs_verification = False
        if learned.enabled:
            serve, needs_verification = self._learned_decision(entry, sim)
            if not serve:
                decision.reason = "learned threshold: not enough evidence at this similarity"
                return self._reject(decision, "learned")
        decision.hit = Hit(entry.response, sim, entry.id, "semantic", entry.category,
                           entry.query, needs_verification)
        return decision

    def _learned_decision(self, entry: Entry, sim: float) -> tuple[bool, bool]:
        """Serve when the error rate among observations at or below this similarity is, with
        the configured confidence, under delta (monotone: lower similarity is never safer).
        Without enough such evidence fall back to the static threshold and ask for a check."""
        learned = self.settings.learned
        harder = [ok for s, ok in entry.observations if s <= sim + 1e-9]
        sample = bool(self._rng.random() < learned.reverify_rate)
        if len(harder) >= learned.min_observations:
            bound = error_upper_bound(harder.count(False), len(harder), learned.confidence)
            return bound <= learned.delta, sample
        static_ok = sim >= self.threshold(entry.category)
        # an explored hit: served, but the caller is asked to compare against a fresh answer
        return static_ok, static_ok

    def _reject(self, decision: Decision, why: str) -> Decision:
        self._stats.rejections[why] += 1
        decision.rejected_by = why
        return decision

    def _serve(self, entry: Entry, similarity: float, kind: str, now: float,
               needs_verification: bool = False) -> Decision:
        self.backend.touch(entry.id, now)
        self._last_served[entry.id] = similarity
        if len(self._last_served) > 100_000:
            self._last_served.pop(next(iter(self._last_served)))
        self._count(f"{kind}_hits")
        hit = Hit(entry.response, similarity, entry.id, kind, entry.category, entry.query,
                  needs_verification)
        return Decision(hit, entry.category, similarity, entry.id, kind)

    def _miss(self, decision: Decision) -> Decision:
        self._count("misses")
        return decision

    def _count(self, name: str, n: int = 1) -> None:
        self._stats.counters[name] += n

    # ---- store -------------------------------------------------------------------------------
    def store(self, query_or_messages: str | Messages, response: str, tenant: str = "default",
              category: str | None = None, ttl: float | None = None, *,
              sampling: Mapping[str, Any] | None = None, model: str | None = None) -> int | None:
        """Cache `response` for this query; the entry id, or None when admission refused it."""
        conv = Conversation.parse(query_or_messages)
        self._validate(conv, tenant)
        if not isinstance(response, str) or not response.strip():
            raise SemanticRequestError("the response to cache must be non-empty text")
        adm = self.settings.admission
        if len(response) > adm.max_response_chars:
            self._count("admission_rejected")
            return None
        if ttl is not None and ttl <= 0:
            raise SemanticRequestError("ttl must be positive seconds")
        query_vec, ctx_vecs, index_vec = self._embed(conv)
        if category is None and self.settings.categories:
            category = self.classify(conv.query, query_vec)
        cat_cfg = self.settings.category(category)
        if cat_cfg is not None and not cat_cfg.enabled:
            self._count("stores_skipped_disabled")
            return None
        if not self._admit(tenant):
            self._count("admission_rejected")
            return None
        try:
            return self._store(conv, response, tenant, category, ttl, sampling, model,
                               query_vec, ctx_vecs, index_vec)
        except StorageError as exc:
            log.warning("semantic store failed, answer not cached: %s", exc)
            self._count("store_errors")
            self._needs_rebuild = True
            return None

    def _store(self, conv: Conversation, response: str, tenant: str, category: str | None,
               ttl: float | None, sampling: Mapping[str, Any] | None, model: str | None,
               query_vec: np.ndarray, ctx_vecs: np.ndarray | None,
               index_vec: np.ndarray) -> int:
        cat_cfg = self.settings.category(category)
        now = time.time()
        ttl = ttl or (cat_cfg.ttl_s if cat_cfg else None) or self.settings.ttl_s
        ns = self.namespace(conv, tenant, sampling, model)
        ins = self._index_ns(ns, conv, self.settings.context_window)
        exact_key = self._exact_key(conv)
        with self._lock:
            old = self.backend.find_exact(ins, exact_key)
            if old is not None:
                self._evict([old.id], "replaced")
            entry = Entry(
                id=secrets.randbits(63), namespace=ins, tenant=tenant, category=category,
                exact_key=exact_key, query=conv.query, context=self._window(conv),
                response=response, vector=query_vec, index_vector=index_vec,
                context_vectors=ctx_vecs, created=now, expires=now + ttl if ttl else None,
                last_used=now)
            self._make_room(tenant, category)
            self.backend.put(entry)
            self.indexes.add(ins, entry.id, index_vec)
        self._count("stores")
        return entry.id

    def _admit(self, tenant: str) -> bool:
        rate = self.settings.admission.writes_per_minute
        if rate is None:
            return True
        with self._lock:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _TokenBucket(rate / 60.0, self.settings.admission.burst)
            return bucket.take()

    def _make_room(self, tenant: str, category: str | None) -> None:
        """Quotas are hard limits: evict least-recently-used entries before inserting."""
        self.purge_expired()
        cat_cfg = self.settings.category(category)
        if cat_cfg is not None and cat_cfg.quota is not None:
            over = self.backend.count(tenant, category) - cat_cfg.quota + 1
            self._evict(self.backend.lru(tenant, category, over), "quota")
        cap = self.settings.admission.max_entries_per_tenant
        if cap is not None:
            over = self.backend.count(tenant) - cap + 1
            self._evict(self.backend.lru(tenant, None, over), "tenant_cap")

    def _evict(self, ids: list[int], reason: str) -> dict[int, str]:
        removed = self.backend.delete(ids) if ids else {}
        for eid, ns in removed.items():
            self.indexes.remove(ns, eid)
        self._stats.counters[f"evicted_{reason}"] += len(removed)
        return removed

    def purge_expired(self) -> int:
        ids = self.backend.expired(time.time())
        self._evict(ids, "expired")
        return len(ids)

    # ---- feedback, deletion, sharing ---------------------------------------------------------
    def feedback(self, entry_id: int, correct: bool, similarity: float | None = None) -> None:
        """Record whether a served answer was right. A wrong exact hit deletes the entry; a
        wrong semantic hit raises that entry's own threshold above the similarity it was
        served at; in learned mode every report becomes an observation."""
        entry = self.backend.get(entry_id)
        if entry is None:
            raise KeyError(f"no semantic cache entry {entry_id}")
        sim = similarity if similarity is not None else self._last_served.get(entry_id, 1.0)
        self._count("feedback_correct" if correct else "feedback_wrong")
        if not correct and sim >= 1.0 - 1e-6:
            self.delete(entry_id)
            return
        observations = [*entry.observations, (float(sim), bool(correct))][-256:]
        min_sim = entry.min_similarity
        if not correct and not self.settings.learned.enabled:
            min_sim = max(min_sim, float(np.nextafter(np.float32(sim), np.float32(2.0))))
        self.backend.update_feedback(entry_id, min_sim, observations)

    def delete(self, entry_id: int) -> bool:
        return bool(self._evict([entry_id], "deleted"))

    def clear(self, tenant: str | None = None) -> int:
        """Remove every entry of one tenant (or all); returns how many."""
        ids = self.backend.ids(tenant=tenant)
        self._evict(ids, "cleared")
        return len(ids)

    def sync(self, force: bool = False) -> int:
        """Apply other processes' writes (from the store's change log) to the local indexes."""
        now = time.monotonic()
        if not force and now - self._last_sync < self.settings.sync_interval_s:
            return 0
        self._last_sync = now
        if self._needs_rebuild:
            self._rebuild()
            return 0
        applied = 0
        while True:
            events, cursor = self.backend.changes(self._cursor)
            if not events:
                return applied
            self._cursor = cursor
            for op, eid in events:
                if op == "del":
                    self.indexes.discard(eid)
                else:
                    entry = self.backend.get(eid)
                    if entry is not None:
                        self.indexes.add(entry.namespace, entry.id, entry.index_vector)
                applied += 1

    # ---- IC-Cache ----------------------------------------------------------------------------
    def examples(self, query_or_messages: str | Messages, tenant: str = "default", k: int | None = None,
                 *, sampling: Mapping[str, Any] | None = None,
                 model: str | None = None) -> list[tuple[str, str, float]]:
        """The k most similar cached (query, response, similarity) of the namespace, for use as
        in-context examples on a miss (IC-Cache). No gate: these are examples, not answers."""
        k = k or self.settings.ic_examples or 3
        conv = Conversation.parse(query_or_messages)
        self._validate(conv, tenant)
        ns = self.namespace(conv, tenant, sampling, model)
        query_vec = self.embedder.encode([conv.query])[0]
        found = []
        now = time.time()
        for suffix in ("q", "c"):
            for label, _ in self.indexes.search(f"{ns}:{suffix}", query_vec, k * 2):
                try:
                    entry = self.backend.get(label)
                except StorageError:
                    return []
                if entry is None or entry.expired(now):
                    continue
                sim = float(entry.vector @ query_vec)
                if sim >= self.settings.ic_min_similarity and normalize_text(
                        entry.query) != normalize_text(conv.query):
                    found.append((entry.query, entry.response, sim))
        found.sort(key=lambda x: -x[2])
        return found[:k]

    @staticmethod
    def augment(messages: str | Messages, examples: list[tuple[str, str, float]]) -> list[dict]:
        """Messages with the examples inserted as earlier user/assistant turns after the system
        prompt, most similar last (nearest the question)."""
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else [
            dict(m) for m in messages]
        head = [m for m in msgs if m.get("role") in ("system", "developer")]
        rest = [m for m in msgs if m.get("role") not in ("system", "developer")]
        shots: list[dict] = []
        for query, response, _ in reversed(examples):
            shots += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return head + shots + rest

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self._stats.counters
        lookups = c["lookups"]
        hits = c["exact_hits"] + c["semantic_hits"]
        try:
            entries: int | None = self.backend.count()
        except StorageError:
            entries = None
        return {
            "entries": entries,
            "indexed": len(self.indexes),
            "lookups": lookups, "exact_hits": c["exact_hits"],
            "semantic_hits": c["semantic_hits"], "misses": c["misses"],
            "hit_rate": hits / lookups if lookups else 0.0,
            "stores": c["stores"], "admission_rejected": c["admission_rejected"],
            "store_errors": c["store_errors"],
            "rejections": dict(self._stats.rejections),
            "evictions": {k.removeprefix("evicted_"): v for k, v in c.items()
                          if k.startswith("evicted_")},
            "feedback": {"correct": c["feedback_correct"], "wrong": c["feedback_wrong"]},
            "load": self._load, "threshold": self.threshold(None),
        }

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
