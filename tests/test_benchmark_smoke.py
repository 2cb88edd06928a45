"""The multi-round QA benchmark runs end to end (``--quick``) and reports honest numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multi_round_qa_quick(tmp_path):
    out = tmp_path / "mrqa.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "multi_round_qa.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["summary"]["all_same_tokens"] is True
    assert rows[0]["cached_tokens"] == 0
    assert all(r["cached_tokens"] > 0 for r in rows[1:])
    assert all(r["bound_s"] > 0 and r["ttft_cache_s"] > 0 and r["ttft_nocache_s"] > 0 for r in rows)
    assert len(data["miss"]) == 4 and out.with_suffix(".png").stat().st_size > 1000


def _run_quick(script: str, out: Path) -> dict:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


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
