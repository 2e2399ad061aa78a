"""Prometheus metrics of the shared gRPC runtime, and the /metrics HTTP endpoint.

Every holder takes a ``registry=`` so tests can use a fresh ``CollectorRegistry``. Labels are
bounded: service, method, code — never request or user ids.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from llmops import __version__

#: Handling-time buckets (seconds): sub-millisecond cache hits up to multi-minute streams.
HANDLING_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class GrpcServerMetrics:
    """``llmops_grpc_server_*``: calls handled by code, handling time, calls in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "llmops_grpc_server_handled_total",
            "gRPC calls completed, by final status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "llmops_grpc_server_handling_seconds",
            "Time from receiving a call to sending its status.",
            ["service", "method"],
            buckets=HANDLING_SECONDS_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "llmops_grpc_server_in_flight",
            "gRPC calls being handled now.",
            ["service", "method"],
            registry=registry,
        )
        self.build_info = Gauge(
            "llmops_build_info", "Version of the running llmops build (value is 1).", ["version"],
            registry=registry,
        )  # fmt: skip
        self.build_info.labels(version=__version__).set(1)


@dataclass
class MetricsHttpServer:
    """A running /metrics endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsHttpServer:
    """Start the Prometheus text endpoint on ``host:port`` (port 0 picks a free one)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsHttpServer(server, thread)
