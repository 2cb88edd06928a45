"""CacheEngine: find, load and save KV chunks of token sequences across storage tiers.

The engine turns tokens into chunk keys (:mod:`kvcellar.keys`), frames KV with a codec and keeps
frames in a :class:`~kvcellar.storage.tiered.TieredStore`. It never returns wrong KV: a frame that
fails its checksum is deleted and counted as a miss, and a frame whose stored token ids differ from
the request's is a miss too.

Each tier has its own codec, keyed by tier name ("memory", "disk", "remote"; settings
``memory_codec``, ``disk_codec``, ``remote_codec``). ``store`` encodes a chunk once per distinct
codec and writes each tier its own frame. Frames are self-describing, so ``retrieve`` decodes
whatever it finds and reports the codec of every chunk it served (``chunk_codecs``): a frame
promoted from disk to memory keeps its disk encoding. Lossy codecs are never used silently: the
first engine of a process configured with one logs it at INFO, and the codec names reach
``GenerationOutput.chunk_codecs``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvcellar.config import Settings
from kvcellar.errors import CodecError
from kvcellar.keys import chunk_keys, chunk_spans, namespace, namespace_tag
from kvcellar.kv import codecs
from kvcellar.kv.chunk import TOKEN_DIM, KVChunk
from kvcellar.policies.pins import PinTable
from kvcellar.storage.base import Backend
from kvcellar.storage.tiered import TieredStore

log = logging.getLogger(__name__)

TIER_NAMES = ("memory", "disk", "remote")
"""Tier names the per-tier codec settings refer to (the ``name`` of each tier's backend)."""

_lossy_logged: set[tuple[str, str]] = set()
_lossy_lock = threading.Lock()


def _codec_identity(codec: codecs.Codec) -> tuple[int, str]:
    """Codecs with the same id and options encode identically: encode once for all of them."""
    return codec.codec_id, repr(sorted(vars(codec).items()))


KVSource = Callable[[int, int], torch.Tensor]
"""Gives the KV of tokens [start, end) as [layers, 2, kv_heads, end - start, head_dim]."""


@dataclass
class RetrieveResult:
    """What one retrieve found; ``kv`` is None when nothing was hit."""

    kv: torch.Tensor | None
    n_tokens: int
    chunk_tiers: list[str] = field(default_factory=list)
    chunk_codecs: list[str] = field(default_factory=list)
    corrupted: int = 0
    load_s: float = 0.0


@dataclass
class EngineStats:
    lookups: int = 0
    retrieves: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    hit_tokens: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0  # frame bytes accepted, summed over tiers
    skipped_chunks: int = 0
    corrupted_chunks: int = 0
    token_mismatches: int = 0


class CacheEngine:
    """Thread-safe: tiers lock themselves; the engine's own lock guards only its counters."""

    def __init__(
        self,
        store: TieredStore,
        model_fingerprint: str,
        tenant: str = "default",
        chunk_size: int = 256,
        save_partial_chunks: bool = False,
        codec: str | codecs.Codec = "raw",
        pins: PinTable | None = None,
        tier_codecs: Mapping[str, str | codecs.Codec] | None = None,
    ) -> None:
        """``codec`` is used by every tier not named in ``tier_codecs`` (tier name -> codec)."""
        self.storage = store
        self.model_fingerprint = model_fingerprint
        self.tenant = tenant
        self.namespace = namespace(model_fingerprint, tenant)
        self.pins = pins if pins is not None else PinTable()
        self.chunk_size = chunk_size
        self.save_partial_chunks = save_partial_chunks
        self.codec = codecs.get_codec(codec) if isinstance(codec, str) else codec
        names = [str(getattr(t, "name", "")) for t in store.tiers]
        given = dict(tier_codecs or {})
        unknown = set(given) - set(TIER_NAMES) - set(names)
        if unknown:
            raise ValueError(
                f"codec given for unknown tier(s) {sorted(unknown)}; tiers are "
                f"{', '.join(TIER_NAMES)}"
            )
        self.tier_codecs: dict[str, codecs.Codec] = {
            k: codecs.get_codec(v) if isinstance(v, str) else v for k, v in given.items()
        }
        self._tier_plan = [self.tier_codecs.get(n, self.codec) for n in names]
        for name, c in zip(names, self._tier_plan, strict=True):
            if not c.lossless:
                with _lossy_lock:
                    first = (name, c.name) not in _lossy_logged
                    _lossy_logged.add((name, c.name))
                if first:
                    log.info(
                        "tier %s stores KV with the lossy codec %s: answers served from it may "
                        "differ from uncached ones (GenerationOutput.chunk_codecs names the codec "
                        "of every reused chunk)",
                        name,
                        c.name,
                    )
        self._stats = EngineStats()
        self._lock = threading.Lock()

    def codec_for(self, tier: str) -> codecs.Codec:
        """The codec that chunks written to the tier called ``tier`` are encoded with."""
        return self.tier_codecs.get(tier, self.codec)

    def _keys(self, tokens: Sequence[int]) -> tuple[list[str], list[tuple[int, int]]]:
        spans = chunk_spans(len(tokens), self.chunk_size, self.save_partial_chunks)
        keys = chunk_keys(tokens, self.chunk_size, self.namespace, self.save_partial_chunks)
        return keys, spans

    def lookup(self, tokens: Sequence[int]) -> int:
        """Number of leading tokens whose KV is cached in some tier, without loading it."""
        keys, spans = self._keys(tokens)
        n_chunks = self.storage.contains_prefix(keys)
        with self._lock:
            self._stats.lookups += 1
        return spans[n_chunks - 1][1] if n_chunks else 0

    def retrieve(self, tokens: Sequence[int]) -> tuple[torch.Tensor | None, int]:
        """(KV of the longest cached prefix of ``tokens``, its length in tokens)."""
        res = self.retrieve_detailed(tokens)
        return res.kv, res.n_tokens

    def retrieve_detailed(self, tokens: Sequence[int]) -> RetrieveResult:
        """Load chunk after chunk until the first miss, into one contiguous tensor."""
        t0 = time.perf_counter()
        keys, spans = self._keys(tokens)
        tokens = list(tokens)
        found: list[KVChunk] = []
        res = RetrieveResult(kv=None, n_tokens=0)
        for key, (start, end), (frame, tier) in zip(
            keys, spans, self.storage.get_prefix(keys), strict=False
        ):
            try:
                chunk = codecs.decode(frame)
            except CodecError as exc:
                log.warning("dropping corrupted KV chunk %s from %s: %s", key, tier, exc)
                self.storage.delete(key)
                res.corrupted += 1
                break
            if list(chunk.tokens) != tokens[start:end]:
                log.warning(
                    "KV chunk %s holds other tokens than requested; treating as a miss", key
                )
                with self._lock:
                    self._stats.token_mismatches += 1
                break
            found.append(chunk)
            res.chunk_tiers.append(self.storage.tiers[tier].name)
            res.chunk_codecs.append(codecs.frame_codec_name(frame))
        if found:
            res.n_tokens = spans[len(found) - 1][1]
            first = found[0].kv
            shape = list(first.shape)
            shape[TOKEN_DIM] = res.n_tokens
            out = torch.empty(shape, dtype=first.dtype)
            for chunk, (start, end) in zip(found, spans, strict=False):
                out[:, :, :, start:end].copy_(chunk.kv)
            res.kv = out
        res.load_s = time.perf_counter() - t0
        with self._lock:
            s = self._stats
            s.retrieves += 1
            s.hit_chunks += len(found)
            s.miss_chunks += len(keys) - len(found)
            s.hit_tokens += res.n_tokens
            s.corrupted_chunks += res.corrupted
        return res

    def store(self, tokens: Sequence[int], kv: torch.Tensor | KVSource) -> int:
        """Store the chunks of ``tokens`` not yet cached; returns how many were written.

        ``kv`` covers at least ``tokens`` (a tensor [layers, 2, kv_heads, n, head_dim] or a
        function giving a token range), so only missing chunks are ever copied out of the model.
        """
        source: KVSource = kv if callable(kv) else (lambda s, e: kv[:, :, :, s:e])
        tokens = list(tokens)
        keys, spans = self._keys(tokens)
        stored = skipped = nbytes = 0
        present = self.storage.contains_many(keys)
        for key, (start, end), cached in zip(keys, spans, present, strict=True):
            if cached:
                skipped += 1
                continue
            chunk = KVChunk(source(start, end), tuple(tokens[start:end]))
            frames: dict[tuple[int, str], bytes] = {}
            per_tier: dict[int, bytes] = {}
            for i, codec in enumerate(self._tier_plan):
                ident = _codec_identity(codec)
                if ident not in frames:
                    frames[ident] = codecs.encode(chunk, codec, start=start)
                per_tier[i] = frames[ident]
            accepted = self.storage.put_tiers(key, per_tier)
            if accepted:
                stored += 1
                nbytes += sum(len(per_tier[i]) for i in accepted)
        with self._lock:
            self._stats.stored_chunks += stored
            self._stats.skipped_chunks += skipped
            self._stats.stored_bytes += nbytes
        return stored

    @classmethod
    def from_settings(cls, settings: Settings, model_fingerprint: str) -> CacheEngine:
        """Engine with the tiers the settings ask for (memory, disk, remote) and their codecs."""
        from kvcellar.storage.disk import DiskBackend
        from kvcellar.storage.memory import MemoryBackend
        from kvcellar.storage.redis import RedisBackend

        pins = PinTable()
        tiers: list[Backend] = []
        if settings.memory_bytes > 0:
            tiers.append(MemoryBackend(settings.memory_bytes, pins=pins))
        if settings.disk_bytes > 0:
            tiers.append(DiskBackend(settings.resolved_disk_path(), settings.disk_bytes, pins=pins))
        if settings.remote_url:
            tiers.append(
                RedisBackend(
                    settings.remote_url,
                    timeout_s=settings.remote_timeout_s,
                    ttl_s=settings.remote_ttl_s,
                )
            )
        return cls(
            TieredStore(tiers, write_back=settings.write_back_queue),
            model_fingerprint,
            settings.tenant,
            chunk_size=settings.chunk_size,
            save_partial_chunks=settings.save_partial_chunks,
            pins=pins,
            tier_codecs=tier_codecs_from_settings(settings),
        )

    def for_tenant(self, tenant: str) -> CacheEngine:
        """An engine over the same tiers and pins whose keys are salted by ``tenant``."""
        return CacheEngine(
            self.storage,
            self.model_fingerprint,
            tenant,
            chunk_size=self.chunk_size,
            save_partial_chunks=self.save_partial_chunks,
            codec=self.codec,
            pins=self.pins,
            tier_codecs=self.tier_codecs,
        )

    # --- controller operations ---------------------------------------------------------------
    def lookup_per_tier(self, tokens: Sequence[int]) -> dict[str, int]:
        """Cached prefix length in tokens, tier by tier (a tier alone, not the union)."""
        keys, spans = self._keys(tokens)
        return {
            name: (spans[n - 1][1] if n else 0)
            for name, n in self.storage.contains_prefix_per_tier(keys).items()
        }

    def pin(self, tokens: Sequence[int], ttl_s: float | None = None) -> int:
        """Keep the cached prefix of ``tokens`` from eviction for ``ttl_s`` seconds (None: until
        unpinned); returns how many tokens are pinned."""
        keys, spans = self._keys(tokens)
        n = self.storage.contains_prefix(keys)
        self.pins.pin(keys[:n], ttl_s)
        return spans[n - 1][1] if n else 0

    def unpin(self, tokens: Sequence[int]) -> int:
        """Release the pins of ``tokens``' chunks; returns how many chunks were pinned."""
        keys, _ = self._keys(tokens)
        return self.pins.unpin(keys)

    def clear_tenant(self) -> int:
        """Delete every chunk of this engine's namespace (model + tenant) from every tier."""
        return self.storage.delete_prefix(namespace_tag(self.namespace))

    def stats(self) -> dict[str, object]:
        with self._lock:
            engine = dict(self._stats.__dict__)
        engine["pinned_chunks"] = self.pins.count()
        return {"engine": engine, "tiers": [t.__dict__ for t in self.storage.stats()]}

    def flush(self) -> None:
        """Wait until every chunk stored so far has reached the slower tiers too."""
        self.storage.flush()

    def clear(self) -> None:
        self.storage.clear()

    def close(self) -> None:
        self.storage.close()


def tier_codecs_from_settings(settings: Settings) -> dict[str, codecs.Codec]:
    """Tier name -> configured codec, one instance per distinct codec name."""
    made: dict[str, codecs.Codec] = {}
    out = {}
    for tier, name in (
        ("memory", settings.memory_codec),
        ("disk", settings.disk_codec),
        ("remote", settings.remote_codec),
    ):
        if name not in made:
            made[name] = codecs.make_codec(
                name,
                kivi_group_size=settings.kivi_group_size,
                codec_sink_tokens=settings.codec_sink_tokens,
            )
        out[tier] = made[name]
    return out
