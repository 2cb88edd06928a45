"""The semantic cache in front of the real server: hits skip the model, tenants stay apart,
per-request control in the body, stream replay, and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import ADMIN, ALICE, BOB, MODEL, Server, _serve

from kvcellar.semantic.config import SemanticSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("semantic-server")
    with _serve(
        tmp, model=MODEL, chunk_size=64,
        api_keys={"key-a": "alice", "key-b": "bob", "key-admin": "admin"}, admin_keys=["key-admin"],
        semantic_cache=True, semantic_path=str(tmp / "semantic.sqlite"),
    ) as s:
        yield s


def _chat(server: Server, text: str, headers=ALICE, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 12,
            "temperature": 0, **extra}
    return server.post("/v1/chat/completions", body, headers=headers)


def _stream_text(response) -> str:
    parts = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def test_miss_then_exact_then_semantic_hit(server):
    first = _chat(server, "What is the capital of France?")
    assert first.status_code == 200 and first.headers["x-kvcellar-cache"] == "miss"
    answer = first.json()["choices"][0]["message"]["content"]
    again = _chat(server, "what is the capital of France")
    assert again.headers["x-kvcellar-cache"] == "exact"
    body = again.json()
    assert body["choices"][0]["message"]["content"] == answer
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == body["usage"]["prompt_tokens"]
    para = _chat(server, "What's the capital of France?")
    assert para.headers["x-kvcellar-cache"] == "semantic", para.headers
    assert float(para.headers["x-kvcellar-cache-similarity"]) > 0.75
    assert para.json()["choices"][0]["message"]["content"] == answer
    # another tenant, other sampling parameters: separate namespaces
    assert _chat(server, "What is the capital of France?", BOB).headers["x-kvcellar-cache"] == "miss"
    assert _chat(server, "What is the capital of France?",
                 temperature=0.5, seed=1).headers["x-kvcellar-cache"] == "miss"


def test_trap_is_a_miss(server):
    _chat(server, "How do I enable dark mode in Firefox?")
    trap = _chat(server, "How do I disable dark mode in Firefox?")
    assert trap.headers["x-kvcellar-cache"] == "miss"


def test_stream_is_stored_when_complete_and_replayed(server):
    question = "Name three colours of the rainbow."
    streamed = _chat(server, question, stream=True)
    assert streamed.status_code == 200 and streamed.headers["x-kvcellar-cache"] == "miss"
    text = _stream_text(streamed)
    plain = _chat(server, question)
    assert plain.headers["x-kvcellar-cache"] == "exact"
    assert plain.json()["choices"][0]["message"]["content"] == text
    replay = _chat(server, question, stream=True, stream_options={"include_usage": True})
    assert replay.headers["x-kvcellar-cache"] == "exact"
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert _stream_text(replay) == text
    assert replay.text.rstrip().endswith("data: [DONE]")


def test_per_request_cache_control(server):
    question = "What is the boiling point of water at sea level?"
    bypass = _chat(server, question, cache={"no-cache": True, "no-store": True})
    assert bypass.headers["x-kvcellar-cache"] == "bypass"
    assert _chat(server, question, cache={"no-store": True}).headers["x-kvcellar-cache"] == "miss"
    assert _chat(server, question).headers["x-kvcellar-cache"] == "miss"  # nothing was stored
    assert _chat(server, question).headers["x-kvcellar-cache"] == "exact"
    bad = _chat(server, question, cache={"no-cache": "sometimes"})
    assert bad.status_code == 422
    assert _chat(server, question, cache={"ttl": -1}).status_code == 422
    assert _chat(server, question, cache={"unknown": 1}).status_code == 422


def test_semantic_metrics_per_tenant(server):
    _chat(server, "How many legs does a spider have?")
    _chat(server, "How many legs does a spider have?")
    text = server.get("/metrics", headers=ALICE).text
    samples = {(s.name, s.labels.get("tenant"), s.labels.get("result", s.labels.get("reason"))):
               s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("kvcellar_semantic_lookups_total", "alice", "exact")] >= 1
    misses = samples[("kvcellar_semantic_lookups_total", "alice", "miss")]
    assert misses >= 1
    by_reason = {k[2]: v for k, v in samples.items()
                 if k[0] == "kvcellar_semantic_misses_total" and k[1] == "alice"}
    assert sum(by_reason.values()) == misses  # each miss says what turned it away
    assert set(by_reason) <= {"no candidate", "threshold", "context", "learned"} | {
        f"gate:{c}" for c in SemanticSettings().checks}
    assert samples[("kvcellar_semantic_stores_total", "alice", None)] >= 1


def test_feedback_clear_and_stats_endpoints(server):
    question = "What is the tallest mountain in Africa?"
    _chat(server, question)
    hit = _chat(server, question)
    entry = int(hit.headers["x-kvcellar-cache-entry"])
    # another tenant can neither see nor rate alice's entry
    assert server.post("/cache/semantic/feedback", {"entry_id": entry, "correct": False},
                       BOB).status_code == 404
    bad = server.post("/cache/semantic/feedback", {"entry_id": entry, "correct": "maybe"}, ALICE)
    assert bad.status_code == 422
    ok = server.post("/cache/semantic/feedback", {"entry_id": entry, "correct": False}, ALICE)
    assert ok.status_code == 200 and ok.json()["recorded"] is True
    assert _chat(server, question).headers["x-kvcellar-cache"] == "miss"  # a wrong exact hit goes
    assert server.get("/cache/semantic/stats", ALICE).json()["entries"] >= 1
    assert "all_tenants" not in server.get("/cache/semantic/stats", ALICE).json()
    assert server.get("/cache/semantic/stats", ADMIN).json()["all_tenants"]["lookups"] > 0
    assert server.post("/cache/semantic/clear", {"tenant": "bob"}, ALICE).status_code == 403
    _chat(server, "Name a river in Egypt.", BOB)
    cleared = server.post("/cache/semantic/clear", None, ALICE).json()
    assert cleared["tenant"] == "alice" and cleared["deleted_entries"] >= 1
    assert server.get("/cache/semantic/stats", ALICE).json()["entries"] == 0
    assert server.get("/cache/semantic/stats", BOB).json()["entries"] >= 1  # bob's are kept
    assert server.post("/cache/semantic/clear", {"tenant": "bob"}, ADMIN).json()[
        "deleted_entries"] >= 1
