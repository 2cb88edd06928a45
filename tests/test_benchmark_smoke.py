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
