"""The HTTP server, end to end: a real ``kvcellar serve`` subprocess on the real model.

Two servers per module: ``server`` with API keys (tenants alice, bob and an admin) and the KV
cache on, and ``open_server`` with no keys, the cache off and room for one request at a time
(no queue), for the open-server, cache-disabled, 429 and client-disconnect paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CHUNK = 64
ALICE = {"Authorization": "Bearer key-a"}
BOB = {"Authorization": "Bearer key-b"}
ADMIN = {"Authorization": "Bearer key-admin"}


@dataclass
class Server:
    url: str
    log: Path

    def post(self, path: str, body: dict | None = None, headers: dict | None = None, **kw):
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120, **kw)

    def get(self, path: str, headers: dict | None = None):
        return httpx.get(self.url + path, headers=headers, timeout=30)

    def client(self, key: str = "key-a") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=120, max_retries=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(tmp: Path, **config: object) -> Iterator[Server]:
    """``python -m kvcellar serve`` with a YAML config, until it answers /health."""
    port = _free_port()
    cfg = tmp / "server.yaml"
    cfg.write_text(yaml.safe_dump({"disk_bytes": 0, "disk_path": str(tmp / "kv"), **config}))
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCELLAR_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["COLUMNS"] = "250"  # the CLI logs through rich: keep each message on one line
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvcellar", "serve", "--config", str(cfg), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        server = Server(f"http://127.0.0.1:{port}", log_path)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited:\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"server not healthy in 120 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with _serve(
        tmp_path_factory.mktemp("server"),
        api_keys={"key-a": "alice", "key-b": "bob", "key-admin": "admin"},
        admin_keys=["key-admin"],
        chunk_size=CHUNK,
        memory_bytes="500MB",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def open_server(tmp_path_factory) -> Iterator[Server]:
    with _serve(
        tmp_path_factory.mktemp("open_server"),
        enabled=False,
        max_concurrent_requests=1,
        max_queued_requests=0,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def reference(runner):
    """The plain model in this process: what greedy answers must be."""
    from kvcellar.llm import LLM

    llm = LLM(runner=runner, enabled=False)
    yield llm
    llm.close()


def _long_text(tag: str, sentences: int = 16) -> str:
    """A prompt of a few chunks that no other test uses (``tag`` makes it unique)."""
    body = " ".join(f"Rule {i}: check valve {i * 7} and log it." for i in range(sentences))
    return f"Manual {tag}. {body}"


def _usage_cached(resp_json: dict) -> int:
    return resp_json["usage"]["prompt_tokens_details"]["cached_tokens"]


def _complete(server: Server, prompt: str, headers: dict = ALICE, max_tokens: int = 2) -> dict:
    r = server.post(
        "/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert int(r.headers["x-kvcellar-cached-tokens"]) == _usage_cached(body)
    return body


# --- OpenAI API through the official client -------------------------------------------------------


def test_health_and_models(server):
    h = server.get("/health")
    assert h.status_code == 200
    assert h.json()["status"] == "ok" and h.json()["model"] == MODEL
    assert {"queue_depth", "requests_running", "requests_waiting"} <= h.json().keys()
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_chat_matches_plain_model_streaming_and_not(server, reference):
    client = server.client()
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ref = reference.chat(messages, max_tokens=8, temperature=0)

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, user="u1"
    )
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == MODEL and resp.created > 0
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    u = resp.usage
    assert u.prompt_tokens == ref.prompt_tokens
    assert u.completion_tokens == len(ref.token_ids)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == int(raw.headers["x-kvcellar-cached-tokens"])
    assert float(raw.headers["x-kvcellar-queue-ms"]) >= 0

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=8,
        temperature=0,
        frequency_penalty=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage, ids = [], None, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(deltas) == ref.text
    assert finish == ref.finish_reason
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert usage is not None and usage.completion_tokens == len(ref.token_ids)
    assert usage.prompt_tokens == ref.prompt_tokens


def test_text_completion_matches_plain_model(server, reference):
    client = server.client()
    prompt = "The three primary colours are"
    ref = reference.generate(prompt, max_tokens=6, temperature=0)
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == ref.prompt_tokens
    assert resp.usage.completion_tokens == len(ref.token_ids)

    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == ref.text


def test_second_turn_of_a_chat_is_served_from_the_cache(server, reference):
    client = server.client()
    system = _long_text(f"chat-{uuid.uuid4().hex[:8]}")
    turn1 = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Which valve comes first?"},
    ]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=6, temperature=0)
    assert r1.usage.prompt_tokens > 2 * CHUNK
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    answer = r1.choices[0].message.content
    # Content as a list of text parts is accepted too (joined with newlines).
    turn2 = [
        *turn1,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": [{"type": "text", "text": "And the next one?"}]},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=turn2, max_tokens=6, temperature=0
    )
    r2 = raw.parse()
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= 2 * CHUNK and cached % CHUNK == 0
    assert int(raw.headers["x-kvcellar-cached-tokens"]) == cached
    plain = [*turn2[:-1], {"role": "user", "content": "And the next one?"}]
    ref = reference.chat(plain, max_tokens=6, temperature=0)
    assert r2.choices[0].message.content == ref.text  # a cache hit gives the same greedy tokens


def test_streaming_header_announces_cached_tokens(server):
    prompt = _long_text(f"stream-{uuid.uuid4().hex[:8]}")
    _complete(server, prompt)
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=ALICE) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        header = int(r.headers["x-kvcellar-cached-tokens"])
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
    assert header == usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_tenants_never_share_kv(server):
    prompt = _long_text(f"tenant-{uuid.uuid4().hex[:8]}")
    assert _usage_cached(_complete(server, prompt, ALICE)) == 0
    assert _usage_cached(_complete(server, prompt, BOB)) == 0  # alice's KV is not bob's
    assert _usage_cached(_complete(server, prompt, ALICE)) > 0
    assert _usage_cached(_complete(server, prompt, BOB)) > 0  # bob's own first request


# --- bad input --------------------------------------------------------------------------------------

_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
_TEXT = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def _with(base: dict, **changes: object) -> dict:
    return {**base, **changes}


BAD_REQUESTS = [
    # (id, path, headers, json body or raw bytes, status, error code or None)
    ("no-auth", "/v1/chat/completions", {}, _CHAT, 401, "invalid_api_key"),
    ("bad-key", "/v1/chat/completions", {"Authorization": "Bearer nope"}, _CHAT, 401, None),
    ("not-bearer", "/v1/models", {"Authorization": "Basic a2V5LWE="}, None, 401, None),
    ("empty-messages", "/v1/chat/completions", ALICE, _with(_CHAT, messages=[]), 400, None),
    ("messages-string", "/v1/chat/completions", ALICE, _with(_CHAT, messages="hi"), 422, None),
    ("max-tokens-text", "/v1/chat/completions", ALICE, _with(_CHAT, max_tokens="ten"), 422, None),
    ("missing-model", "/v1/completions", ALICE, {"prompt": "hi"}, 422, None),
    ("malformed-json", "/v1/chat/completions", ALICE, b'{"model": "x", "messages": [', 422, None),
    ("body-not-object", "/v1/completions", ALICE, b"[1, 2]", 422, None),
    (
        "too-long",
        "/v1/chat/completions",
        ALICE,
        _with(_CHAT, messages=[{"role": "user", "content": "word " * 9000}]),
        400,
        "context_length_exceeded",
    ),
    (
        "too-long-text-no-max",
        "/v1/completions",
        ALICE,
        {"model": MODEL, "prompt": "word " * 9000},
        400,
        "context_length_exceeded",
    ),
    ("unknown-model", "/v1/chat/completions", ALICE, _with(_CHAT, model="gpt-9"), 404, None),
    ("negative-max", "/v1/chat/completions", ALICE, _with(_CHAT, max_tokens=-1), 400, None),
    ("zero-max", "/v1/completions", ALICE, _with(_TEXT, max_tokens=0), 400, None),
    ("n-2", "/v1/chat/completions", ALICE, _with(_CHAT, n=2), 400, None),
    ("temperature", "/v1/chat/completions", ALICE, _with(_CHAT, temperature=2.5), 400, None),
    ("top-p-zero", "/v1/completions", ALICE, _with(_TEXT, top_p=0), 400, None),
    ("top-p-big", "/v1/completions", ALICE, _with(_TEXT, top_p=1.5), 400, None),
    (
        "tool-role",
        "/v1/chat/completions",
        ALICE,
        _with(_CHAT, messages=[{"role": "tool", "content": "x"}]),
        400,
        None,
    ),
    (
        "image-part",
        "/v1/chat/completions",
        ALICE,
        _with(_CHAT, messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        None,
    ),
    ("penalty", "/v1/chat/completions", ALICE, _with(_CHAT, presence_penalty=1.0), 400, None),
    ("batch", "/v1/completions", ALICE, _with(_TEXT, prompt=["a", "b"]), 400, None),
    ("empty-prompt", "/v1/completions", ALICE, _with(_TEXT, prompt=""), 400, None),
    ("bad-token-id", "/v1/completions", ALICE, _with(_TEXT, prompt=[1, 10**9]), 400, None),
    ("unknown-path", "/v1/nothing", ALICE, _CHAT, 404, None),
    ("lookup-two-prompts", "/cache/lookup", ALICE, {"text": "a", "tokens": [1]}, 400, None),
    ("clear-bad-tier", "/cache/clear", ADMIN, {"tier": "tape"}, 400, None),
]


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_4xx_with_a_message(server, path, headers, body, status, code):
    if body is None:
        r = httpx.get(server.url + path, headers=headers, timeout=30)
    elif isinstance(body, bytes):
        hdrs = {**headers, "content-type": "application/json"}
        r = httpx.post(server.url + path, content=body, headers=hdrs, timeout=30)
    else:
        r = server.post(path, body, headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 5
    assert {"type", "param", "code"} <= err.keys()
    if code is not None:
        assert err["code"] == code


def test_openai_client_sees_typed_errors(server):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="n=2"):
        server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2
        )


# --- metrics ----------------------------------------------------------------------------------------


def _metrics(server: Server) -> dict[tuple[str, tuple], float]:
    r = server.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_tokens_and_tiers(server):
    before = _metrics(server)
    key = ("kvcellar_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    prompt = _long_text(f"metrics-{uuid.uuid4().hex[:8]}")
    _complete(server, prompt)
    hit = _complete(server, prompt)
    after = _metrics(server)

    assert after[key] - before.get(key, 0) == 2
    cached = ("kvcellar_cached_tokens_total", ())
    assert after[cached] - before.get(cached, 0) == _usage_cached(hit) > 0
    prompt_tokens = ("kvcellar_prompt_tokens_total", ())
    assert after[prompt_tokens] - before.get(prompt_tokens, 0) == 2 * hit["usage"]["prompt_tokens"]
    ttft = ("kvcellar_ttft_seconds_count", ())
    assert after[ttft] - before.get(ttft, 0) == 2
    assert ("kvcellar_queue_seconds_count", ()) in after
    memory = (("tier", "memory"),)
    assert after[("kvcellar_cache_tier_entries", memory)] > 0
    assert after[("kvcellar_cache_tier_used_bytes", memory)] > 0
    assert after[("kvcellar_cache_tier_hits_total", memory)] > 0
    for name in ("misses", "evictions", "errors"):
        assert (f"kvcellar_cache_tier_{name}_total", memory) in after
    unauth = ("kvcellar_http_requests_total", (("endpoint", "/metrics"), ("status", "200")))
    assert after[unauth] >= 1


# --- controller API ---------------------------------------------------------------------------------


def test_controller_lookup_pin_unpin_clear_stats(server, reference):
    text = _long_text(f"ctl-{uuid.uuid4().hex[:8]}")
    before = server.post("/cache/lookup", {"text": text}, ALICE).json()
    assert before["cached_tokens"] == 0 and before["prompt_tokens"] > 2 * CHUNK
    assert before["per_tier"] == {"memory": 0}

    _complete(server, text)
    after = server.post("/cache/lookup", {"text": text}, ALICE).json()
    n = after["cached_tokens"]
    assert n >= 2 * CHUNK and n % CHUNK == 0
    assert after["per_tier"] == {"memory": n}
    by_ids = server.post("/cache/lookup", {"tokens": reference.tokenize(text)}, ALICE).json()
    assert by_ids["cached_tokens"] == n
    assert server.post("/cache/lookup", {"text": text}, BOB).json()["cached_tokens"] == 0

    messages = [{"role": "user", "content": text}]
    server.post(
        "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}, ALICE
    )
    assert server.post("/cache/lookup", {"messages": messages}, ALICE).json()["cached_tokens"] > 0

    assert server.post("/cache/pin", {"text": text, "ttl_s": 60}, ALICE).json() == {
        "pinned_tokens": n
    }
    stats = server.get("/cache/stats", ALICE).json()
    assert stats["tenant"] == "alice"
    assert stats["engine"]["pinned_chunks"] >= n // CHUNK
    assert [t["name"] for t in stats["tiers"]] == ["memory"]
    assert stats["tiers"][0]["entries"] > 0
    assert server.post("/cache/unpin", {"text": text}, ALICE).json() == {
        "unpinned_chunks": n // CHUNK
    }

    # Clearing: others' tenants and whole tiers need an admin key.
    r = server.post("/cache/clear", {"tenant": "alice"}, BOB)
    assert r.status_code == 403 and "alice" in r.json()["error"]["message"]
    assert server.post("/cache/clear", {"all": True}, BOB).status_code == 403
    assert server.post("/cache/clear", {"tier": "memory"}, BOB).status_code == 403
    assert server.post("/cache/clear", {}, BOB).json()["tenant"] == "bob"
    assert server.post("/cache/lookup", {"text": text}, ALICE).json()["cached_tokens"] == n
    cleared = server.post("/cache/clear", None, ALICE).json()  # no body: the caller's tenant
    assert cleared["cleared"] == "tenant" and cleared["tenant"] == "alice"
    assert cleared["deleted_entries"] >= n // CHUNK
    assert server.post("/cache/lookup", {"text": text}, ALICE).json()["cached_tokens"] == 0

    _complete(server, text, BOB)
    assert server.post("/cache/clear", {"tenant": "bob"}, ADMIN).json()["deleted_entries"] > 0
    _complete(server, text, BOB)
    everything = server.post("/cache/clear", {"all": True}, ADMIN)
    assert everything.status_code == 200 and everything.json()["deleted_entries"] > 0
    assert server.get("/cache/stats", ADMIN).json()["tiers"][0]["entries"] == 0


# --- concurrency --------------------------------------------------------------------------------


def test_concurrent_streams_complete_while_health_answers(server, reference):
    questions = ["What is a valve?", "Name a planet.", "Count to three."]
    expected = [
        reference.chat([{"role": "user", "content": q}], max_tokens=8, temperature=0).text
        for q in questions
    ]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            chunks = server.client().chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": questions[i]}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
            got[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    health_during = []
    while any(t.is_alive() for t in threads):
        h = httpx.get(server.url + "/health", timeout=10)
        assert h.status_code == 200
        health_during.append(h.json())
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert not errors, errors
    assert [got[i] for i in range(3)] == expected
    assert health_during  # /health answered while the three streams ran


# --- the open server: no keys, cache off, one slot, no queue --------------------------------------


def test_open_server_needs_no_key_and_has_no_cache_api(open_server):
    r = open_server.post("/v1/chat/completions", _with(_CHAT, max_tokens=1))
    assert r.status_code == 200, r.text
    assert r.headers["x-kvcellar-cached-tokens"] == "0"
    assert "no api_keys configured" in open_server.log.read_text()
    for path, body in (("/cache/lookup", {"text": "hi"}), ("/cache/clear", {"all": True})):
        r = open_server.post(path, body)
        assert r.status_code == 409 and "disabled" in r.json()["error"]["message"]
    assert open_server.get("/cache/stats").status_code == 409
    assert open_server.get("/health").json()["cache_enabled"] is False


def test_full_queue_gets_429_and_a_gone_client_frees_the_model(open_server):
    def cancelled() -> float:
        return _metrics(open_server).get(("kvcellar_generations_cancelled_total", ()), 0.0)

    cancelled_before = cancelled()
    body = _with(
        _CHAT,
        messages=[{"role": "user", "content": "Tell a long story about a lighthouse."}],
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    with httpx.stream("POST", open_server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        # The one slot is taken and nobody may wait: the next request is refused at once.
        busy = open_server.post("/v1/completions", _TEXT)
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert "busy" in busy.json()["error"]["message"]
    # The client went away mid-stream: the worker stops after its current token.
    deadline = time.monotonic() + 60
    while cancelled() <= cancelled_before:
        assert time.monotonic() < deadline, "the generation was not stopped"
        time.sleep(0.2)
    r = open_server.post("/v1/completions", _TEXT)
    assert r.status_code == 200, r.text


def test_admission_counts_waiters_and_refuses_beyond_the_queue():
    import asyncio

    from kvcellar.server.app import Admission
    from kvcellar.server.schemas import APIError

    async def scenario() -> None:
        adm = Admission(limit=1, max_waiting=1)
        assert await adm.acquire() >= 0
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.waiting == 1 and adm.running == 1
        with pytest.raises(APIError) as info:
            await adm.acquire()
        assert info.value.status == 429
        adm.release()
        await waiter
        assert adm.waiting == 0 and adm.running == 1
        adm.release()
        assert adm.running == 0

    asyncio.run(scenario())


def test_semantic_endpoints_say_when_the_semantic_cache_is_off(open_server):
    r = open_server.post("/cache/semantic/clear")
    assert r.status_code == 409 and r.json()["error"]["code"] == "semantic_cache_disabled"
    chat = open_server.post("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert chat.status_code == 200 and "x-kvcellar-cache" not in chat.headers
