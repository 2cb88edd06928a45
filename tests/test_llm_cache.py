"""The lossless path on the real model: greedy tokens with the cache == without it.

Every test compares a cached run against a plain run of the same model (``use_cache=False``), and
checks that the cache was actually used (cached_tokens, tiers) so equality is not vacuous.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from kvcellar.demo_script import SYSTEM_PROMPT
from kvcellar.errors import ModelLoadError, PromptTooLongError
from kvcellar.llm import LLM

CHUNK = 64
MAX_NEW = 12


def _chat(question: str, history: list[dict] | None = None) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        *(history or []),
        {"role": "user", "content": question},
    ]


def _baseline(llm: LLM, prompt, max_tokens: int = MAX_NEW) -> list[int]:
    return llm.generate(prompt, max_tokens=max_tokens, use_cache=False).token_ids


def test_two_turn_chat_reuses_history_and_matches(make_llm):
    llm = make_llm(chunk_size=CHUNK)
    turn1 = _chat("How often does the light flash?")
    out1 = llm.chat(turn1, max_tokens=MAX_NEW)
    assert out1.cached_tokens == 0 and out1.stored_chunks > 0
    assert out1.token_ids == _baseline(llm, turn1)

    turn2 = [
        *turn1,
        {"role": "assistant", "content": out1.text},
        {"role": "user", "content": "And the fog signal?"},
    ]
    out2 = llm.chat(turn2, max_tokens=MAX_NEW)
    base2 = _baseline(llm, turn2)
    assert out2.token_ids == base2
    # The whole first turn (prompt + reply) is reused, up to chunk granularity.
    history = out1.prompt_tokens + len(out1.token_ids)
    assert out2.cached_tokens >= (history - 1) // CHUNK * CHUNK - CHUNK
    assert out2.cached_tokens > out1.prompt_tokens - CHUNK
    assert out2.prefilled_tokens == out2.prompt_tokens - out2.cached_tokens


def test_prefix_hit_from_memory_tier(make_llm):
    llm = make_llm(chunk_size=CHUNK, disk_bytes=0)
    llm.chat(_chat("Where is the spare beacon kept?"), max_tokens=4)
    prompt = _chat("What is the generator's tank size?")
    out = llm.chat(prompt, max_tokens=MAX_NEW)
    assert out.cached_tokens >= 10 * CHUNK
    assert set(out.chunk_tiers) == {"memory"} and set(out.chunk_codecs) == {"raw"}
    assert out.token_ids == _baseline(llm, prompt)


def test_identical_prompt_with_partial_chunks_recomputes_one_token(make_llm):
    llm = make_llm(chunk_size=CHUNK, save_partial_chunks=True, disk_bytes=0)
    prompt = _chat("Who is the warden?")
    first = llm.chat(prompt, max_tokens=MAX_NEW)
    again = llm.chat(prompt, max_tokens=MAX_NEW)
    assert again.cached_tokens == again.prompt_tokens - 1
    assert again.token_ids == first.token_ids == _baseline(llm, prompt)


def test_prompt_sharing_only_first_chunk(make_llm):
    llm = make_llm(chunk_size=CHUNK)
    shared = llm.tokenize(_chat("x"))[:CHUNK]
    a = shared + llm.tokenize("The tower is open to visitors on Sundays. " * 20)
    b = shared + llm.tokenize("Terns nest on the spit from April to July, keep to the path. " * 12)
    llm.generate(a, max_tokens=2)
    out = llm.generate(b, max_tokens=MAX_NEW)
    assert out.cached_tokens == CHUNK
    assert out.token_ids == _baseline(llm, b)


def test_corrupted_disk_entry_is_a_miss_with_the_right_answer(make_llm, tmp_path):
    llm = make_llm(chunk_size=CHUNK, memory_bytes=0)
    prompt = _chat("What is the station number?")
    llm.chat(prompt, max_tokens=2)
    files = sorted((tmp_path / "kv").rglob("*.kvc"))
    assert len(files) >= 10
    # The engine walks chunks in order: damage the third, so two are served and the rest is a miss.
    third = llm.engine._keys(llm.tokenize(prompt))[0][2]
    target = next(f for f in files if f.stem == third)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x5A
    target.write_bytes(bytes(data))

    out = llm.chat(prompt, max_tokens=MAX_NEW)
    stats = llm.engine.stats()["engine"]
    assert stats["corrupted_chunks"] == 1
    assert out.cached_tokens == 2 * CHUNK
    assert out.token_ids == _baseline(llm, prompt)
    # The bad entry was deleted and rewritten by the store that followed.
    assert codec_ok(target.read_bytes())


def test_truncated_disk_entry_is_a_miss(make_llm, tmp_path):
    llm = make_llm(chunk_size=CHUNK, memory_bytes=0)
    prompt = _chat("What does the beacon draw?")
    llm.chat(prompt, max_tokens=2)
    first = llm.engine._keys(llm.tokenize(prompt))[0][0]
    target = next(f for f in (tmp_path / "kv").rglob("*.kvc") if f.stem == first)
    target.write_bytes(target.read_bytes()[:1000])
    out = llm.chat(prompt, max_tokens=MAX_NEW)
    assert out.cached_tokens == 0 and llm.engine.stats()["engine"]["corrupted_chunks"] == 1
    assert out.token_ids == _baseline(llm, prompt)


def codec_ok(frame: bytes) -> bool:
    from kvcellar.kv import codecs

    codecs.decode(frame)
    return True


_CHILD = textwrap.dedent(
    """
    import json, sys
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar(); hf_logging.set_verbosity_error()
    from kvcellar.llm import LLM
    args = json.loads(sys.argv[1])
    llm = LLM(disk_path=args["disk"], disk_bytes="200MB", memory_bytes="200MB", chunk_size=args["chunk"])
    out = llm.generate(args["prompt"], max_tokens=args["max_tokens"])
    print(json.dumps({"ids": out.token_ids, "cached": out.cached_tokens, "tiers": out.chunk_tiers}))
    """
)


def _child(prompt: list[int], disk, max_tokens: int) -> dict:
    arg = json.dumps(
        {"prompt": prompt, "disk": str(disk), "chunk": CHUNK, "max_tokens": max_tokens}
    )
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_disk_tier_hit_after_restart_in_new_process(make_llm, tmp_path):
    llm = make_llm(chunk_size=CHUNK, enabled=False)
    first = llm.tokenize(_chat("When is the generator tested?"))
    second = llm.tokenize(_chat("How many cells are in the battery bank?"))
    a = _child(first, tmp_path / "shared-kv", 2)
    assert a["cached"] == 0
    b = _child(second, tmp_path / "shared-kv", MAX_NEW)
    assert b["cached"] >= 10 * CHUNK and set(b["tiers"]) == {"disk"}
    assert b["ids"] == _baseline(llm, second)


def test_disabled_cache_is_the_plain_model(make_llm, tmp_path):
    llm = make_llm(enabled=False)
    assert llm.engine is None
    out = llm.generate("The lighthouse keeper", max_tokens=5)
    assert out.cached_tokens == 0 and len(out.token_ids) == 5 and out.finish_reason == "length"


def test_bad_requests_raise_clear_errors(make_llm, tmp_path):
    llm = make_llm()
    with pytest.raises(PromptTooLongError, match="context"):
        llm.generate(list(range(100, 8300)), max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([], max_tokens=4)
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"content": "no role"}])
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([1, 2, 10**9])
    with pytest.raises(ModelLoadError, match="unknown model"):
        LLM(model="no-such-model", disk_bytes=0)


def test_stop_strings_and_sampling_are_reproducible(make_llm):
    llm = make_llm(disk_bytes=0)
    prompt = _chat("Describe the tower.")
    a = llm.chat(prompt, max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    b = llm.chat(prompt, max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids and b.cached_tokens > 0
    greedy = llm.chat(prompt, max_tokens=MAX_NEW)
    word = greedy.text.split()[1]
    cut = llm.chat(prompt, max_tokens=MAX_NEW, stop=[word])
    assert cut.finish_reason == "stop" and word not in cut.text and greedy.text.startswith(cut.text)


def test_stream_deltas_rebuild_the_text(make_llm):
    llm = make_llm(disk_bytes=0)
    prompt = _chat("List the weekly checks.")
    events = list(llm.stream(prompt, max_tokens=MAX_NEW))
    out = events[-1].output
    assert out is not None and all(e.output is None for e in events[:-1])
    assert "".join(e.delta for e in events) == out.text
    greedy = llm.generate(prompt, max_tokens=MAX_NEW)
    assert greedy.token_ids == out.token_ids and greedy.cached_tokens > 0
    stop = out.text.split()[2]
    cut = list(llm.stream(prompt, max_tokens=MAX_NEW, stop=stop))
    assert "".join(e.delta for e in cut) == cut[-1].output.text and stop not in cut[-1].output.text


def test_tenants_never_reuse_each_others_kv(make_llm):
    llm = make_llm(disk_bytes=0, chunk_size=CHUNK)
    prompt = _chat("Who may not climb above the second landing?")
    a = llm.generate(prompt, max_tokens=4, tenant="alice")
    again = llm.generate(prompt, max_tokens=4, tenant="alice")
    b = llm.generate(prompt, max_tokens=4, tenant="bob")
    assert a.cached_tokens == 0 and again.cached_tokens > 0 and b.cached_tokens == 0
    assert a.token_ids == again.token_ids == b.token_ids
    assert llm.engine_for("alice").clear_tenant() > 0
    assert llm.engine_for("alice").lookup(llm.tokenize(prompt)) == 0
    assert llm.engine_for("bob").lookup(llm.tokenize(prompt)) > 0


def test_concurrent_streams_interleave_and_match_sequential(make_llm):
    import threading

    llm = make_llm(disk_bytes=0, chunk_size=CHUNK)
    prompts = [
        _chat(q) for q in ("How tall is the tower?", "What colour is it?", "Who is Ilse Marrow?")
    ]
    expected = [_baseline(llm, p) for p in prompts]
    results: dict[int, list[int]] = {}
    first_token_at: dict[int, int] = {}
    ticks: list[int] = []

    def run(i: int) -> None:
        for ev in llm.stream(prompts[i], max_tokens=MAX_NEW):
            ticks.append(i)
            first_token_at.setdefault(i, len(ticks))
            if ev.output is not None:
                results[i] = ev.output.token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(3)] == expected
    # Fair scheduling: every stream started before any one of them finished.
    assert max(first_token_at.values()) < min(len(ticks) - ticks[::-1].index(i) for i in range(3))
