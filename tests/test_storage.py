"""Storage tiers: the Backend contract for memory and disk, disk durability, tiered promotion."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcellar.storage import disk as disk_mod
from kvcellar.storage.base import Backend, BackendStats
from kvcellar.storage.disk import DiskBackend
from kvcellar.storage.memory import MemoryBackend
from kvcellar.storage.tiered import TieredStore

BUDGET = 1000
KEYS = ["aa01", "aa02", "bb03", "cc04", "dd05"]


def disk_files(root: Path) -> dict[str, int]:
    """key -> size of every ``.kvc`` file under ``root``."""
    return {p.name[: -len(".kvc")]: p.stat().st_size for p in root.rglob("*.kvc")}


def make_backend(kind: str, budget: int, root: Path | None) -> Backend:
    if kind == "memory":
        return MemoryBackend(budget)
    assert root is not None
    return DiskBackend(root, budget)


@pytest.fixture(params=["memory", "disk"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = make_backend(request.param, BUDGET, tmp_path / "cache")
    yield b
    b.close()


# --------------------------------------------------------------------------- contract


def test_is_backend(backend: Backend) -> None:
    assert isinstance(backend, Backend)


def test_roundtrip_replace_delete(backend: Backend) -> None:
    assert backend.get("aa01") is None
    assert backend.put("aa01", b"hello")
    got = backend.get("aa01")
    assert got == b"hello" and isinstance(got, bytes)
    assert backend.put("aa01", b"bye")
    assert backend.get("aa01") == b"bye"
    assert backend.stats().used_bytes == 3
    assert backend.stats().entries == 1
    assert backend.delete("aa01")
    assert not backend.delete("aa01")
    assert backend.get("aa01") is None
    assert backend.stats().used_bytes == 0


def test_empty_value(backend: Backend) -> None:
    assert backend.put("aa01", b"")
    assert backend.get("aa01") == b""
    assert backend.contains("aa01")


def test_keys_and_clear(backend: Backend) -> None:
    for k in KEYS[:3]:
        assert backend.put(k, b"x" * 10)
    assert sorted(backend.keys()) == sorted(KEYS[:3])
    backend.clear()
    assert list(backend.keys()) == []
    assert backend.stats().used_bytes == 0
    assert backend.stats().entries == 0
    assert all(backend.get(k) is None for k in KEYS[:3])


def test_stats_counters(backend: Backend) -> None:
    backend.put("aa01", b"a" * 400)
    backend.put("aa02", b"b" * 400)
    backend.get("aa01")
    backend.get("zz99")
    backend.put("bb03", b"c" * 400)  # evicts aa02 (aa01 was used more recently)
    backend.put("cc04", b"d" * (BUDGET + 1))  # refused
    s = backend.stats()
    assert isinstance(s, BackendStats)
    assert (s.hits, s.misses, s.puts, s.rejected_puts, s.evictions) == (1, 1, 3, 1, 1)
    assert s.budget_bytes == BUDGET
    assert s.used_bytes == 800 and s.entries == 2
    assert s.errors == 0


def test_lru_access_protects_old_key(backend: Backend) -> None:
    backend.put("aa01", b"a" * 400)
    backend.put("aa02", b"b" * 400)
    assert backend.get("aa01") == b"a" * 400  # aa02 is now least recently used
    backend.put("bb03", b"c" * 400)
    assert backend.contains("aa01")
    assert not backend.contains("aa02")
    assert backend.contains("bb03")


def test_contains_does_not_change_recency_or_counters(backend: Backend) -> None:
    backend.put("aa01", b"a" * 400)
    backend.put("aa02", b"b" * 400)
    before = backend.stats()
    assert backend.contains("aa01")
    assert not backend.contains("zz99")
    after = backend.stats()
    assert (after.hits, after.misses) == (before.hits, before.misses)
    backend.put("bb03", b"c" * 400)  # aa01 is still the LRU entry
    assert not backend.contains("aa01")
    assert backend.contains("aa02")


def test_oversized_value_refused_nothing_evicted(backend: Backend) -> None:
    backend.put("aa01", b"a" * 400)
    backend.put("aa02", b"b" * 400)
    assert not backend.put("bb03", b"c" * (BUDGET + 1))
    s = backend.stats()
    assert s.rejected_puts == 1 and s.evictions == 0
    assert sorted(backend.keys()) == ["aa01", "aa02"]
    assert backend.get("bb03") is None


def test_refused_replacement_drops_stale_value(backend: Backend) -> None:
    """After a refused put the old value must not be served as if it were the new one."""
    backend.put("aa01", b"old")
    assert not backend.put("aa01", b"n" * (BUDGET + 1))
    assert backend.get("aa01") is None
    assert backend.stats().used_bytes == 0


def test_value_exactly_budget(backend: Backend) -> None:
    backend.put("aa01", b"a" * 10)
    assert backend.put("aa02", b"b" * BUDGET)
    assert list(backend.keys()) == ["aa02"]
    assert backend.stats().used_bytes == BUDGET


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_zero_budget_holds_nothing(kind: str, tmp_path: Path) -> None:
    b = make_backend(kind, 0, tmp_path / "c")
    assert not b.put("aa01", b"")
    assert not b.put("aa02", b"x")
    assert b.get("aa01") is None
    assert b.stats().rejected_puts == 2 and b.stats().used_bytes == 0


def test_negative_budget_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MemoryBackend(-1)
    with pytest.raises(ValueError):
        DiskBackend(tmp_path, -1)


def test_memory_get_returns_stored_object() -> None:
    b = MemoryBackend(BUDGET)
    value = b"v" * 100
    b.put("aa01", value)
    assert b.get("aa01") is value


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_concurrent_use_keeps_budget(kind: str, tmp_path: Path) -> None:
    b = make_backend(kind, 2000, tmp_path / "c")
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for n in range(150):
                key = f"k{(seed * 7 + n) % 12:02d}"
                value = bytes([n % 256]) * ((seed * 131 + n * 37) % 700)
                if n % 3 == 0:
                    b.put(key, value)
                elif n % 3 == 1:
                    got = b.get(key)
                    assert got is None or len(set(got)) <= 1
                else:
                    b.delete(key) if n % 9 == 2 else b.contains(key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = b.stats()
    assert s.used_bytes <= 2000
    assert s.errors == 0
    if kind == "disk":
        files = disk_files(tmp_path / "c")
        assert sum(files.values()) == s.used_bytes
        assert set(files) == set(b.keys())


# --------------------------------------------------------------------------- properties

_KEY = st.sampled_from(["aa01", "aa02", "ab03", "bb04", "cc05", "cd06"])
_OP = st.one_of(
    st.tuples(st.just("put"), _KEY, st.integers(0, int(BUDGET * 1.5)), st.integers(0, 255)),
    st.tuples(st.just("get"), _KEY),
    st.tuples(st.just("delete"), _KEY),
    st.tuples(st.just("contains"), _KEY),
    st.tuples(st.just("restart")),
)


class LruModel:
    """Reference LRU with the same rules as the backends."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.data: OrderedDict[str, bytes] = OrderedDict()

    def used(self) -> int:
        return sum(len(v) for v in self.data.values())

    def put(self, key: str, value: bytes) -> bool:
        self.data.pop(key, None)
        if self.budget == 0 or len(value) > self.budget:
            return False
        while self.used() + len(value) > self.budget:
            self.data.popitem(last=False)
        self.data[key] = value
        return True

    def get(self, key: str) -> bytes | None:
        if key in self.data:
            self.data.move_to_end(key)
        return self.data.get(key)


