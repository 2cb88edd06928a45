"""Shared fixtures: the real default model, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def runner():
    from transformers.utils import logging as hf_logging

    from kvcellar.config import Settings
    from kvcellar.models.hf import load_runner

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    s = Settings.load()
    return load_runner(s.model, s.model_cache_dir, s.dtype)


@pytest.fixture
def make_llm(runner, tmp_path: Path):
    """LLM objects sharing the session's model; caches live under the test's tmp dir."""
    from kvcellar.llm import LLM

    made = []

    def make(**settings):
        settings.setdefault("disk_path", tmp_path / "kv")
        settings.setdefault("disk_bytes", "200MB")
        settings.setdefault("memory_bytes", "200MB")
        llm = LLM(runner=runner, **settings)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


@pytest.fixture(scope="session")
def embedder():
    """The real MiniLM sentence embedder of the semantic cache, loaded once."""
    from kvcellar.semantic.embed import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A fresh redis-server on a free port, for one test module."""
    from kvcellar.storage.redis_local import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh 3-master Redis Cluster, for one test module."""
    from kvcellar.storage.redis_local import start_cluster

    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()
