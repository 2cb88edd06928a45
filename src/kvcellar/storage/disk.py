"""The disk tier: one file per key, so entries survive restarts and can be shared by processes.

Layout: ``<root>/<key[:2]>/<key>.kvc``; two-character shard directories keep each directory small.

Why the pieces are the way they are:

- Writes go to a temp file in the same directory and are renamed into place (``os.replace``), so
  a reader (this process or another) sees either the old file or the whole new one, never a torn
  one. The temp name carries pid and thread id so concurrent writers never share a temp file.
- The index (key -> size, last access) lives in memory so the budget check and LRU choice do not
  stat the directory on every put. It is rebuilt from the directory at start; recency is kept in
  file times (``os.utime`` on every hit) so LRU order survives a restart.
- One lock guards index and files together. Index and directory then always agree (a finer
  scheme raced eviction against reads in testing); a chunk file reads in a few milliseconds, so
  serialising them costs little next to the prefill a hit saves.
- Other processes may share the directory: a file that vanished is a miss (and leaves the index),
  a file that appeared is adopted on ``get``. Each process enforces the budget over what it knows.
- I/O errors (disk full, permissions) never escape ``get``/``put``: the tier degrades to misses
  and refused puts, counted in ``errors``, because a cache must never fail a request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from kvcellar.policies.pins import PinTable
from kvcellar.storage.base import BackendStats

logger = logging.getLogger(__name__)

SUFFIX = ".kvc"
TMP_SUFFIX = ".tmp"
_KEY_RE = re.compile(r"[0-9a-zA-Z_-]{1,200}")
# A temp file of a live writer in another process must not be deleted from under it; one this old
# is a leftover whatever its pid says (pids are reused).
_TMP_MAX_AGE_S = 3600.0


def validate_key(key: str) -> None:
    """Reject keys that could escape the directory (``..``, ``/``) or exceed name limits."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(
            f"invalid storage key {key!r}: keys must be 1-200 characters of [0-9a-zA-Z_-] "
            "(use the hex keys from kvcellar.keys)"
        )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