def _run_ops(kind: str, ops: list[tuple], budget: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="kvc-prop-")) / "c" if kind == "disk" else None
    try:
        b = make_backend(kind, budget, root)
        model = LruModel(budget)
        last_put: dict[str, bytes] = {}  # last value put under each key, accepted or not
        exact = True  # LRU order after a restart comes from file times, which may tie
        for op in ops:
            name, key = op[0], (op[1] if len(op) > 1 else None)
            if name == "put":
                value = bytes([op[3]]) * op[2]
                last_put[key] = value
                ok = b.put(key, value)
                assert ok == (len(value) <= budget and budget > 0)
                if exact:
                    model.put(key, value)
            elif name == "get":
                got = b.get(key)
                assert got is None or got == last_put.get(key)
                if exact:
                    assert got == model.get(key)
            elif name == "delete":
                b.delete(key)
                model.data.pop(key, None)
                last_put.pop(key, None)
            elif name == "contains":
                assert b.contains(key) == (key in set(b.keys()))
            elif name == "restart":
                if kind != "disk":
                    continue
                before = set(b.keys())
                b.close()
                b = DiskBackend(root, budget)
                assert set(b.keys()) == before
                exact = False
            s = b.stats()
            present = list(b.keys())
            assert s.used_bytes <= budget
            assert s.entries == len(present)
            assert s.used_bytes == sum(len(last_put[k]) for k in present)
            if exact:
                assert present == list(model.data)  # same entries, same LRU order
            if kind == "disk":
                files = disk_files(root)
                assert set(files) == set(present)
                assert sum(files.values()) == s.used_bytes
                assert not list(root.rglob("*.tmp"))
        b.close()
    finally:
        if root is not None:
            shutil.rmtree(root.parent, ignore_errors=True)


