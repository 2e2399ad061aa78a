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
from llmops.common import metric_names as names


class GrpcServerMetrics:
    """``llmops_grpc_server_*``: calls handled by code, handling time, calls in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            names.GRPC_SERVER_HANDLED_TOTAL,
            "gRPC calls completed, by final status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            names.GRPC_SERVER_HANDLING_SECONDS,
            "Time from receiving a call to sending its status.",
            ["service", "method"],
            buckets=names.GRPC_HANDLING_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            names.GRPC_SERVER_IN_FLIGHT,
            "gRPC calls being handled now.",
            ["service", "method"],
            registry=registry,
        )
        self.build_info = Gauge(
            names.BUILD_INFO, "Version of the running llmops build (value is 1).", ["version"],
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
