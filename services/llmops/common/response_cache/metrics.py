"""``llmops_cache_*`` metrics, registered on the registry the process hands in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmops.common import metric_names as names
from llmops.common.response_cache.domain import LookupOutcome


class CacheMetrics:
    """Requests by result, lookup latency, entries and bytes held, entries invalidated."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            names.CACHE_REQUESTS_TOTAL,
            "Cache requests by result: hit, miss, error (backend failed; answered as a miss) or bypass (not reproducible).",
            ["result"],
            registry=registry,
        )
        for outcome in LookupOutcome:  # every series exists from the start, so rate() sees the first one
            self.requests.labels(outcome.value)
        self.lookup_seconds = Histogram(
            names.CACHE_LOOKUP_SECONDS,
            "Time of one lookup in the backend, failures included.",
            buckets=names.CACHE_LOOKUP_BUCKETS,
            registry=registry,
        )
        self.entries = Gauge(
            names.CACHE_ENTRIES, "Entries held by the backend (all tenants).", registry=registry
        )
        self.bytes = Gauge(
            names.CACHE_BYTES,
            "Bytes the cache's keys, values and indexes take in the backend.",
            registry=registry,
        )
        self.invalidations = Counter(
            names.CACHE_INVALIDATIONS_TOTAL, "Entries removed by Invalidate.", registry=registry
        )

    def count(self, outcome: LookupOutcome) -> None:
        self.requests.labels(outcome.value).inc()
