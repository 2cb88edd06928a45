"""LLM: the vLLM-style entry point. A model runner plus a cache engine.

One generation: tokenize, look up the longest cached prefix, load its KV into the model's cache,
prefill only the rest, decode, then store the prompt's and the generated tokens' chunks, so the
next turn of a conversation reuses its whole history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
    queue_s: float = 0.0  # waiting for the model before the prefill (other requests running)
    load_s: float = 0.0  # cache lookup + KV load, before the prefill
    prefill_s: float = 0.0
    store_s: float = 0.0  # saving new chunks after decoding (not part of TTFT)
    stored_chunks: int = 0
    chunk_tiers: list[str] = field(default_factory=list)
    chunk_codecs: list[str] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StreamEvent:
    """A piece of streamed text; the last event of a stream has ``output`` set (and no text)."""

    delta: str
    token_id: int | None
    output: GenerationOutput | None = None


class _TextStream:
    """Turns a growing list of token ids into text deltas that are safe to show.

    It holds back an incomplete UTF-8 character (decoded as U+FFFD) and anything that could be
    the start of a stop string, and cuts the text at the first stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self._decode = decode
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self._emitted = 0

    def _cut(self, text: str) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def update(self, ids: list[int]) -> tuple[str, bool]:
        self.text, stopped = self._cut(self._decode(ids))
        safe = len(self.text) if stopped else len(self.text.rstrip("\ufffd")) - self._hold
        return self._take(safe), stopped

    def finish(self, ids: list[int]) -> str:
        self.text, _ = self._cut(self._decode(ids))
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta


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
        self._engines: dict[str, CacheEngine] = {}
        self._engines_lock = threading.Lock()

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

    def engine_for(self, tenant: str | None) -> CacheEngine | None:
        """The cache engine of ``tenant`` (None: the configured one); all share the same tiers.

        Tenants salt the key namespace, so one tenant can never load another's KV.
        """
        if self.engine is None or tenant is None or tenant == self.settings.tenant:
            return self.engine
        with self._engines_lock:
            engine = self._engines.get(tenant)
            if engine is None:
                engine = self.engine.for_tenant(tenant)
                self._engines[tenant] = engine
            return engine

    def generate(self, prompt: Prompt, **kwargs: Any) -> GenerationOutput:
        """Complete ``prompt``; keywords as for :meth:`stream`."""
        for event in self.stream(prompt, **kwargs):
            if event.output is not None:
                return event.output
        raise AssertionError("stream ended without an output")  # pragma: no cover

    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        use_cache: bool | None = None,
        tenant: str | None = None,
        prefill_only: bool = False,
    ) -> Iterator[StreamEvent]:
        """Complete ``prompt`` token by token; the last event carries the GenerationOutput.

        ``use_cache=False`` bypasses the cache for this call only; ``tenant`` picks whose cache.
        The model lock is taken per forward step (FIFO), so concurrent streams interleave fairly.
        ``prefill_only=True`` (a prefill worker) computes and stores the prompt's KV, waits until
        it reached every tier (e.g. the shared Redis a decode worker loads from) and generates
        nothing.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        stops = [s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s]
        t0 = time.perf_counter()
        ids = self.tokenize(prompt)
        self.runner.check_length(len(ids), max_tokens)
        engine = self.engine_for(tenant) if use_cache is not False else None
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        text_out = _TextStream(self.runner.decode, stops)

        cached, load_s, tiers, codecs_used, cache = 0, 0.0, [], [], None
        with self.runner.lock:
            queue_s = time.perf_counter() - t0
            if engine is not None:
                hit = engine.retrieve_detailed(ids)
                load_s, tiers, codecs_used = hit.load_s, hit.chunk_tiers, hit.chunk_codecs
                if hit.kv is not None:
                    # At least one prompt token must run through the model to get logits.
                    cached = min(hit.n_tokens, len(ids) - 1)
                    if cached:
                        cache = self.runner.new_cache(hit.kv[:, :, :, :cached])
            if cache is None:
                cache = self.runner.new_cache()
            t_pre = time.perf_counter()
            logits = self.runner.forward(ids[cached:], cache)
            prefill_s = time.perf_counter() - t_pre
        out_ids: list[int] = []
        tok = next_token(logits, temperature, top_p, generator)
        ttft = time.perf_counter() - t0
        finish = "length"
        while not prefill_only:
            if tok in self.runner.eos_token_ids:
                finish = "stop"
                break
            out_ids.append(tok)
            delta, stopped = text_out.update(out_ids)
            if delta:
                yield StreamEvent(delta=delta, token_id=tok)
            if stopped:
                finish = "stop"
                break
            if len(out_ids) >= max_tokens:
                break
            with self.runner.lock:
                logits = self.runner.forward([tok], cache)
            tok = next_token(logits, temperature, top_p, generator)
        tail = text_out.finish(out_ids)
        if tail:
            yield StreamEvent(delta=tail, token_id=None)

        stored, t_store = 0, time.perf_counter()
        if engine is not None:
            # The cache holds every prompt token and every generated token fed back so far.
            n_cached = self.runner.cache_length(cache)
            seq = ids + out_ids
            stored = engine.store(seq[:n_cached], lambda s, e: self.runner.kv_slice(cache, s, e))
            if prefill_only:
                engine.flush()
        store_s = time.perf_counter() - t_store
        output = GenerationOutput(
            text=text_out.text,
            token_ids=out_ids,
            prompt_tokens=len(ids),
            cached_tokens=cached,
            prefilled_tokens=len(ids) - cached,
            finish_reason=finish,
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            queue_s=queue_s,
            load_s=load_s,
            prefill_s=prefill_s,
            store_s=store_s,
            stored_chunks=stored,
            chunk_tiers=tiers,
            chunk_codecs=codecs_used,
        )
        yield StreamEvent(delta="", token_id=None, output=output)

    def flush(self) -> None:
        """Wait until the KV stored so far has been written to every tier (disk, remote)."""
        if self.engine is not None:
            self.engine.flush()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
