"""Prometheus metrics of one server, in a registry of its own (never the global one).

Request counts, latency histograms and token counters are updated as requests run; the numbers of
the cache tiers (bytes, entries, hits, ...) and of the queues are read when ``/metrics`` is
scraped, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvcellar.storage.base import BackendStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

# (metric suffix, BackendStats field, help) of the per-tier numbers.
_TIER_GAUGES = (
    ("used_bytes", "used_bytes", "bytes held by the tier now"),
    ("budget_bytes", "budget_bytes", "byte budget of the tier"),
    ("entries", "entries", "KV chunks held by the tier now"),
)
_TIER_COUNTERS = (
    ("hits", "hits", "gets that found their chunk in the tier"),
    ("misses", "misses", "gets that did not find their chunk in the tier"),
    ("puts", "puts", "chunks written to the tier"),
    ("rejected_puts", "rejected_puts", "chunks the tier refused (larger than its budget, ...)"),
    ("evictions", "evictions", "chunks evicted to stay within the budget"),
    ("errors", "errors", "failed tier operations (the tier was skipped)"),
)

# Counters some tiers report in ``BackendStats.extra`` (0 for tiers that do not have them).
_TIER_EXTRA_COUNTERS = (
    ("write_back_dropped", "writes dropped because the background write-back queue was full"),
    ("down_events", "times the remote tier went down (connection error or timeout)"),
    ("skipped_while_down", "remote calls answered as a miss at once while the tier was down"),
)


class CacheTierCollector(Collector):
    """Per-tier gauges and counters read from ``stats()`` at scrape time."""

    def __init__(self, stats: Callable[[], Iterable[BackendStats]]) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        tiers = list(self._stats())
        families = self._families()
        for st in tiers:
            n = len(_TIER_GAUGES) + len(_TIER_COUNTERS)
            for (_suffix, field, _doc), fam in zip(
                _TIER_GAUGES + _TIER_COUNTERS, families[:n], strict=True
            ):
                fam.add_metric([st.name], float(getattr(st, field)))
            for (field, _doc), fam in zip(_TIER_EXTRA_COUNTERS, families[n:-1], strict=True):
                fam.add_metric([st.name], float(st.extra.get(field, 0.0)))
            down = st.extra.get("up", 1.0) == 0.0
            families[-1].add_metric([st.name], float(st.extra.get("failing", 0.0) or down))
        return families

    @staticmethod
    def _families() -> list[Any]:
        fams: list[Any] = [
            GaugeMetricFamily(f"kvcellar_cache_tier_{suffix}", doc, labels=["tier"])
            for suffix, _, doc in _TIER_GAUGES
        ]
        fams += [
            CounterMetricFamily(f"kvcellar_cache_tier_{suffix}", doc, labels=["tier"])
            for suffix, _, doc in _TIER_COUNTERS
        ]
        fams += [
            CounterMetricFamily(f"kvcellar_cache_tier_{field}", doc, labels=["tier"])
            for field, doc in _TIER_EXTRA_COUNTERS
        ]
        fams.append(
            GaugeMetricFamily(
                "kvcellar_cache_tier_failing",
                "1 while the tier is failing or marked down (it is skipped until it recovers)",
                labels=["tier"],
            )
        )
        return fams


class ServerMetrics:
    """Every metric of one app. Thread-safe: generation threads record their results here."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        tier_stats: Callable[[], Iterable[BackendStats]],
        requests_running: Callable[[], float],
        requests_waiting: Callable[[], float],
        model_queue_depth: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvcellar_http_requests",
            "HTTP requests by endpoint (route path) and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "kvcellar_ttft_seconds",
            "time to first token from admission (waiting for a slot and the model included)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "kvcellar_queue_seconds",
            "time a generation waited: for a slot, then for the model before its prefill",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvcellar_generation_seconds",
            "time from admission to the last token of finished generations",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvcellar_prompt_tokens", "prompt tokens of finished generations", registry=r
        )
        self.cached_tokens = Counter(
            "kvcellar_cached_tokens",
            "prompt tokens loaded from the KV cache instead of prefilled",
            registry=r,
        )
        self.completion_tokens = Counter(
            "kvcellar_completion_tokens", "generated tokens of finished generations", registry=r
        )
        self.cancelled = Counter(
            "kvcellar_generations_cancelled",
            "generations stopped early because the client went away",
            registry=r,
        )
        Gauge("kvcellar_requests_running", "generations holding a slot", registry=r).set_function(
            requests_running
        )
        Gauge(
            "kvcellar_requests_waiting", "requests waiting for a generation slot", registry=r
        ).set_function(requests_waiting)
        Gauge(
            "kvcellar_model_queue_depth",
            "generation steps waiting for the model lock",
            registry=r,
        ).set_function(model_queue_depth)
        r.register(CacheTierCollector(tier_stats))

    def observe_generation(
        self,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        ttft_s: float,
        queue_s: float,
        total_s: float,
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.ttft.observe(ttft_s)
        self.queue.observe(queue_s)
        self.e2e.observe(total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