class DiskBackend:
    """Byte store of one file per key under ``path`` with a byte budget and LRU eviction.

    ``fsync=True`` makes each put durable against power loss at the cost of a sync per write;
    off by default because every frame carries a checksum, so a torn file after a crash is
    detected by the codec and treated as a miss.
    """

    def __init__(
        self,
        path: str | Path,
        budget_bytes: int,
        name: str = "disk",
        *,
        fsync: bool = False,
        pins: PinTable | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(
                f"budget_bytes must be >= 0 (got {budget_bytes}); use 0 to disable the disk tier"
            )
        self.name = name
        self._root = Path(path)
        self._budget = int(budget_bytes)
        self._fsync = fsync
        self._pins = pins
        self._lock = threading.RLock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, least recent first
        self._used = 0
        self._stats = BackendStats(name=name, budget_bytes=self._budget)
        self._root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._rebuild_index()

    @property
    def path(self) -> Path:
        """Root directory of the tier."""
        return self._root

    @property
    def budget_bytes(self) -> int:
        """The hard limit on the sum of indexed file sizes."""
        return self._budget

    def _path(self, key: str) -> Path:
        return self._root / key[:2] / f"{key}{SUFFIX}"

    def _error(self, msg: str, *args: object) -> None:
        logger.warning(msg, *args)
        self._stats.errors += 1

    # ----------------------------------------------------------------- index upkeep (locked)

    def _rebuild_index(self) -> None:
        """Scan the directory: drop leftover temp files, index ``.kvc`` files by recency."""
        found: list[tuple[int, str, int]] = []  # (recency ns, key, size)
        now = time.time()
        try:
            shards = [d for d in os.scandir(self._root) if d.is_dir(follow_symlinks=False)]
        except OSError as exc:
            self._error("%s: cannot scan %s (%s); starting empty", self.name, self._root, exc)
            return
        for shard in shards:
            try:
                files = list(os.scandir(shard.path))
            except OSError as exc:
                self._error("%s: cannot scan %s (%s)", self.name, shard.path, exc)
                continue
            for f in files:
                try:
                    if f.name.endswith(TMP_SUFFIX):
                        if self._is_leftover_tmp(f, now):
                            os.unlink(f.path)
                        continue
                    key = f.name[: -len(SUFFIX)]
                    if (
                        not f.name.endswith(SUFFIX)
                        or _KEY_RE.fullmatch(key) is None
                        or key[:2] != shard.name
                        or not f.is_file(follow_symlinks=False)
                    ):
                        continue  # not ours: never index a file get() could not address
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed by another process while we scanned
                except OSError as exc:
                    self._error("%s: cannot inspect %s (%s)", self.name, f.path, exc)
                    continue
                found.append((max(st.st_mtime_ns, st.st_atime_ns), key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._used += size
        self._evict_until(self._budget)
        logger.info(
            "%s: %d entries, %d bytes in %s (budget %d)",
            self.name,
            len(self._index),
            self._used,
            self._root,
            self._budget,
        )

    @staticmethod
    def _is_leftover_tmp(f: os.DirEntry[str], now: float) -> bool:
        """True unless the temp file plausibly belongs to a writer that is still running."""
        parts = f.name[: -len(TMP_SUFFIX)].rsplit(".", 2)  # <key>.<pid>.<tid>
        try:
            pid = int(parts[1]) if len(parts) == 3 else -1
        except ValueError:
            pid = -1
        if pid == os.getpid() or not _pid_alive(pid):
            return True
        try:
            return now - f.stat(follow_symlinks=False).st_mtime > _TMP_MAX_AGE_S
        except OSError:
            return False

    def _forget(self, key: str) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size

    def _remove(self, key: str) -> bool:
        """Delete the file and forget it; False (error counted) if it exists and cannot go."""
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._error("%s: cannot remove %s (%s)", self.name, key, exc)
            return False
        self._forget(key)
        return True

    def _evict_until(self, limit: int) -> bool:
        """Evict least recently used unpinned entries until ``used <= limit``; False if stuck.

        Nothing is evicted when the goal cannot be reached (too much is pinned).
        """
        victims, freed = [], 0
        for key, size in self._index.items():
            if self._used - freed <= limit:
                break
            if self._pins is None or not self._pins.is_pinned(key):
                victims.append(key)
                freed += size
        if self._used - freed > limit:
            return False
        for victim in victims:
            if self._remove(victim):
                self._stats.evictions += 1
        return self._used <= limit

    def _index_file(self, key: str, size: int) -> bool:
        """Count ``size`` bytes for ``key`` as most recent, evicting to fit; False if it can't."""
        self._forget(key)
        if self._budget == 0 or size > self._budget or not self._evict_until(self._budget - size):
            return False
        self._index[key] = size
        self._used += size
        return True

    # ----------------------------------------------------------------- Backend

    def get(self, key: str) -> bytes | None:
        """Read the file; a vanished file is a miss, a foreign one is adopted into the index."""
        validate_key(key)
        path = self._path(key)
        with self._lock:
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                self._forget(key)
                self._stats.misses += 1
                return None
            except OSError as exc:
                self._error("%s: cannot read %s (%s); treating as a miss", self.name, path, exc)
                self._stats.misses += 1
                return None
            self._stats.hits += 1
            if self._index.get(key) == len(data):
                self._index.move_to_end(key)
            elif not self._index_file(key, len(data)):
                # Another process wrote it and it cannot fit this tier's budget: serve, then drop.
                self._remove(key)
                return data
            with contextlib.suppress(OSError):  # recency is a hint; losing it is harmless
                os.utime(path)
            return data

    def put(self, key: str, value: bytes) -> bool:
        """Atomically write ``value`` (temp file + rename) after making room in the budget."""
        validate_key(key)
        path = self._path(key)
        with self._lock:
            if not self._index_file(key, len(value)):
                self._stats.rejected_puts += 1
                self._remove(key)  # an old value must not outlive a replacing put
                return False
            tmp = path.with_name(f"{key}.{os.getpid()}.{threading.get_native_id()}{TMP_SUFFIX}")
            try:
                path.parent.mkdir(exist_ok=True)
                with open(tmp, "wb") as fh:
                    fh.write(value)
                    fh.flush()
                    if self._fsync:
                        os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as exc:
                self._error("%s: cannot write %s (%s); entry skipped", self.name, path, exc)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                self._forget(key)
                if not self._remove(key):  # stale old file still there: keep it counted
                    with contextlib.suppress(OSError):
                        self._index_file(key, path.stat().st_size)
                return False
            self._stats.puts += 1
            return True

    def contains(self, key: str) -> bool:
        """A stat, not a read: answers for files of other processes too, changes no recency."""
        validate_key(key)
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        """Remove the file and the index entry; returns whether either existed."""
        validate_key(key)
        with self._lock:
            existed = key in self._index or self._path(key).exists()
            return self._remove(key) and existed

    def _files_on_disk(self) -> list[str]:
        """Keys of every ``.kvc`` file in the directory, ours or another process's."""
        found: list[str] = []
        try:
            shards = [d.path for d in os.scandir(self._root) if d.is_dir(follow_symlinks=False)]
        except OSError as exc:
            self._error("%s: cannot scan %s (%s)", self.name, self._root, exc)
            return found
        for shard in shards:
            with contextlib.suppress(OSError):
                found.extend(
                    f.name[: -len(SUFFIX)] for f in os.scandir(shard) if f.name.endswith(SUFFIX)
                )
        return found

    def keys(self) -> Iterator[str]:
        """Snapshot of the keys on disk: indexed ones least recent first, then files other
        processes wrote."""
        with self._lock:
            others = [k for k in self._files_on_disk() if k not in self._index]
            return iter([*self._index, *others])

    def clear(self) -> None:
        """Remove every ``.kvc`` file in the directory, indexed or not."""
        with self._lock:
            for key in set(self._index) | set(self._files_on_disk()):
                self._remove(key)

    def stats(self) -> BackendStats:
        """A fresh snapshot of the counters."""
        with self._lock:
            return replace(self._stats, entries=len(self._index), used_bytes=self._used)

    def close(self) -> None:
        """Nothing to release: every put is already on disk and no handle stays open."""