@pytest.mark.parametrize("kind", ["memory", "disk"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OP, max_size=40))
def test_random_ops_keep_invariants(kind: str, ops: list[tuple]) -> None:
    _run_ops(kind, ops, BUDGET)


@settings(max_examples=20, deadline=None)
@given(ops=st.lists(_OP, max_size=15), budget=st.sampled_from([0, 1, 7]))
def test_tiny_budgets(ops: list[tuple], budget: int) -> None:
    _run_ops("memory", ops, budget)
    _run_ops("disk", ops, budget)


# --------------------------------------------------------------------------- disk specifics


def test_disk_restart_sees_entries(tmp_path: Path) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    payload = {k: os.urandom(50 + i) for i, k in enumerate(KEYS)}
    for k, v in payload.items():
        assert b.put(k, v)
    b.close()
    b2 = DiskBackend(tmp_path, BUDGET)
    assert sorted(b2.keys()) == sorted(KEYS)
    assert b2.stats().used_bytes == sum(map(len, payload.values()))
    for k, v in payload.items():
        assert b2.get(k) == v


def test_disk_layout_is_sharded(tmp_path: Path) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    b.put("abcdef", b"x")
    assert (tmp_path / "ab" / "abcdef.kvc").read_bytes() == b"x"


def test_disk_leftover_tmp_removed_at_start(tmp_path: Path) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    b.put("aa01", b"keep")
    # A crashed writer of this pid, one of an unparseable name, one of a pid that cannot exist.
    (tmp_path / "aa" / f"aa02.{os.getpid()}.1.tmp").write_bytes(b"partial")
    (tmp_path / "aa" / "junk.tmp").write_bytes(b"partial")
    (tmp_path / "aa" / "aa03.999999999.1.tmp").write_bytes(b"partial")
    b2 = DiskBackend(tmp_path, BUDGET)
    assert not list(tmp_path.rglob("*.tmp"))
    assert list(b2.keys()) == ["aa01"]
    assert b2.get("aa01") == b"keep"


def test_disk_restart_with_smaller_budget_evicts_lru(tmp_path: Path) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    for i, k in enumerate(KEYS[:4]):
        b.put(k, b"x" * 200)
        # Distinct, increasing file times so the LRU order is unambiguous on disk.
        os.utime(b.path / k[:2] / f"{k}.kvc", (1000 + i, 1000 + i))
    os.utime(b.path / "aa" / "aa01.kvc", (2000, 2000))  # aa01 recently used
    b.close()
    b2 = DiskBackend(tmp_path, 450)
    assert sorted(b2.keys()) == ["aa01", "cc04"]
    s = b2.stats()
    assert s.used_bytes == 400 and s.evictions == 2
    assert set(disk_files(tmp_path)) == {"aa01", "cc04"}


