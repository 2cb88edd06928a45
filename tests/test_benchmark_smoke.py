"""The benchmarks run end to end (``--quick``) and report honest numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_quick(script: str, out: Path, *args: str) -> dict:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_multi_round_qa_quick(tmp_path):
    out = tmp_path / "mrqa.json"
    data = _run_quick("multi_round_qa.py", out)
    rows = data["rows"]
    assert data["summary"]["all_same_tokens"] is True
    assert rows[0]["cached_tokens"] == 0
    assert all(r["cached_tokens"] > 0 for r in rows[1:])
    assert all(r["bound_s"] > 0 and r["ttft_cache_s"] > 0 and r["ttft_nocache_s"] > 0 for r in rows)
    assert len(data["miss"]) == 4 and out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.slow
def test_long_doc_qa_quick_through_http(tmp_path):
    data = _run_quick("long_doc_qa.py", tmp_path / "ldqa.json")
    s = data["summary"]
    assert s["same_text"] == "4/4"
    assert s["warmup"]["mean_cached_tokens"] == 0 and s["query"]["mean_cached_tokens"] > 0
    assert all(r["ttft_s"] > 0 for r in data["rows"])


@pytest.mark.slow
def test_multi_round_qa_quick_through_http(tmp_path):
    data = _run_quick("multi_round_qa_http.py", tmp_path / "mrqh.json")
    cache, base = data["summary"]["kvcellar"], data["summary"]["no-cache"]
    assert cache["requests"] == base["requests"] == 4
    assert cache["cached_tokens"] > 0 and base["cached_tokens"] == 0
    assert cache["prompt_tokens"] == base["prompt_tokens"]


@pytest.mark.slow
def test_codecs_benchmark_quick(tmp_path):
    out = tmp_path / "codecs.json"
    data = _run_quick("codecs.py", out, "--codecs", "raw", "fp16", "kivi4", "kivi4+s0", "cachegen")
    rows = {r["codec"]: r for r in data["rows"]}
    assert rows["raw"]["tf_argmax_agreement"] == 1.0 and rows["raw"]["greedy_match"] == 1.0
    assert rows["raw"]["delta_nll"] == 0.0
    assert rows["kivi4"]["ratio_vs_fp16"] > 3.5
    # the sinks cost bytes only in a sequence's first chunk
    assert rows["kivi4"]["bytes_per_token"] == rows["kivi4+s0"]["bytes_per_token"]
    assert rows["kivi4"]["bytes_per_token_prompt"] > rows["kivi4+s0"]["bytes_per_token_prompt"]
    assert rows["cachegen"]["bytes_per_token"] < rows["kivi4"]["bytes_per_token"]
    assert all(r["ttft"]["ttft_cold_s"] > 0 and r["decode_MBps"] > 0 for r in data["rows"])
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.slow
def test_tier_throughput_quick(tmp_path):
    pytest.importorskip("redis")
    from kvcellar.storage.redis_local import redis_available

    if not redis_available():
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    data = _run_quick("tier_throughput.py", tmp_path / "tt.json")
    rows = data["rows"]
    assert {r["tier"] for r in rows} == {"memory", "disk", "redis"}
    assert {r["chunk_tokens"] for r in rows} == {64, 256}
    for r in rows:
        assert r["store_GBps"] > 0 and r["load_GBps"] > 0
        assert r["raw_store_GBps"] > 0 and r["raw_load_GBps"] > 0
        assert r["load_ratio"] == pytest.approx(r["load_GBps"] / r["raw_load_GBps"])


@pytest.mark.slow
def test_semantic_cache_benchmark_quick(tmp_path):
    out = tmp_path / "sem.json"
    data = _run_quick("semantic_cache.py", out)
    acc = data["accuracy"]
    assert set(acc) == {"kvcellar", "kvcellar no gate", "kvcellar last-message only", "GPTCache-style"}
    assert acc["kvcellar"]["wrong_on_traps"] < acc["kvcellar no gate"]["wrong_on_traps"]
    assert acc["kvcellar"]["multiturn"]["wrong_on_different_context"] == 0
    assert [r["entries"] for r in data["latency"]] == [2000, 10000]
    assert all(r["excluding_embedding"]["p50_ms"] > 0 for r in data["latency"])
    assert data["hijack"]["victims"] == 5 and data["hijack"]["hijacks_gate"] == 0
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.slow
def test_ic_cache_benchmark_quick(tmp_path):
    data = _run_quick("ic_cache.py", tmp_path / "ic.json")
    s = data["summary"]
    assert s["questions"] == 4 and 0 <= s["accuracy_plain"] <= 1 and 0 <= s["accuracy_ic"] <= 1
    assert s["mean_prompt_tokens_ic"] > s["mean_prompt_tokens_plain"]  # the examples were added


@pytest.mark.slow
def test_semantic_verifier_benchmark_quick(tmp_path):
    data = _run_quick("semantic_verifier.py", tmp_path / "ver.json")
    training = data["training"]
    assert training["labelled_pairs"] > 6000 and training["dropped_near_test"] > 0
    assert training["pairs"] == 64  # --quick trains on 64 of them
    assert data["latency"]["pairs"] == 20 and 0 < data["latency"]["p50_ms"] <= data["latency"]["p99_ms"]
    for key in ("holdout3", "holdout4", "holdout5", "holdout6"):
        res = data[key]
        assert res["pairs"] == 30 and 0 <= res["auc"] <= 1
        if "unseen_questions" in res:  # the pairs no other file has a near copy of
            assert 0 < res["unseen_questions"]["pairs"] < 30
        systems = res["systems"]
        rules = systems["rules (default gate)"]
        # one more check can only take hits away from the default gate
        for t in (0.5, 0.9):
            both = systems[f"rules + verifier >= {t}"]
            assert both["served"] <= rules["served"]
            assert both["wrong_on_traps"] <= rules["wrong_on_traps"]
            fact = systems[f"fact rules + verifier >= {t}"]
            swap = systems[f"fact rules, substitution + verifier >= {t}"]
            assert swap["served"] <= fact["served"]
            assert swap["wrong_on_traps"] <= fact["wrong_on_traps"]
