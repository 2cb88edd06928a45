"""LLM: the vLLM-style entry point. A model runner plus a cache engine.

One generation: tokenize, look up the longest cached prefix, load its KV into the model's cache,
prefill only the rest, decode, then store the prompt's and the generated tokens' chunks, so the
next turn of a conversation reuses its whole history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcellar.config import Settings
from kvcellar.kv.engine import CacheEngine
from kvcellar.models.hf import HFRunner, load_runner
from kvcellar.sampling import next_token

log = logging.getLogger(__name__)

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]


@dataclass
class GenerationOutput:
    """One completion and where its time went."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    ttft_s: float
    total_s: float
    load_s: float = 0.0  # cache lookup + KV load, before the prefill
    prefill_s: float = 0.0
    store_s: float = 0.0  # saving new chunks after decoding (not part of TTFT)
    stored_chunks: int = 0
    chunk_tiers: list[str] = field(default_factory=list)
    chunk_codecs: list[str] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class LLM:
    """``LLM(**settings)``: any :class:`Settings` field as a keyword, e.g. ``LLM(chunk_size=128)``.

    ``runner`` shares an already loaded model between LLM objects (e.g. a cached and an uncached
    one in a benchmark) so the weights are in memory once.
    """

    def __init__(
        self,
        config_file: str | Path | None = None,
        *,
        runner: HFRunner | None = None,
        **settings: Any,
    ) -> None:
        self.settings = Settings.load(config_file, **settings)
        s = self.settings
        self.runner = runner or load_runner(s.model, s.model_cache_dir, s.dtype, s.threads)
        self.engine: CacheEngine | None = (
            CacheEngine.from_settings(s, self.runner.fingerprint) if s.enabled else None
        )

    # --- prompts ----------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, a chat (list of role/content dicts) or ids given as-is."""
        if isinstance(prompt, str):
            return self.runner.encode_text(prompt)
        items = list(prompt)
        if not items:
            raise ValueError("the prompt is empty: give text, messages or token ids")
        if all(isinstance(m, dict) for m in items):
            for m in items:
                if "role" not in m or not isinstance(m.get("content"), str):
                    raise ValueError("each message needs a 'role' and a string 'content'")
            return self.runner.encode_chat(items)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            vocab = self.runner.config.vocab_size
            if any(t < 0 or t >= vocab for t in items):
                raise ValueError(f"token ids must be in [0, {vocab})")
            return list(items)
        raise TypeError("prompt must be a string, a list of messages or a list of token ids")

    # --- generation ---------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> GenerationOutput:
        """Generate the assistant's reply to ``messages`` (chat template applied)."""
        if isinstance(messages, str) or not messages:
            raise ValueError("chat() takes a non-empty list of {'role', 'content'} messages")
        return self.generate(messages, **kwargs)

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        use_cache: bool | None = None,
    ) -> GenerationOutput:
        """Complete ``prompt``. ``use_cache=False`` bypasses the cache for this call only."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        t0 = time.perf_counter()
        ids = self.tokenize(prompt)
        self.runner.check_length(len(ids), max_tokens)
        engine = self.engine if (use_cache if use_cache is not None else True) else None
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        with self.runner.lock:
            cached, load_s, tiers, codecs_used, cache = 0, 0.0, [], [], None
            if engine is not None:
                hit = engine.retrieve_detailed(ids)
                load_s, tiers, codecs_used = hit.load_s, hit.chunk_tiers, hit.chunk_codecs
                if hit.kv is not None:
                    # At least one prompt token must run through the model to get logits.
                    cached = min(hit.n_tokens, len(ids) - 1)
                    cache = self.runner.new_cache(hit.kv[:, :, :, :cached] if cached else None)
            if cache is None:
                cache = self.runner.new_cache()
            t_pre = time.perf_counter()
            logits = self.runner.forward(ids[cached:], cache)
            prefill_s = time.perf_counter() - t_pre
            out_ids: list[int] = []
            tok = next_token(logits, temperature, top_p, generator)
            ttft = time.perf_counter() - t0
            finish, text = "length", ""
            while True:
                if tok in self.runner.eos_token_ids:
                    finish = "stop"
                    break
                out_ids.append(tok)
                if stops:
                    text = self.runner.decode(out_ids)
                    if any(s in text for s in stops):
                        finish = "stop"
                        break
                if len(out_ids) >= max_tokens:
                    break
                logits = self.runner.forward([tok], cache)
                tok = next_token(logits, temperature, top_p, generator)

            stored, t_store = 0, time.perf_counter()
            if engine is not None:
                # The cache holds every prompt token and every generated token fed back so far.
                seq = ids + out_ids
                n_cached = self.runner.cache_length(cache)
                stored = engine.store(
                    seq[:n_cached], lambda s, e: self.runner.kv_slice(cache, s, e)
                )

            store_s = time.perf_counter() - t_store

        text = self.runner.decode(out_ids)
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
        return GenerationOutput(
            text=text,
            token_ids=out_ids,
            prompt_tokens=len(ids),
            cached_tokens=cached,
            prefilled_tokens=len(ids) - cached,
            finish_reason=finish,
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            load_s=load_s,
            prefill_s=prefill_s,
            store_s=store_s,
            stored_chunks=stored,
            chunk_tiers=tiers,
            chunk_codecs=codecs_used,
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
