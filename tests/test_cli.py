"""The CLI: cache stats/clear on a real disk tier, and clear errors for bad settings."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from kvcellar.cli import app
from kvcellar.keys import chunk_keys
from kvcellar.kv import codecs
from kvcellar.kv.chunk import KVChunk
from kvcellar.storage.disk import DiskBackend

cli = CliRunner()


def _fill(path, n=3):
    disk = DiskBackend(path, 10**7)
    for i, key in enumerate(chunk_keys(list(range(n * 4)), 4, "ns")):
        frame = codecs.encode(
            KVChunk(torch.zeros(2, 2, 1, 4, 8), tuple(range(i * 4, i * 4 + 4))),
            codecs.get_codec("raw"),
        )
        disk.put(key, frame)
    return disk.stats().used_bytes


def test_cache_stats_and_clear(tmp_path):
    used = _fill(tmp_path / "kv")
    res = cli.invoke(
        app, ["cache", "stats", "--disk-path", str(tmp_path / "kv"), "--disk-bytes", "10MB"]
    )
    assert res.exit_code == 0, res.output
    assert "disk" in res.output and " 3 " in res.output and f"{used / 1000:.1f} KB" in res.output
    res = cli.invoke(app, ["cache", "clear", "--disk-path", str(tmp_path / "kv"), "--yes"])
    assert res.exit_code == 0 and "cleared 3 entries" in res.output
    assert not list((tmp_path / "kv").rglob("*.kvc"))


def test_clear_asks_before_deleting(tmp_path):
    _fill(tmp_path / "kv")
    res = cli.invoke(app, ["cache", "clear", "--disk-path", str(tmp_path / "kv")], input="n\n")
    assert res.exit_code == 1
    assert len(list((tmp_path / "kv").rglob("*.kvc"))) == 3


def test_bad_setting_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCELLAR_DISK_BYTES", "a lot")
    res = cli.invoke(app, ["cache", "stats", "--disk-path", str(tmp_path)])
    assert res.exit_code == 2
    assert "disk_bytes" in res.output and "Traceback" not in res.output


def test_chat_with_unknown_model_fails_cleanly():
    res = cli.invoke(app, ["chat", "--model", "/no/such/model", "--disk-bytes", "0"])
    assert res.exit_code == 2 and "unknown model" in res.output


def test_unknown_codec_flag_is_one_clear_error():
    res = cli.invoke(app, ["chat", "--disk-codec", "zip", "--disk-bytes", "0"])
    assert res.exit_code == 2 and "disk_codec" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_chat_with_a_lossy_disk_codec_says_which_codec_served(tmp_path):
    res = cli.invoke(
        app,
        [
            "chat",
            "--memory-bytes",
            "0",
            "--disk-path",
            str(tmp_path / "kv"),
            "--disk-codec",
            "kivi4",
            "--max-tokens",
            "2",
            "--no-compare",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "disk kivi4" in res.output and "codecs: memory raw, disk kivi4" in res.output
    frames = list((tmp_path / "kv").rglob("*.kvc"))
    assert frames and all(codecs.frame_codec_name(f.read_bytes()) == "kivi4" for f in frames)
