"""Where semantic-cache entries live: the source of truth the HNSW indexes are rebuilt from.

`SqliteStore` is the embedded default (one file, WAL, so several processes on a host can share
it). Every write also appends to a change log; a process polls the log and applies other
processes' additions and deletions to its in-memory indexes. A checksum over each entry's text
makes a corrupted row a miss (and deletes it), never a wrong answer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xxhash

from kvcellar.errors import StorageError


@dataclass
class Entry:
    id: int
    namespace: str  # index namespace: tenant x model x system prompt x sampling (+ chain flag)
    tenant: str
    category: str | None
    exact_key: str
    query: str
    context: list[str]
    response: str
    vector: np.ndarray  # query embedding
    index_vector: np.ndarray  # what the ANN index holds (query fused with its context)
    context_vectors: np.ndarray | None
    created: float
    expires: float | None
    last_used: float
    hits: int = 0
    min_similarity: float = 0.0  # raised by negative feedback
    observations: list[tuple[float, bool]] = field(default_factory=list)
    checksum: str = ""

    def compute_checksum(self) -> str:
        h = xxhash.xxh64()
        for part in (self.namespace, self.tenant, self.category or "", self.exact_key,
                     self.query, json.dumps(self.context), self.response):
            h.update(part.encode())
            h.update(b"\x00")
        h.update(np.ascontiguousarray(self.vector, dtype=np.float32).tobytes())
        return h.hexdigest()

    def is_intact(self) -> bool:
        return self.checksum == self.compute_checksum()

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


class ResponseStore(Protocol):
    def put(self, entry: Entry) -> None: ...
    def get(self, entry_id: int) -> Entry | None: ...
    def find_exact(self, namespace: str, exact_key: str) -> Entry | None: ...
    def delete(self, entry_ids: Iterable[int]) -> dict[int, str]: ...
    def ids(self, tenant: str | None = None, category: str | None = None) -> list[int]: ...
    def count(self, tenant: str | None = None, category: str | None = None) -> int: ...
    def lru(self, tenant: str, category: str | None, n: int) -> list[int]: ...
    def expired(self, now: float, limit: int = 1000) -> list[int]: ...
    def touch(self, entry_id: int, now: float) -> None: ...
    def update_feedback(self, entry_id: int, min_similarity: float,
                        observations: list[tuple[float, bool]]) -> None: ...
    def iter_index_rows(self) -> Iterator[tuple[str, int, np.ndarray]]: ...
    def changes(self, cursor: Any) -> tuple[list[tuple[str, int]], Any]: ...
    def close(self) -> None: ...


def _blob(array: np.ndarray | None) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype=np.float32).tobytes()


def _vec(blob: bytes | None, dim: int) -> np.ndarray | None:
    if blob is None:
        return None
    return np.frombuffer(blob, dtype=np.float32).reshape(-1, dim) if dim else None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, tenant TEXT NOT NULL, category TEXT,
    exact_key TEXT NOT NULL, query TEXT NOT NULL, context TEXT NOT NULL, response TEXT NOT NULL,
    vector BLOB NOT NULL, index_vector BLOB NOT NULL, context_vectors BLOB, dim INTEGER NOT NULL,
    created REAL NOT NULL, expires REAL, last_used REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0,
    min_similarity REAL NOT NULL DEFAULT 0, observations TEXT NOT NULL DEFAULT '[]',
    checksum TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_exact ON entries(namespace, exact_key);
CREATE INDEX IF NOT EXISTS entries_lru ON entries(tenant, category, last_used);
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT, id INTEGER);
"""
_COLUMNS = ("id, namespace, tenant, category, exact_key, query, context, response, vector, "
            "index_vector, context_vectors, dim, created, expires, last_used, hits, "
            "min_similarity, observations, checksum")


