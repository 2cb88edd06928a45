"""Settings: precedence YAML < env < keywords, sizes, and one clear error naming the setting."""

from __future__ import annotations

import pytest

from kvcellar.config import Settings, parse_size
from kvcellar.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 kb", 1500),
        ("0", 0),
        (1024, 1024),
        ("3g", 3 * 10**9),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", -5, "2XB", True])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_precedence_yaml_env_keyword(tmp_path, monkeypatch):
    cfg = tmp_path / "k.yaml"
    cfg.write_text("chunk_size: 64\nmemory_bytes: 1GB\ntenant: from-yaml\ndisk_bytes: 0\n")
    s = Settings.load(cfg)
    assert (s.chunk_size, s.memory_bytes, s.tenant, s.disk_bytes) == (64, 10**9, "from-yaml", 0)
    monkeypatch.setenv("KVCELLAR_CHUNK_SIZE", "128")
    monkeypatch.setenv("KVCELLAR_DISK_PATH", str(tmp_path / "kv"))
    s = Settings.load(cfg)
    assert s.chunk_size == 128 and s.disk_path == tmp_path / "kv" and s.tenant == "from-yaml"
    s = Settings.load(cfg, chunk_size=32, tenant=None)
    assert s.chunk_size == 32 and s.tenant == "from-yaml"  # None = flag not given


def test_defaults():
    s = Settings.load()
    assert s.enabled and s.chunk_size == 256 and not s.save_partial_chunks
    assert (s.memory_codec, s.disk_codec, s.remote_codec) == ("raw", "raw", "raw")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"memory_bytes": "huge"}, "memory_bytes"),
        ({"disk_codec": "zip"}, "disk_codec"),
        ({"memory_codec": "kivi3"}, "memory_codec"),
        ({"remote_codec": ""}, "remote_codec"),
        ({"codec": "fp16"}, "codec"),
        ({"chunk_sizee": 5}, "chunk_sizee"),
        ({"enabled": "perhaps"}, "enabled"),
    ],
)
def test_bad_value_names_the_setting(kwargs, name):
    with pytest.raises(ConfigError, match=f"'{name}'"):
        Settings.load(**kwargs)


def test_bad_env_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("KVCELLAR_DISK_BYTES", "ten")
    with pytest.raises(ConfigError, match="disk_bytes"):
        Settings.load()


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("chunk_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Settings.load(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        Settings.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "missing.yaml")
