"""The router's Prometheus metrics (names from :mod:`llmops.common.metric_names`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmops.common import metric_names as names


class RouterMetrics:
    """Every collector the router updates; ``registry`` keeps tests apart."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.pending = Gauge(
            names.ROUTER_PENDING_REQUESTS, "Requests waiting for a ready replica.", ["model"], registry=r
        )
        self.decisions = Counter(
            names.ROUTER_DECISIONS_TOTAL.removesuffix("_total"),
            "Routing decisions by policy and outcome.",
            ["policy", "outcome"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            names.ROUTER_DECISION_SECONDS,
            "Time to pick a replica.",
            buckets=names.ROUTER_DECISION_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            names.ROUTER_REQUESTS_TOTAL.removesuffix("_total"),
            "Requests by model asked for, version that answered and status code.",
            ["model", "version", "code"],
            registry=r,
        )
        self.retries = Counter(
            names.ROUTER_RETRIES_TOTAL.removesuffix("_total"),
            "Attempts repeated on another replica after a failure before the first answer.",
            ["model"],
            registry=r,
        )
        self.hold_seconds = Histogram(
            names.ROUTER_HOLD_SECONDS,
            "How long requests waited for a ready replica.",
            ["model"],
            buckets=names.REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        self.endpoint_load = Gauge(
            names.ROUTER_ENDPOINT_LOAD,
            "A replica's queued plus running requests, as last reported.",
            ["endpoint", "model"],
            registry=r,
        )
        self.endpoint_in_flight = Gauge(
            names.ROUTER_ENDPOINT_IN_FLIGHT,
            "Requests this router has in flight on a replica.",
            ["endpoint"],
            registry=r,
        )
        self.endpoints = Gauge(names.ROUTER_ENDPOINTS, "Known replicas by state.", ["state"], registry=r)
        self.ttft = Histogram(
            names.ROUTER_TTFT_SECONDS,
            "Time to first token of streams through the router, by model and version.",
            ["model", "version"],
            buckets=names.TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            names.ROUTER_INTER_TOKEN_SECONDS,
            "Time between consecutive streamed tokens through the router, by model and version.",
            ["model", "version"],
            buckets=names.INTER_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