class SqliteStore:
    """Entries in one sqlite file (or ':memory:'); thread-safe through one lock."""

    def __init__(self, path: str | Path = ":memory:", changes_kept: int = 100_000) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(Path(self.path).expanduser()) if self.path != ":memory:" else self.path,
                check_same_thread=False, timeout=30, isolation_level=None,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StorageError(
                f"semantic cache file {self.path} is not a usable sqlite database ({exc}); "
                "move it away or point semantic path elsewhere"
            ) from exc
        self._lock = threading.Lock()
        self._changes_kept = changes_kept
        self._writes = 0

    def _row_to_entry(self, row: tuple) -> Entry:
        (eid, ns, tenant, category, exact_key, query, context, response, vector, index_vector,
         context_vectors, dim, created, expires, last_used, hits, min_sim, obs, checksum) = row
        return Entry(
            id=eid, namespace=ns, tenant=tenant, category=category, exact_key=exact_key,
            query=query, context=json.loads(context), response=response,
            vector=_vec(vector, dim)[0], index_vector=_vec(index_vector, dim)[0],
            context_vectors=_vec(context_vectors, dim), created=created, expires=expires,
            last_used=last_used, hits=hits, min_similarity=min_sim,
            observations=[(float(s), bool(c)) for s, c in json.loads(obs)], checksum=checksum,
        )

    def _load(self, sql: str, args: tuple) -> Entry | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        if row is None:
            return None
        try:
            entry = self._row_to_entry(row)
        except (ValueError, TypeError, IndexError, json.JSONDecodeError):
            entry = None
        if entry is None or not entry.is_intact():
            self.delete([row[0]])  # corrupt: never serve it, and don't trip on it again
            return None
        return entry

    def put(self, entry: Entry) -> None:
        self.put_many([entry])

    def put_many(self, entries: list[Entry]) -> None:
        """One transaction, one change record per entry (bulk loads: benchmarks, imports)."""
        for e in entries:
            e.checksum = e.compute_checksum()
        rows = [
            (e.id, e.namespace, e.tenant, e.category, e.exact_key, e.query, json.dumps(e.context),
             e.response, _blob(e.vector), _blob(e.index_vector), _blob(e.context_vectors),
             int(e.vector.shape[-1]), e.created, e.expires, e.last_used, e.hits,
             e.min_similarity, json.dumps(e.observations), e.checksum)
            for e in entries
        ]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES "
                                 f"({', '.join('?' * 19)})", rows)
            self._db.executemany("INSERT INTO changes(op, id) VALUES ('add', ?)",
                                 [(e.id,) for e in entries])
            self._db.execute("COMMIT")
            self._after_write()

    def _after_write(self) -> None:
        self._writes += 1
        if self._writes % 1000 == 0:  # keep the change log bounded
            self._db.execute("DELETE FROM changes WHERE seq < (SELECT MAX(seq) FROM changes) - ?",
                             (self._changes_kept,))

    def get(self, entry_id: int) -> Entry | None:
        return self._load(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,))

    def find_exact(self, namespace: str, exact_key: str) -> Entry | None:
        return self._load(
            f"SELECT {_COLUMNS} FROM entries WHERE namespace = ? AND exact_key = ? "
            "ORDER BY created DESC LIMIT 1", (namespace, exact_key))

    def delete(self, entry_ids: Iterable[int]) -> dict[int, str]:
        """Removes the entries; returns id -> index namespace of those that were there."""
        ids = list(dict.fromkeys(int(i) for i in entry_ids))
        if not ids:
            return {}
        with self._lock:
            self._db.execute("BEGIN")
            removed: dict[int, str] = {}
            for start in range(0, len(ids), 500):  # one statement per 500 ids, not per id
                part = ids[start:start + 500]
                marks = ",".join("?" * len(part))
                removed.update(self._db.execute(
                    f"SELECT id, namespace FROM entries WHERE id IN ({marks})", part).fetchall())
                self._db.execute(f"DELETE FROM entries WHERE id IN ({marks})", part)
            self._db.executemany("INSERT INTO changes(op, id) VALUES ('del', ?)",
                                 [(i,) for i in removed])
            self._db.execute("COMMIT")
            self._after_write()
        return removed

    def _where(self, tenant: str | None, category: str | None) -> tuple[str, tuple]:
        clauses, args = [], []
        if tenant is not None:
            clauses.append("tenant = ?")
            args.append(tenant)
        if category is not None:
            clauses.append("category IS ?")
            args.append(category)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)

    def ids(self, tenant: str | None = None, category: str | None = None) -> list[int]:
        where, args = self._where(tenant, category)
        with self._lock:
            return [r[0] for r in self._db.execute(f"SELECT id FROM entries{where}", args)]

    def count(self, tenant: str | None = None, category: str | None = None) -> int:
        where, args = self._where(tenant, category)
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM entries{where}", args).fetchone()[0]

    def lru(self, tenant: str, category: str | None, n: int) -> list[int]:
        if n <= 0:
            return []
        with self._lock:
            if category is None:
                rows = self._db.execute(
                    "SELECT id FROM entries WHERE tenant = ? ORDER BY last_used LIMIT ?",
                    (tenant, n))
            else:
                rows = self._db.execute(
                    "SELECT id FROM entries WHERE tenant = ? AND category IS ? "
                    "ORDER BY last_used LIMIT ?", (tenant, category, n))
            return [r[0] for r in rows]

    def expired(self, now: float, limit: int = 1000) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM entries WHERE expires IS NOT NULL AND expires <= ? LIMIT ?",
                (now, limit))]

    def touch(self, entry_id: int, now: float) -> None:
        with self._lock:
            self._db.execute("UPDATE entries SET last_used = ?, hits = hits + 1 WHERE id = ?",
                             (now, entry_id))

    def update_feedback(self, entry_id: int, min_similarity: float,
                        observations: list[tuple[float, bool]]) -> None:
        # neither field is under the checksum: feedback must not make an entry look corrupt
        with self._lock:
            self._db.execute(
                "UPDATE entries SET min_similarity = ?, observations = ? WHERE id = ?",
                (min_similarity, json.dumps(observations), entry_id))

    def iter_index_rows(self) -> Iterator[tuple[str, int, np.ndarray]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT namespace, id, index_vector, dim FROM entries WHERE expires IS NULL "
                "OR expires > ?", (time.time(),)).fetchall()
        for ns, eid, blob, dim in rows:
            yield ns, eid, np.frombuffer(blob, dtype=np.float32).reshape(dim)

    def changes(self, cursor: int | None) -> tuple[list[tuple[str, int]], int]:
        """Change records after `cursor` (None: just the current position)."""
        with self._lock:
            if cursor is None:
                row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
                return [], row[0]
            rows = self._db.execute(
                "SELECT seq, op, id FROM changes WHERE seq > ? ORDER BY seq LIMIT 10000",
                (cursor,)).fetchall()
        if not rows:
            return [], cursor
        return [(op, eid) for _, op, eid in rows], rows[-1][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
