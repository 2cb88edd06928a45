"""HNSW vector indexes, one per namespace, over unit vectors (inner product = cosine).

An index is derived data: the response store is the source of truth and :meth:`IndexSet.rebuild`
recreates every index from it (a process restart, another server's entries, a corrupt index).
Labels are the store's 63-bit entry ids, so a hit maps straight back to its row.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import hnswlib
import numpy as np


class VectorIndex:
    """hnswlib index that grows by doubling and reuses deleted slots."""

    def __init__(
        self, dim: int, *, capacity: int = 1024, m: int = 16, ef_construction: int = 200,
        ef_search: int = 64, threads: int = 1,
    ) -> None:
        self.dim = dim
        self.ef_search = ef_search
        self.threads = threads
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(
            max_elements=max(capacity, 16), ef_construction=ef_construction, M=m,
            allow_replace_deleted=True,
        )
        self._index.set_ef(ef_search)
        self._labels: set[int] = set()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, labels: Iterable[int], vectors: np.ndarray) -> None:
        labels = np.asarray(list(labels), dtype=np.uint64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(labels), self.dim)
        if not len(labels):
            return
        with self._lock:
            fresh = [int(x) for x in labels if int(x) not in self._labels]
            # deleted slots are reused (replace_deleted), so live + new entries must fit
            needed = len(self._labels) + len(fresh)
            capacity = self._index.get_max_elements()
            if needed > capacity:
                while capacity < needed:
                    capacity *= 2
                self._index.resize_index(capacity)
            self._index.add_items(vectors, labels, num_threads=self.threads, replace_deleted=True)
            self._labels.update(int(x) for x in labels)

    def remove(self, label: int) -> bool:
        with self._lock:
            if label not in self._labels:
                return False
            self._index.mark_deleted(label)
            self._labels.discard(label)
            return True

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to k (label, cosine similarity) pairs, most similar first."""
        with self._lock:
            k = min(k, len(self._labels))
            if k <= 0:
                return []
            self._index.set_ef(max(self.ef_search, k))
            query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, self.dim)
            while True:
                try:
                    labels, distances = self._index.knn_query(query, k=k, num_threads=1)
                    break
                except RuntimeError:  # too few reachable live elements for k (many deletions)
                    if k == 1:
                        return []
                    k = max(1, k // 2)
        return [(int(lbl), float(1.0 - d)) for lbl, d in zip(labels[0], distances[0], strict=True)]


class IndexSet:
    """Namespace name -> VectorIndex, created on first use."""

    def __init__(self, dim: int, **index_kwargs) -> None:
        self.dim = dim
        self._kwargs = index_kwargs
        self._indexes: dict[str, VectorIndex] = {}
        self._lock = threading.Lock()

    def get(self, namespace: str, create: bool = False) -> VectorIndex | None:
        with self._lock:
            index = self._indexes.get(namespace)
            if index is None and create:
                index = self._indexes[namespace] = VectorIndex(self.dim, **self._kwargs)
            return index

    def add(self, namespace: str, label: int, vector: np.ndarray) -> None:
        self.get(namespace, create=True).add([label], vector)

    def remove(self, namespace: str, label: int) -> None:
        index = self.get(namespace)
        if index is not None:
            index.remove(label)

    def search(self, namespace: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        index = self.get(namespace)
        return index.search(vector, k) if index is not None else []

    def discard(self, label: int) -> None:
        """Remove `label` wherever it is (a deletion seen in the change log names no index)."""
        with self._lock:
            indexes = list(self._indexes.values())
        for index in indexes:
            index.remove(label)

    def clear(self) -> None:
        with self._lock:
            self._indexes.clear()

    def rebuild(self, rows: Iterable[tuple[str, int, np.ndarray]], batch: int = 4096) -> int:
        """Recreate all indexes from (namespace, label, vector) rows; returns the row count."""
        self.clear()
        pending: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        count = 0
        for namespace, label, vector in rows:
            labels, vecs = pending.setdefault(namespace, ([], []))
            labels.append(label)
            vecs.append(vector)
            count += 1
            if len(labels) >= batch:
                self.get(namespace, create=True).add(labels, np.stack(vecs))
                pending[namespace] = ([], [])
        for namespace, (labels, vecs) in pending.items():
            if labels:
                self.get(namespace, create=True).add(labels, np.stack(vecs))
        return count

    def namespaces(self) -> list[str]:
        with self._lock:
            return list(self._indexes)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(i) for i in self._indexes.values())
