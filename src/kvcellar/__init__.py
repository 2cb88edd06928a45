"""kvcellar: a caching layer for LLM inference.

Public API: :class:`LLM`, :class:`CacheEngine`, :class:`SemanticCache`, :class:`Settings`,
:func:`load_model` and the error base :class:`KvcellarError`. Heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Weights are files on this machine: never let transformers reach for a hub at run time. Set
# before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvcellar.config import Settings
from kvcellar.errors import KvcellarError

if TYPE_CHECKING:
    from kvcellar.kv.engine import CacheEngine
    from kvcellar.llm import LLM, GenerationOutput
    from kvcellar.models.hf import HFRunner
    from kvcellar.semantic.cache import SemanticCache

__all__ = [
    "LLM", "CacheEngine", "GenerationOutput", "KvcellarError", "SemanticCache", "Settings",
    "load_model",
]
__version__ = "0.1.0"


def load_model(model: str | None = None, **settings: Any) -> HFRunner:
    """Load a model runner (registry name or local directory) without any cache around it."""
    from kvcellar.models.hf import load_runner

    s = Settings.load(**settings, model=model)
    return load_runner(s.model, s.model_cache_dir, s.dtype, s.threads)


def __getattr__(name: str) -> Any:
    if name in ("LLM", "GenerationOutput"):
        from kvcellar import llm

        return getattr(llm, name)
    if name == "CacheEngine":
        from kvcellar.kv.engine import CacheEngine

        return CacheEngine
    if name == "SemanticCache":
        from kvcellar.semantic.cache import SemanticCache

        return SemanticCache
    raise AttributeError(f"module 'kvcellar' has no attribute {name!r}")
