"""Chunk keys: a blake2b hash chain over token ids, namespaced by model and tenant.

key[i] = H(key[i-1] || tokens of chunk i) with key[-1] = H(namespace), so a chunk's key names its
whole prefix: two prompts share key[i] only if they share every token up to the end of chunk i.
blake2b is used (never Python's salted ``hash()``) so keys agree across processes and machines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_DIGEST = 16  # blake2b-128


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


def namespace(model_fingerprint: str, tenant: str) -> str:
    """Namespace string of a model fingerprint and a tenant; the root of every key chain."""
    return f"{model_fingerprint}|tenant={tenant}"


def chunk_spans(n_tokens: int, chunk_size: int, include_partial: bool) -> list[tuple[int, int]]:
    """[start, end) of each chunk; the final short chunk only when ``include_partial``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    spans = [(s, s + chunk_size) for s in range(0, n_tokens - chunk_size + 1, chunk_size)]
    full = len(spans) * chunk_size
    if include_partial and full < n_tokens:
        spans.append((full, n_tokens))
    return spans


def namespace_tag(ns: str) -> str:
    """8 hex characters that start every key of ``ns``: lets a tenant's keys be found and
    cleared without a side index (keys are otherwise opaque hashes)."""
    return hashlib.blake2b(ns.encode(), digest_size=4).hexdigest()


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int,
    ns: str,
    include_partial: bool = False,
) -> list[str]:
    """Hex key of every chunk of ``tokens``: namespace tag + chain hash (see module docstring)."""
    arr = np.asarray(tokens, dtype="<i8")
    tag = namespace_tag(ns)
    prev = _h(ns.encode())
    keys = []
    for start, end in chunk_spans(len(arr), chunk_size, include_partial):
        prev = _h(prev + arr[start:end].tobytes())
        keys.append(tag + prev.hex())
    return keys