def test_disk_get_refreshes_recency_across_restart(tmp_path: Path) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    b.put("aa01", b"a" * 300)
    b.put("aa02", b"b" * 300)
    for k in ("aa01", "aa02"):
        os.utime(tmp_path / "aa" / f"{k}.kvc", (1000, 1000))
    b.get("aa01")  # touches the file: newer than aa02 now
    b.close()
    b2 = DiskBackend(tmp_path, 400)
    assert list(b2.keys()) == ["aa01"]


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a.b", "x" * 201, "é", "a b", ".."])
def test_disk_invalid_keys_raise(tmp_path: Path, bad: str) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    for call in (
        lambda: b.get(bad),
        lambda: b.put(bad, b"x"),
        lambda: b.contains(bad),
        lambda: b.delete(bad),
    ):
        with pytest.raises(ValueError, match="invalid storage key"):
            call()


def test_disk_file_deleted_behind_back_is_miss(tmp_path: Path) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    b.put("aa01", b"x" * 100)
    (tmp_path / "aa" / "aa01.kvc").unlink()
    assert not b.contains("aa01")
    assert b.get("aa01") is None
    s = b.stats()
    assert s.misses == 1 and s.used_bytes == 0 and s.entries == 0 and s.errors == 0


def test_disk_adopts_file_of_other_process(tmp_path: Path) -> None:
    mine = DiskBackend(tmp_path, BUDGET)
    mine.put("aa01", b"a" * 500)
    other = DiskBackend(tmp_path, BUDGET)
    other.put("bb02", b"b" * 600)
    assert mine.contains("bb02")
    assert mine.get("bb02") == b"b" * 600  # adopted: evicts aa01 to respect the budget
    s = mine.stats()
    assert s.hits == 1 and s.used_bytes == 600 and s.evictions == 1
    assert list(mine.keys()) == ["bb02"]
    assert set(disk_files(tmp_path)) == {"bb02"}


def test_disk_write_error_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    b.put("aa01", b"old")

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_mod.os, "replace", disk_full)
    assert b.put("aa02", b"new" * 10) is False
    assert b.put("aa01", b"newer") is False
    s = b.stats()
    assert s.errors == 2 and s.used_bytes == 0 and s.entries == 0
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    assert b.get("aa01") is None  # the stale value is not served
    assert b.put("aa02", b"ok")
    assert b.get("aa02") == b"ok"


def test_disk_read_error_is_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    b.put("aa01", b"x")
    real_open = open

    def failing_open(file: object, mode: str = "r", *args: object, **kw: object) -> object:
        if "r" in mode and str(file).endswith(".kvc"):
            raise OSError(5, "Input/output error")
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr("builtins.open", failing_open)
    assert b.get("aa01") is None
    monkeypatch.undo()
    s = b.stats()
    assert s.errors == 1 and s.misses == 1


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_disk_read_only_directory(tmp_path: Path) -> None:
    b = DiskBackend(tmp_path, BUDGET)
    b.put("aa01", b"x")
    os.chmod(tmp_path / "aa", 0o500)
    try:
        assert b.put("aa02", b"y") is False
        assert b.stats().errors >= 1
        assert b.get("aa01") == b"x"
    finally:
        os.chmod(tmp_path / "aa", 0o700)


# --------------------------------------------------------------------------- tiered


