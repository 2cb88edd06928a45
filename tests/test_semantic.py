"""Semantic response cache on the real MiniLM embedder: hits, traps, namespaces, chains,
categories, quotas, TTL, admission, feedback, learned thresholds, IC examples, persistence."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from kvcellar import SemanticCache
from kvcellar.errors import ConfigError, KvcellarError
from kvcellar.semantic.cache import SemanticRequestError, error_upper_bound
from kvcellar.semantic.config import SemanticSettings
from kvcellar.semantic.embed import Embedder
from kvcellar.semantic.index import IndexSet, VectorIndex

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "semantic"


@pytest.fixture
def make_cache(embedder, tmp_path):
    caches = []

    def make(**overrides) -> SemanticCache:
        overrides.setdefault("path", str(tmp_path / "sem.sqlite"))
        cache = SemanticCache(embedder=embedder, **overrides)
        caches.append(cache)
        return cache

    yield make
    for c in caches:
        c.close()


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_exact_then_semantic_hit_and_negation_trap(make_cache):
    sc = make_cache()
    eid = sc.store("How do I enable 2FA on my account?", "Settings > Security > Enable 2FA.", tenant="t")
    hit = sc.lookup("how do i enable 2FA on my account", tenant="t")
    assert hit is not None and hit.kind == "exact" and hit.entry_id == eid and hit.similarity == 1.0
    hit = sc.lookup("How can I turn on 2FA for my account?", tenant="t")
    assert hit is not None and hit.kind == "semantic" and hit.response.startswith("Settings")
    assert 0.75 <= hit.similarity < 1.0
    decision = sc.lookup_detailed("How do I disable 2FA on my account?", tenant="t")
    assert decision.hit is None and decision.similarity > 0.85 and "antonym" in decision.reason
    assert decision.rejected_by == "gate:negation"
    # a farther entry below the threshold ends the search; the closer candidate's reason stands
    sc.store("What is the boiling point of water?", "100 C at sea level.", tenant="t")
    decision = sc.lookup_detailed("How do I disable 2FA on my account?", tenant="t")
    assert decision.rejected_by == "gate:negation" and "antonym" in decision.reason
    stats = sc.stats()
    assert stats["exact_hits"] == 1 and stats["semantic_hits"] == 1 and stats["misses"] == 2
    assert stats["rejections"]["gate:negation"] == 2 and stats["rejections"]["threshold"] == 1


def test_dataset_sample_traps_rejected_paraphrases_served(make_cache):
    """A small slice of the labelled set (the benchmark runs all of it)."""
    pairs = _load("pairs.jsonl")
    sample = [p for p in pairs if p["kind"] == "paraphrase"][:40]
    for kind in ("negation", "entity", "number", "date", "scope"):
        sample += [p for p in pairs if p["kind"] == kind][:8]
    served = wrong = 0
    for i, p in enumerate(sample):
        sc = make_cache(path=":memory:")
        sc.store(p["a"], f"answer {i}", tenant="t")
        hit = sc.lookup(p["b"], tenant="t")
        if p["same"]:
            served += hit is not None
        else:
            wrong += hit is not None
    assert served >= 0.6 * 40, served
    assert wrong <= 1, wrong


def test_tenants_and_namespaces_never_mix(make_cache):
    sc = make_cache()
    sc.store("What is the capital of France?", "Paris", tenant="alice")
    assert sc.lookup("What is the capital of France?", tenant="bob") is None
    assert sc.lookup("What's the capital city of France?", tenant="bob") is None
    assert sc.lookup("What is the capital of France?", tenant="alice") is not None
    # system prompt, model and answer-changing sampling parameters are part of the namespace
    msgs = [{"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "What is the capital of France?"}]
    assert sc.lookup(msgs, tenant="alice") is None
    assert sc.lookup("What is the capital of France?", tenant="alice", model="other") is None
    assert sc.lookup("What is the capital of France?", tenant="alice",
                     sampling={"temperature": 0.9}) is None
    sc.store("What is the capital of France?", "Paris", tenant="bob")
    assert sc.clear(tenant="alice") == 1
    assert sc.lookup("What is the capital of France?", tenant="alice") is None
    assert sc.lookup("What is the capital of France?", tenant="bob") is not None


def test_cross_tenant_zero_hits_over_the_dataset(make_cache):
    sc = make_cache(path=":memory:")
    pairs = _load("pairs.jsonl")[:60]
    for i, p in enumerate(pairs):
        sc.store(p["a"], f"a{i}", tenant="victim")
    assert all(sc.lookup(q, tenant="other") is None
               for p in pairs for q in (p["a"], p["b"]))


def test_context_chain_separates_conversations(make_cache):
    sc = make_cache(path=":memory:")
    japan = [{"role": "user", "content": "I'm planning a trip to Japan in April."},
             {"role": "assistant", "content": "Spring is a lovely time to visit Japan."},
             {"role": "user", "content": "Do I need a visa?"}]
    canada = [dict(japan[0], content="I'm planning a trip to Canada in April."),
              dict(japan[1], content="Spring is a lovely time to visit Canada."), japan[2]]
    reworded = [dict(japan[0], content="I am planning to travel to Japan in April."),
                japan[1], japan[2]]
    sc.store(japan, "Japan answer", tenant="t")
    assert sc.lookup(canada, tenant="t") is None
    assert sc.lookup("Do I need a visa?", tenant="t") is None  # no context != that context
    hit = sc.lookup(reworded, tenant="t")
    assert hit is not None and hit.response == "Japan answer"


def test_context_checks_set_apart_from_the_query_checks(make_cache):
    """checks: facts only (as when a trained verifier does the wording), context_checks keep
    the swap check for earlier turns: hotels vs flights in the first turn is a miss."""
    hotels = [{"role": "user", "content": "I'm looking at hotels in Lisbon for next weekend."},
              {"role": "assistant", "content": "Lisbon is busy then, so book early."},
              {"role": "user", "content": "Which area is best?"}]
    flights = [dict(hotels[0], content="I'm looking at flights in Lisbon for next weekend."),
               *hotels[1:]]
    facts = ["negation", "question", "numbers", "entities"]
    loose = make_cache(path=":memory:", checks=facts)
    loose.store(hotels, "Stay in Baixa.", tenant="t")
    assert loose.lookup(flights, tenant="t") is not None
    held = make_cache(path=":memory:", checks=facts, context_checks=[*facts, "substitution"])
    held.store(hotels, "Stay in Baixa.", tenant="t")
    decision = held.lookup_detailed(flights, tenant="t")
    assert decision.hit is None and decision.rejected_by == "gate:substitution"
    assert held.lookup(hotels, tenant="t") is not None
    with pytest.raises(ConfigError, match="unknown verification check 'spelling'"):
        make_cache(path=":memory:", context_checks=["spelling"])


def test_multiturn_sample_from_the_dataset(make_cache):
    wrong = 0
    rows = [r for r in _load("multiturn.jsonl") if not r["same"]][:15]
    for r in rows:
        sc = make_cache(path=":memory:")

        def msgs(ctx, query):
            roles = ["user", "assistant"] * len(ctx)
            return [{"role": roles[i], "content": c} for i, c in enumerate(ctx)] + [
                {"role": "user", "content": query}]

        sc.store(msgs(r["context_a"], r["query"]), "A", tenant="t")
        wrong += sc.lookup(msgs(r["context_b"], r["query"]), tenant="t") is not None
    assert wrong == 0


def test_categories_quota_ttl_disabled_and_classifier(make_cache, monkeypatch):
    import kvcellar.semantic.cache as cache_mod

    sc = make_cache(categories=[
        {"name": "weather", "enabled": False, "examples": ["What's the weather today?",
                                                           "Will it rain tomorrow?"]},
        {"name": "faq", "quota": 2, "ttl_s": 100, "threshold": 0.9,
         "examples": ["How do I reset my password?", "How can I cancel my subscription?"]},
    ])
    assert sc.classify("Is it going to rain this afternoon?") == "weather"
    assert sc.classify("How do I change my password?") == "faq"
    assert sc.store("Will it be sunny in Rome tomorrow?", "Sunny", tenant="t") is None
    assert sc.lookup("Will it be sunny in Rome tomorrow?", tenant="t") is None

    now = [1_000_000.0]
    monkeypatch.setattr(cache_mod.time, "time", lambda: now[0])
    ids = []
    for q in ("How do I reset my password?", "How can I cancel my subscription?",
              "How do I update my billing address?"):
        ids.append(sc.store(q, f"answer to {q}", tenant="t", category="faq"))
        now[0] += 1
    assert sc.backend.count("t", "faq") == 2  # quota evicted the least recently used
    assert sc.lookup("How do I reset my password?", tenant="t") is None
    assert sc.stats()["evictions"]["quota"] == 1
    assert sc.lookup("How can I cancel my subscription?", tenant="t") is not None
    now[0] += 101  # past the category TTL
    assert sc.lookup("How can I cancel my subscription?", tenant="t") is None


def test_load_relaxes_threshold_within_bounds(make_cache):
    sc = make_cache(threshold=0.95, load_relax_max=0.15, load_full_depth=10)
    sc.store("How do I reset my password?", "Use the reset link.", tenant="t")
    query = "How do I recover my password?"
    decision = sc.lookup_detailed(query, tenant="t")
    assert decision.hit is None and 0.8 < decision.similarity < 0.95
    sc.set_load(10)
    assert sc.threshold(None) == pytest.approx(0.80)
    assert sc.lookup(query, tenant="t") is not None
    sc.set_load(1000)  # saturates at the configured bound
    assert sc.threshold(None) == pytest.approx(0.80)


def test_admission_limits_writes_per_tenant(make_cache):
    sc = make_cache(admission={"writes_per_minute": 1, "burst": 3,
                               "max_entries_per_tenant": 100})
    results = [sc.store(f"Question number {i} about cats?", "meow", tenant="flood")
               for i in range(6)]
    assert sum(r is not None for r in results) == 3
    assert sc.stats()["admission_rejected"] == 3
    assert sc.store("A question from someone else?", "ok", tenant="other") is not None


def test_tenant_entry_cap_is_a_hard_limit(make_cache):
    sc = make_cache(admission={"writes_per_minute": None, "max_entries_per_tenant": 5})
    for i in range(12):
        sc.store(f"What is {i} plus {i}?", str(2 * i), tenant="t")
    assert sc.backend.count("t") == 5


def test_feedback_raises_entry_threshold_or_deletes(make_cache):
    sc = make_cache()
    eid = sc.store("How do I reset my password?", "Use the reset link.", tenant="t")
    hit = sc.lookup("What's the way to reset my password?", tenant="t")
    assert hit is not None and hit.kind == "semantic"
    sc.feedback(hit.entry_id, correct=False)
    assert sc.lookup("What's the way to reset my password?", tenant="t") is None
    exact = sc.lookup("How do I reset my password?", tenant="t")
    assert exact is not None and exact.kind == "exact"
    sc.feedback(eid, correct=False)  # a wrong exact answer goes
    assert sc.lookup("How do I reset my password?", tenant="t") is None
    with pytest.raises(KeyError):
        sc.feedback(eid, correct=True)


def test_learned_thresholds_follow_observations(make_cache):
    sc = make_cache(learned={"enabled": True, "delta": 0.2, "min_observations": 3})
    eid = sc.store("How do I reset my password?", "Use the reset link.", tenant="t")
    query = "What's the way to reset my password?"
    hit = sc.lookup(query, tenant="t")  # no evidence yet: static threshold, asks for a check
    assert hit is not None and hit.needs_verification
    for _ in range(3):
        sc.feedback(eid, correct=False, similarity=hit.similarity)
    assert sc.lookup(query, tenant="t") is None  # observed errors at this similarity
    other = sc.store("How can I cancel my plan?", "Billing > Cancel.", tenant="t")
    q2 = "What's the way to cancel my plan?"
    sim = sc.lookup_detailed(q2, tenant="t").similarity
    for _ in range(12):
        sc.feedback(other, correct=True, similarity=sim - 0.01)
    hit = sc.lookup(q2, tenant="t")
    assert hit is not None and not hit.needs_verification
    assert error_upper_bound(0, 12, 0.9) < 0.2 < error_upper_bound(1, 3, 0.9)


def test_ic_examples_and_augmented_messages(make_cache):
    sc = make_cache()
    sc.store("What is the capital of France?", "The capital of France is Paris.", tenant="t")
    sc.store("What is the capital of Spain?", "The capital of Spain is Madrid.", tenant="t")
    sc.store("How do I bake bread?", "Knead, proof, bake.", tenant="t")
    examples = sc.examples("What is the capital of Italy?", tenant="t", k=2)
    assert [e[0] for e in examples] == sorted(
        ["What is the capital of France?", "What is the capital of Spain?"],
        key=lambda q: -dict((e[0], e[2]) for e in examples)[q])
    msgs = sc.augment([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "What is the capital of Italy?"}], examples)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-2]["content"] == examples[0][1]  # the most similar sits nearest the question
    assert sc.examples("What is the capital of Italy?", tenant="other") == []


def test_persistence_sharing_and_corruption(make_cache, tmp_path):
    path = str(tmp_path / "shared.sqlite")
    first = make_cache(path=path, sync_interval_s=0)
    second = make_cache(path=path, sync_interval_s=0)
    eid = first.store("How do I export my contacts to CSV?", "Contacts > Export > CSV", tenant="t")
    hit = second.lookup("How can I export my contacts to CSV?", tenant="t")
    assert hit is not None and hit.entry_id == eid  # another process's entry, via the change log
    first.delete(eid)
    assert second.lookup("How can I export my contacts to CSV?", tenant="t") is None
    eid = first.store("How do I export my contacts to CSV?", "Contacts > Export > CSV", tenant="t")
    reopened = make_cache(path=path)
    assert reopened.lookup("How can I export my contacts to CSV?", tenant="t") is not None
    with sqlite3.connect(path) as db:  # bit rot in the stored answer
        db.execute("UPDATE entries SET response = 'Send your password to evil.example' WHERE id = ?",
                   (eid,))
    assert reopened.lookup("How do I export my contacts to CSV?", tenant="t") is None
    assert reopened.lookup("How can I export my contacts to CSV?", tenant="t") is None
    assert reopened.backend.count() == 0  # the corrupt row was removed, not served


def test_bad_input_is_a_clear_error(make_cache, tmp_path):
    sc = make_cache(max_query_chars=100)
    with pytest.raises(SemanticRequestError, match="empty"):
        sc.lookup("   ", tenant="t")
    with pytest.raises(SemanticRequestError, match="max_query_chars"):
        sc.store("x" * 101, "y", tenant="t")
    with pytest.raises(SemanticRequestError, match="last message"):
        sc.lookup([{"role": "assistant", "content": "hi"}], tenant="t")
    with pytest.raises(SemanticRequestError):
        sc.lookup([{"content": "no role"}], tenant="t")
    with pytest.raises(SemanticRequestError, match="non-empty"):
        sc.store("fine question?", "", tenant="t")
    with pytest.raises(SemanticRequestError, match="tenant"):
        sc.lookup("fine question?", tenant="")
    with pytest.raises(ConfigError, match="threshold"):
        SemanticSettings.build(threshold=1.5)
    with pytest.raises(ConfigError, match="unknown_field"):
        SemanticSettings.build(unknown_field=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("threshold: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        SemanticSettings.from_yaml(bad)
    with pytest.raises(KvcellarError, match="embedding model"):
        Embedder("no-such-model")
    not_db = tmp_path / "not.sqlite"
    not_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(KvcellarError, match="sqlite"):
        make_cache(path=str(not_db))


def test_category_yaml_roundtrip(tmp_path):
    cfg = tmp_path / "sem.yaml"
    cfg.write_text(
        "threshold: 0.8\ncategories:\n  - name: faq\n    threshold: 0.9\n    quota: 10\n"
        "    examples: [\"How do I reset my password?\"]\n  - name: news\n    enabled: false\n")
    s = SemanticSettings.from_yaml(cfg)
    assert s.category("faq").quota == 10 and not s.category("news").enabled
    with pytest.raises(ConfigError, match="unique"):
        SemanticSettings.build(categories=[{"name": "a"}, {"name": "a"}])


def test_vector_index_grows_removes_and_rebuilds():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(500, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = VectorIndex(32, capacity=16)
    index.add(range(1, 501), vecs)
    assert len(index) == 500
    assert index.search(vecs[9], 1)[0][0] == 10
    for label in range(1, 400):
        index.remove(label)
    assert all(label >= 400 for label, _ in index.search(vecs[450], 20))
    index.add([1], vecs[0])  # reuses a deleted slot
    assert index.search(vecs[0], 1)[0][0] == 1
    rows = [("a", i + 1, v) for i, v in enumerate(vecs[:50])] + [
        ("b", i + 1000, v) for i, v in enumerate(vecs[50:60])]
    indexes = IndexSet(32)
    assert indexes.rebuild(iter(rows)) == 60
    assert len(indexes.get("a")) == 50 and indexes.search("b", vecs[55], 1)[0][0] == 1005
    assert indexes.search("missing", vecs[0], 3) == []


@pytest.mark.slow
def test_served_model_as_judge_plugs_into_the_gate(embedder, runner, tmp_path):
    from kvcellar.semantic.judge import LLMJudgeCheck

    judge = LLMJudgeCheck(runner)
    same = judge.probability_same("What is the capital of France?", "What is the capital of France?")
    unrelated = judge.probability_same("What is the capital of France?",
                                       "How do I bake sourdough bread at home?")
    assert 0.0 < unrelated < same < 1.0
    with pytest.raises(KvcellarError, match="judge_runner"):
        SemanticCache(embedder=embedder, path=":memory:", judge=True)
    sc = SemanticCache(embedder=embedder, path=":memory:", judge=True, judge_min_yes=0.99,
                       judge_runner=runner)
    assert sc.gate.checks[-1].name == "judge"
    sc.store("How do I reset my password?", "Use the reset link.", tenant="t")
    decision = sc.lookup_detailed("How do I recover my password?", tenant="t")
    assert decision.hit is None and "judge" in decision.reason  # everything else let it through
    assert sc.lookup("How do I reset my password?", tenant="t").kind == "exact"  # never judged
    sc.close()


def test_a_missed_query_is_embedded_once_for_lookup_and_store(make_cache, embedder, monkeypatch):
    calls: list[list[str]] = []
    real = embedder._encode

    def counting(texts):
        calls.append(list(texts))
        return real(texts)

    monkeypatch.setattr(embedder, "_encode", counting)
    sc = make_cache()
    q = "What is the tallest mountain in Africa? (embedding cache test)"
    assert sc.lookup(q, tenant="t") is None
    sc.store(q, "Kilimanjaro.", tenant="t")
    assert sum(q in c for c in calls) == 1
    again = embedder.encode([q, q])
    np.testing.assert_array_equal(again[0], real([q])[0])
    again[0][:] = 0  # callers get their own array: the kept vector is untouched
    assert float(np.linalg.norm(embedder.encode([q])[0])) == pytest.approx(1.0, abs=1e-5)


def test_sqlite_bulk_delete_returns_namespaces_and_logs_changes():
    from kvcellar.semantic.store import Entry, SqliteStore

    store = SqliteStore(":memory:")
    rng = np.random.default_rng(0)
    entries = [Entry(i + 1, f"ns{i % 3}:q", "t", None, f"k{i}", f"q{i}", [], f"r{i}",
                     rng.standard_normal(8).astype(np.float32),
                     rng.standard_normal(8).astype(np.float32), None, 0.0, None, 0.0)
               for i in range(1200)]
    store.put_many(entries)
    cursor = store.changes(None)[1]
    removed = store.delete([e.id for e in entries[:1100]] + [99_999, 5])  # unknown id, repeat
    assert len(removed) == 1100 and removed[4] == "ns0:q" and removed[5] == "ns1:q"
    assert store.count() == 100
    changes, _ = store.changes(cursor)
    assert sorted(i for op, i in changes if op == "del") == list(range(1, 1101))
    store.close()
