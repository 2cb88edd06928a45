"""The semantic response cache in front of the engine, for /v1/chat/completions.

A hit is answered before admission (no generation slot, no model); a miss runs the model and
its complete answer is stored. Answers are cached per tenant, model, system prompt and the
sampling parameters that change them (temperature, top_p, seed, stop, max_tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool

from kvcellar.config import Settings
from kvcellar.semantic.cache import Decision, SemanticCache, SemanticRequestError
from kvcellar.semantic.config import SemanticSettings
from kvcellar.server.schemas import CacheControl

log = logging.getLogger(__name__)


@dataclass
class SemanticRequest:
    """What a chat request needs from the semantic layer across lookup and store."""

    messages: list[dict]
    tenant: str
    control: CacheControl
    key: dict[str, Any]
    decision: Decision | None = None

    @property
    def header(self) -> dict[str, str]:
        if self.control.no_cache or self.decision is None:
            return {"x-kvcellar-cache": "bypass"}
        hit = self.decision.hit
        headers = {"x-kvcellar-cache": hit.kind if hit else "miss"}
        if self.decision.similarity is not None:
            headers["x-kvcellar-cache-similarity"] = f"{self.decision.similarity:.4f}"
        if hit is not None:
            headers["x-kvcellar-cache-entry"] = str(hit.entry_id)
        return headers


class SemanticLayer:
    def __init__(self, settings: Settings, model_name: str, registry, runner: Any = None) -> None:
        if settings.semantic_config is not None:
            cfg = SemanticSettings.from_yaml(settings.semantic_config)
        else:
            cfg = SemanticSettings()
        if settings.semantic_path is not None:
            cfg = cfg.model_copy(update={"path": settings.semantic_path})
        elif "path" not in cfg.model_fields_set:
            cfg = cfg.model_copy(update={"path": str(settings.model_cache_dir / "semantic.sqlite")})
        self.cache = SemanticCache(cfg, model=model_name, judge_runner=runner)
        # tenants come from the configured API keys, so the label's values are bounded
        self.lookups = Counter(
            "kvcellar_semantic_lookups", "semantic cache lookups by tenant and result (exact, "
            "semantic, miss, bypass, error)", ["tenant", "result"], registry=registry)
        self.misses = Counter(
            "kvcellar_semantic_misses", "semantic cache misses by tenant and what turned the "
            "closest candidate away (threshold, context, gate:<check>, learned, no candidate)",
            ["tenant", "reason"], registry=registry)
        self.stores = Counter(
            "kvcellar_semantic_stores", "answers written to the semantic cache, by tenant",
            ["tenant"], registry=registry)

    async def lookup(self, req: SemanticRequest, load: int) -> None:
        if req.control.no_cache:
            self.lookups.labels(req.tenant, "bypass").inc()
            return
        self.cache.set_load(load)
        try:
            req.decision = await run_in_threadpool(
                self.cache.lookup_detailed, req.messages, req.tenant, req.control.category,
                sampling=req.key)
        except SemanticRequestError as exc:  # e.g. too long to cache: just not cached
            log.info("semantic cache skipped: %s", exc)
            self.lookups.labels(req.tenant, "error").inc()
            return
        hit = req.decision.hit
        self.lookups.labels(req.tenant, hit.kind if hit else "miss").inc()
        if hit is None:
            self.misses.labels(req.tenant, req.decision.rejected_by or "no candidate").inc()

    async def augment(self, req: SemanticRequest) -> list[dict]:
        """IC-Cache: on a miss, similar cached answers become in-context examples."""
        k = self.cache.settings.ic_examples
        if k <= 0 or req.control.no_cache:
            return req.messages
        examples = await run_in_threadpool(
            self.cache.examples, req.messages, req.tenant, k, sampling=req.key)
        return self.cache.augment(req.messages, examples) if examples else req.messages

    async def store(self, req: SemanticRequest, text: str) -> None:
        if req.control.no_store or not text.strip():
            return
        try:
            stored = await run_in_threadpool(
                self.cache.store, req.messages, text, req.tenant, req.control.category,
                req.control.ttl, sampling=req.key)
        except SemanticRequestError as exc:
            log.info("answer not cached: %s", exc)
            return
        if stored is not None:
            self.stores.labels(req.tenant).inc()

    async def tenant_of(self, entry_id: int) -> str | None:
        entry = await run_in_threadpool(self.cache.backend.get, entry_id)
        return entry.tenant if entry is not None else None

    def close(self) -> None:
        self.cache.close()