class BrokenBackend:
    """A tier that raises on everything (Redis down)."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def _boom(self, *args: object) -> None:
        self.calls += 1
        raise RuntimeError("connection refused")

    get = put = contains = delete = keys = clear = stats = close = _boom


def _tiers(tmp_path: Path) -> tuple[MemoryBackend, DiskBackend, TieredStore]:
    mem = MemoryBackend(BUDGET)
    disk = DiskBackend(tmp_path, 10 * BUDGET)
    return mem, disk, TieredStore([mem, disk])


def test_tiered_put_writes_through(tmp_path: Path) -> None:
    mem, disk, store = _tiers(tmp_path)
    assert store.put("aa01", b"v" * 10) == 2
    assert mem.contains("aa01") and disk.contains("aa01")
    assert store.get("aa01") == (b"v" * 10, 0)
    assert store.put("aa02", b"w" * (BUDGET + 1)) == 1  # too big for memory only
    assert store.get("aa02") == (b"w" * (BUDGET + 1), 1)
    assert store.tiers == (mem, disk)


def test_tiered_get_promotes_disk_hit(tmp_path: Path) -> None:
    mem, disk, store = _tiers(tmp_path)
    disk.put("aa01", b"payload")
    assert not mem.contains("aa01")
    assert store.get("aa01") == (b"payload", 1)
    assert mem.contains("aa01")
    assert store.get("aa01") == (b"payload", 0)
    assert store.stats()[0].extra["promotions"] == 1
    assert store.get("zz99") is None


def test_tiered_delete_clear_contains(tmp_path: Path) -> None:
    mem, disk, store = _tiers(tmp_path)
    store.put("aa01", b"x")
    disk.put("aa02", b"y")
    assert store.contains("aa02") and not store.contains("zz99")
    assert disk.stats().hits == 0  # contains counts nothing
    assert store.delete("aa01")
    assert not mem.contains("aa01") and not disk.contains("aa01")
    assert not store.delete("aa01")
    store.clear()
    assert not store.contains("aa02")
    names = [s.name for s in store.stats()]
    assert names == ["memory", "disk"]
    store.close()


def test_tiered_contains_prefix(tmp_path: Path) -> None:
    mem, disk, store = _tiers(tmp_path)
    mem.put("k0", b"0")
    disk.put("k1", b"1")
    mem.put("k3", b"3")  # after the gap: not part of the prefix
    assert store.contains_prefix(["k0", "k1", "k2", "k3"]) == 2
    assert store.contains_prefix(["k2", "k0"]) == 0
    assert store.contains_prefix([]) == 0
    assert store.contains_prefix(["k0", "k1"]) == 2


def test_tiered_skips_broken_tier(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = BrokenBackend()
    disk = DiskBackend(tmp_path, BUDGET)
    store = TieredStore([broken, disk])  # type: ignore[list-item]
    with caplog.at_level(logging.WARNING, logger="kvcellar.storage.tiered"):
        assert store.put("aa01", b"v") == 1
        assert store.get("aa01") == (b"v", 1)  # broken get = miss, failed promotion ignored
        assert store.get("aa01") == (b"v", 1)
        assert store.contains("aa01")
        assert store.contains_prefix(["aa01", "aa02"]) == 1
        assert store.delete("aa01")
        store.clear()
        stats = store.stats()
        calls = broken.calls
        store.close()
    warnings = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(warnings) == 1  # logged once when it started failing, not per call
    assert stats[0].name == "broken" and stats[0].errors == calls
    assert stats[0].extra["failing"] == 1.0
    assert stats[1].errors == 0 and stats[1].extra["failing"] == 0.0


def test_tiered_logs_recovery(caplog: pytest.LogCaptureFixture) -> None:
    mem = MemoryBackend(BUDGET)
    flaky = MemoryBackend(BUDGET, name="flaky")
    real_get = flaky.get
    fail = {"on": True}

    def get(key: str) -> bytes | None:
        if fail["on"]:
            raise RuntimeError("timeout")
        return real_get(key)

    flaky.get = get  # type: ignore[method-assign]
    store = TieredStore([mem, flaky])
    flaky.put("aa01", b"v")
    with caplog.at_level(logging.INFO, logger="kvcellar.storage.tiered"):
        assert store.get("aa01") is None
        assert store.get("aa01") is None
        fail["on"] = False
        assert store.get("aa01") == (b"v", 1)
        assert store.get("zz99") is None
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "failed" in msgs[0] and "works again" in msgs[1]
    assert store.stats()[1].errors == 2
